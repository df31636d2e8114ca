"""Fault cases: what edgeprune does when its inputs or its machine turn against it (damaged bundles,
hostile metadata, crashes, full or read-only disks, kills, concurrent builds). Each section names its
fault kind. Disk faults use real file systems: small and read-only tmpfs mounts (the tests run as root)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import psutil
import pytest
from handmade_bundle import make_bundle, ssh_keypair
from test_cli import WITHOUT_DAC_OVERRIDE, assert_clean_error
from test_cli import edgeprune as edgeprune_cli
from test_inspect import DECI, _write_deci
from test_prune_cli import case_study_model

from conftest import calibration_text, tiny_llama
from edgeprune.bundle import sign_manifest
from edgeprune.devices import get_device
from edgeprune.errors import EdgepruneError, RuntimeCrash
from edgeprune.export import Provenance, export_gguf
from edgeprune.hashing import sha256_file
from edgeprune.inspection import inspect_gguf
from edgeprune.latency import ModelTraffic
from edgeprune.measure import Workload
from edgeprune.models import resolve_source
from edgeprune.models.embedded import embedded_gguf
from edgeprune.prune.modules import materialize
from edgeprune.quantize import quantize
from edgeprune.runtimes import isolated, llamacpp
from edgeprune.runtimes.llamacpp.gguf_format import GGUF
from edgeprune.runtimes.registry import get_runtime


def edgeprune(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return edgeprune_cli(*args, env=env, timeout=300)  # a fault must end in an error, never hang


# -- verify: damaged manifest, leftover temporary files, symlinks and special files, signatures --------


def one_failure_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("FAIL: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


@pytest.mark.parametrize(("text", "reason"), [
    ("\x00\x01garbage", "is not valid JSON"),
    ('"a string"', "holds a JSON str, not an object"),
    ('{"toolchain": null}', "field files: Field required"),
    ('{"files": {"model.gguf": 42}}', "field files.model.gguf: Input should be a valid string"),
    ('{"files": {"../outside": "' + "ab" * 32 + '"}}', "'../outside' is not a plain relative path"),
])
def test_verify_fails_a_damaged_manifest_in_one_sentence(tmp_path, text, reason):
    (tmp_path / "manifest.json").write_text(text)
    assert reason in one_failure_line(edgeprune("verify", str(tmp_path), "--device", "qemu-aarch64"))


def test_verify_is_not_broken_by_a_killed_verifys_leftovers(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    # What a verify killed while writing back leaves (the old names and the reserved prefix).
    for name in (".report.json.tmp", ".manifest.json.tmp", ".edgeprune-tmp-k3j2x1"):
        (bundle / name).write_text("{half")
    proc = edgeprune("verify", str(bundle), "--device", "qemu-aarch64")
    # Past signature and checksums, verify stops where a hand-made bundle must: it holds no binaries.
    assert proc.returncode == 2 and "holds no binaries" in proc.stderr, proc.stderr
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "manifest.json", "model-x-Q4_K_M.gguf"]


def test_verify_refuses_symlinks_and_special_files_naming_them(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", {"model-x-Q4_K_M.gguf": b"GGUF", "bin/llama-cli": b"#!/bin/sh\n"})
    (tmp_path / "elsewhere").write_text("#!/bin/sh\n")
    (bundle / "bin" / "llama-cli").unlink()
    (bundle / "bin" / "llama-cli").symlink_to(tmp_path / "elsewhere")  # same content: checksums alone would pass
    os.mkfifo(bundle / "pipe")  # reading it for a checksum would block for ever
    err = one_failure_line(edgeprune("verify", str(bundle), "--device", "qemu-aarch64"))
    assert "bin/llama-cli is a symlink" in err and "pipe is not a regular file" in err

    other = make_bundle(tmp_path / "other")
    (other / "manifest.json").rename(tmp_path / "real-manifest.json")
    (other / "manifest.json").symlink_to(tmp_path / "real-manifest.json")
    assert "manifest.json is not a regular file" in one_failure_line(edgeprune("verify", str(other)))


def test_verify_checks_the_signature_through_the_cli(tmp_path):
    key, pub = ssh_keypair(tmp_path)
    bundle = make_bundle(tmp_path / "bundle")
    sign_manifest(bundle, key)
    proc = edgeprune("verify", str(bundle), "--trusted-key", str(pub))
    assert proc.returncode == 2 and "holds no binaries" in proc.stderr, proc.stderr  # signature and files held

    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "README.md").write_text("# a changed card\n")  # and its checksum redone by whoever tampered
    manifest["files"]["README.md"] = hashlib.sha256(b"# a changed card\n").hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "changed after it was signed" in one_failure_line(edgeprune("verify", str(bundle), "--trusted-key",
                                                                       str(pub)))


def test_build_refuses_an_unusable_signing_key_before_any_work(tmp_path):
    locked, _ = ssh_keypair(tmp_path, "locked", passphrase="secret")
    for key in (locked, tmp_path / "absent"):
        proc = edgeprune("build", "--target", "demo", "-o", str(tmp_path / "out"), "--sign", str(key))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"Signing key {key}" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    key, _ = ssh_keypair(tmp_path, "good")
    proc = edgeprune("build", "--target", "demo", "-o", str(tmp_path / "out"), "--sign", str(key),
                     env={"PATH": str(tmp_path / "nothing")})
    assert proc.returncode == 2 and "ssh-keygen is not installed" in proc.stderr, proc.stderr


# --- hostile metadata -------------------------------------------------------------------------------
# Well-formed GGUFs whose header claims what the file cannot be: each gets one sentence naming the
# file and the key (or tensor), before anything is allocated from the claim.

V = gguf.GGUFValueType
AS_LIMIT = 3 << 30  # address space of the CLI child: a header's claim allocated would not fit


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def _inspect_limited(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeprune", "inspect", str(path)], capture_output=True, text=True,
                          preexec_fn=_limited, timeout=120)


# (overrides, what the sentence says). A deci file: per-layer arrays, as DECI describes (4 layers).
METADATA = {
    "block-count-huge": ({"deci.block_count": (2**32 - 1, V.UINT32)}, "deci.block_count is 4294967295, outside 0..512"),
    "block-count-u64": ({"deci.block_count": (2**62, V.UINT64)}, f"deci.block_count is {2**62}, outside 0..512"),
    "block-count-inf": ({"deci.block_count": (float("inf"), V.FLOAT32)}, "deci.block_count is inf, not an integer"),
    "block-count-nan": ({"deci.block_count": (float("nan"), V.FLOAT64)}, "deci.block_count is nan, not an integer"),
    "block-count-string": ({"deci.block_count": ("4", V.STRING)}, "deci.block_count is '4', not an integer"),
    "block-count-bool": ({"deci.block_count": (True, V.BOOL)}, "deci.block_count is True, not an integer"),
    # a llama file holds one head count for all layers: a reader that spreads it over block_count
    # layers builds a list of 4 billion entries
    "llama-block-count-huge": ({"general.architecture": ("llama", V.STRING), "llama.block_count": (2**32 - 1, V.UINT32),
                                "llama.attention.head_count": (4, V.UINT32)},
                               "llama.block_count is 4294967295, outside 0..512"),
    "head-count-negative": ({"deci.attention.head_count": ([4, 0, -4, 2], V.ARRAY)},
                            "deci.attention.head_count is -4, outside 0..4294967295"),
    "head-count-absurd": ({"deci.attention.head_count": ([4, 0, 4, 2**30], V.ARRAY),
                           "deci.attention.head_count_kv": ([2, 0, 2, 2**29], V.ARRAY)},
                          "blk.3.attn_q.weight has shape [64, 32], which does not fit "
                          "deci.attention.head_count 1073741824"),
    "head-count-float": ({"deci.attention.head_count": ([4.0, 0.0, 4.0, float("nan")], V.ARRAY)},
                         "deci.attention.head_count is 4.0, not an integer"),
    "kv-heads-exceed": ({"deci.attention.head_count_kv": ([8, 0, 2, 1], V.ARRAY)},
                        "deci.attention.head_count_kv gives layer 0 8 KV heads for 4 query heads"),
    "embedding-absurd": ({"deci.embedding_length": (2**40, V.UINT64)},
                         "deci.embedding_length is 1099511627776, outside"),
    "embedding-wrong": ({"deci.embedding_length": (4096, V.UINT32)},
                        "token_embd.weight has shape [64, 32], which does not fit deci.embedding_length 4096"),
    "ffn-absurd": ({"deci.feed_forward_length": ([128, 96, 1, 2**30], V.ARRAY)},
                   "blk.3.ffn_up.weight has shape [64, 128], which does not fit deci.feed_forward_length 1073741824"),
    "vocab-absurd": ({"deci.vocab_size": (2**31, V.UINT32)}, "which does not fit deci.embedding_length 64 and a "
                                                             "vocabulary of 2147483648"),
    "key-length-inf": ({"deci.attention.key_length": (float("inf"), V.FLOAT32)},
                       "deci.attention.key_length is inf, not an integer"),
    "rope-base-nan": ({"deci.rope.freq_base": (float("nan"), V.FLOAT32)},
                      "deci.rope.freq_base is nan, not a finite positive number"),
    "context-negative": ({"deci.context_length": (-1, V.INT64)}, "deci.context_length is -1, outside"),
    "file-type-string": ({"general.file_type": ("F32", V.STRING)}, "general.file_type is 'F32', not an integer"),
}

INSPECT_ONLY = {"file-type-string"}  # keys the latency model does not read


@pytest.mark.parametrize("case", list(METADATA))
def test_hostile_metadata_values_get_one_sentence(tmp_path, case):
    overrides, needle = METADATA[case]
    path = _write_deci(tmp_path / f"{case}.gguf", **DECI, overrides=overrides)
    proc = _inspect_limited(path)
    assert_clean_error(proc, f"{path} has malformed metadata: ", needle, "re-export it")
    assert proc.returncode == 2
    if case not in INSPECT_ONLY:
        with pytest.raises(EdgepruneError, match="malformed metadata"):  # the latency model reads the same keys
            ModelTraffic.from_gguf(path)


def _u64_after(data: bytes, marker: bytes, skip: int) -> int:
    """Offset of the uint64 `skip` bytes after the (only) occurrence of `marker`."""
    assert data.count(marker) == 1, marker
    return data.index(marker) + len(marker) + skip


def _tensor_info(data: bytes, name: str) -> int:
    """Offset just past a tensor's name in its tensor info: n_dims u32, dims u64 x n, type u32, offset u64."""
    return _u64_after(data, name.encode(), 0)


# Byte edits of a well-formed file: (offset finder, struct format, value, what the sentence says).
LENGTHS = {
    "tensor-count": (lambda d: 8, "<Q", 2**40,
                     "is truncated or corrupt: its header claims 1099511627776 tensors, more than its"),
    "kv-count": (lambda d: 16, "<Q", 2**40,
                 "is truncated or corrupt: its header claims 1099511627776 metadata keys, more than its"),
    # key, then value type u32 (ARRAY) and item type u32 (STRING), then the array's length
    "array-length": (lambda d: _u64_after(d, b"tokenizer.ggml.tokens", 8), "<Q", 2**40,
                     "is truncated or corrupt: tokenizer.ggml.tokens claims 1099511627776 array elements"),
    "array-length-small": (lambda d: _u64_after(d, b"deci.feed_forward_length", 8), "<Q", 10**6,
                               "is truncated or corrupt: deci.feed_forward_length claims 1000000 array elements"),
    "string-length": (lambda d: _u64_after(d, b"general.name", 4), "<Q", 2**40,
                      "is truncated or corrupt: its metadata (at general.name) needs byte 1099511627"),
    "tensor-dims": (lambda d: _tensor_info(d, "blk.0.ffn_up.weight") + 4 + 8, "<Q", 2**40,
                    "is truncated: tensor blk.0.ffn_up.weight's data ends at byte"),
    "tensor-dims-overflow": (lambda d: _tensor_info(d, "token_embd.weight") + 4, "<QQ", (2**32, 2**32),
                             "is truncated: tensor token_embd.weight's data ends at byte"),
    "tensor-offset": (lambda d: _tensor_info(d, "output_norm.weight") + 4 + 8 + 4, "<Q", 2**50,
                      "is truncated: tensor output_norm.weight's data ends at byte"),
    "tensor-type": (lambda d: _tensor_info(d, "output_norm.weight") + 4 + 8, "<I", 9999,
                    "is corrupt: tensor output_norm.weight has unknown type 9999"),
    "tensor-dims-count": (lambda d: _tensor_info(d, "token_embd.weight"), "<I", 2**31,
                          "is truncated or corrupt: its metadata (at token_embd.weight) needs byte"),
}


@pytest.mark.parametrize("case", list(LENGTHS))
def test_lengths_the_file_cannot_hold_get_one_sentence(tmp_path, case):
    find, fmt, value, needle = LENGTHS[case]
    path = _write_deci(tmp_path / f"{case}.gguf", **DECI)
    data = bytearray(path.read_bytes())
    offset = find(bytes(data))
    struct.pack_into(fmt, data, offset, *(value if isinstance(value, tuple) else (value,)))
    path.write_bytes(bytes(data))
    t0 = time.perf_counter()
    proc = _inspect_limited(path)
    assert_clean_error(proc, str(path), needle)
    assert proc.returncode == 2
    assert time.perf_counter() - t0 < 60  # refused from the header, not after walking the claim
    with pytest.raises(EdgepruneError, match=str(path.name)):
        inspect_gguf(path)


def test_a_tensor_beyond_block_count_is_refused(tmp_path):
    path = _write_deci(tmp_path / "short.gguf", **DECI, overrides={
        "deci.block_count": (3, V.UINT32), "deci.attention.head_count": ([4, 0, 4], V.ARRAY),
        "deci.attention.head_count_kv": ([2, 0, 2], V.ARRAY), "deci.feed_forward_length": ([128, 96, 1], V.ARRAY)})
    with pytest.raises(EdgepruneError, match=r"deci\.block_count is 3, but the file holds tensor blk\.3\."):
        inspect_gguf(path)


def test_a_hostile_gguf_model_is_refused_before_any_work(tmp_path):
    bad = _write_deci(tmp_path / "hostile.gguf", **DECI, overrides={"deci.block_count": (2**32 - 1, V.UINT32)})
    with pytest.raises(EdgepruneError, match="deci.block_count is 4294967295"):
        resolve_source(str(bad))
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    for command in (["prune", "--plan", str(plan)], ["build", "--target", "demo"]):
        out = tmp_path / f"out-{command[0]}"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "edgeprune", *command, "-m", str(bad), "-o", str(out),
                               "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300,
                              preexec_fn=_limited)
        assert_clean_error(proc, "hostile.gguf has malformed metadata: deci.block_count is 4294967295")
        assert proc.returncode == 2
        assert time.perf_counter() - t0 < 60  # before the reference, the device or a toolchain build
        assert not out.exists() and not (tmp_path / "cache" / "toolchain").exists()


def test_inspect_cli_of_a_good_file_runs_under_the_same_limit(tmp_path):
    """The limit leaves room for the real thing: the refusals above are not the limit's doing."""
    proc = _inspect_limited(_write_deci(tmp_path / "good.gguf", **DECI))
    assert proc.returncode == 0, proc.stderr
    assert "blk 3: 2 heads / 1 KV / FFN 128" in proc.stdout
    assert edgeprune("inspect", str(tmp_path / "good.gguf"), "--json").returncode == 0


# -- disk full and read-only: the mounts and the model they share ---------------------------------

MIB = 1 << 20


@contextmanager
def tmpfs(path: Path, size: int, *options: str) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The case study's tiny Llama (GGUF about 8 MiB, HF checkpoint about 45 MiB), a --calib file and a
    plan that keeps one shape in every layer (so an HF checkpoint is written too)."""
    root = tmp_path_factory.mktemp("faults")
    calib, plan = root / "calib.txt", root / "plan.toml"
    calib.write_text(calibration_text())
    plan.write_text("drop_layers = [1]\n")
    return case_study_model(root / "llama-1024"), calib, plan


def _prune(model: tuple[Path, Path, Path], out: Path, cache: Path, preflight: str | None = "warn"
           ) -> subprocess.CompletedProcess:
    """`preflight`: EDGEPRUNE_PREFLIGHT; "warn" lets a job the estimate refuses run into the real fault."""
    model_dir, calib, plan = model
    proc = edgeprune_cli("prune", "--plan", str(plan), "--model", str(model_dir), "--calib", str(calib), "-p", "quick",
                         "--no-imatrix", "-q", "-o", str(out), "--cache-dir", str(cache),
                         env={"EDGEPRUNE_PREFLIGHT": preflight} if preflight else None)
    # The preflight's overruled refusal is a warning line of its own; the fault's sentence follows.
    warned = [line for line in proc.stderr.splitlines(True) if "EDGEPRUNE_PREFLIGHT=warn: going on" in line]
    proc.stderr = "".join(line for line in proc.stderr.splitlines(True) if line not in warned)
    return proc


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name or ".old" in p.name]


# -- disk full ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_output_on_a_full_disk(tmp_path, tiny_model):
    """Full while the GGUF is copied (4 MiB), then, with room for the GGUF alone, while the HF checkpoint
    is saved: one sentence naming the output, nothing left on the disk."""
    cache = tmp_path / "cache"
    with tmpfs(tmp_path / "disk", 4 * MIB) as disk:
        # The memory preflight sees it first: refused before any work, in one sentence.
        proc = _prune(tiny_model, disk / "out", cache, preflight=None)
        assert_clean_error(proc, f"of disk in {disk / 'out'}", "--output-dir at a larger disk")
        assert proc.returncode == 2 and os.listdir(disk) == [] and not cache.exists()
        # Told to go on, the copy itself hits the full disk.
        proc = _prune(tiny_model, disk / "out", cache)
        assert_clean_error(proc, f"No space left on device while writing {disk / 'out'}", "--output-dir")
        assert proc.returncode == 2 and os.listdir(disk) == []
    gguf_size = next(cache.rglob(GGUF.model_file)).stat().st_size
    assert gguf_size > 4 * MIB
    with tmpfs(tmp_path / "disk", gguf_size + MIB) as disk:
        proc = _prune(tiny_model, disk / "out", cache)
        assert_clean_error(proc, f"No space left on device while writing {disk / 'out'}")
        assert proc.returncode == 2 and os.listdir(disk) == []
    assert _leftovers(cache) == []


@pytest.mark.slow
def test_cache_on_a_full_disk(tmp_path, tiny_model):
    with tmpfs(tmp_path / "disk", 4 * MIB) as disk:
        proc = _prune(tiny_model, tmp_path / "out", disk, preflight=None)
        assert_clean_error(proc, f"of disk in {disk}", "--cache-dir at a larger disk")
        assert proc.returncode == 2 and os.listdir(disk) == []
        proc = _prune(tiny_model, tmp_path / "out", disk)
        assert_clean_error(proc, f"No space left on device while writing {disk}", "--cache-dir")
        assert proc.returncode == 2 and not (tmp_path / "out").exists()
        assert _leftovers(disk) == []


# -- read-only ----------------------------------------------------------------------------------

@contextmanager
def read_only_bind(path: Path) -> Iterator[Path]:
    """`path` bind-mounted onto itself, then remounted read-only."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("mount", ["tmpfs", "bind"])
@pytest.mark.parametrize("command", ["prune", "build"])
def test_output_on_a_read_only_file_system_is_refused_before_any_work(tmp_path, mount, command):
    cache = tmp_path / "cache"
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    args = ["--plan", str(plan)] if command == "prune" else ["--target", "demo"]
    mounted = tmpfs(tmp_path / "ro", MIB, "ro") if mount == "tmpfs" else read_only_bind(tmp_path / "ro")
    with mounted as ro:
        for out in (ro / "out", ro / "deeper" / "out"):
            proc = edgeprune_cli(command, *args, "-o", str(out), "--cache-dir", str(cache))
            assert_clean_error(proc, f"Cannot write output {out}", "Read-only file system")
            assert proc.returncode == 2
    assert not cache.exists()  # refused before the model was loaded or anything cached


def test_output_in_a_directory_without_write_permission(tmp_path):
    """What a non-root user meets (root without DAC override obeys the modes too)."""
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    proc = edgeprune_cli("build", "--target", "demo", "-o", str(parent / "out"), "--cache-dir", str(tmp_path / "cache"),
                     prefix=WITHOUT_DAC_OVERRIDE)
    assert_clean_error(proc, f"Cannot write output {parent / 'out'}", "Permission denied")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_cache_on_a_read_only_file_system(tmp_path, tiny_model):
    with tmpfs(tmp_path / "ro", MIB, "ro") as ro:
        proc = _prune(tiny_model, tmp_path / "out", ro)
        assert_clean_error(proc, "Read-only file system", str(ro))
        assert proc.returncode == 2 and not (tmp_path / "out").exists()


# --- crash in the runtime: llama.cpp dies of a signal in its child process -------------------------------------------

ISOLATED = "edgeprune.runtimes.isolated"
DOCTOR = "run `edgeprune doctor` to check the runtime build."


def _kill_child(parent: int, module: str, sig: int, running: Callable[[], bool],
                armed: Callable[[], bool] = lambda: True) -> int | None:
    """Send `sig` to the first `python -m module` process under `parent` seen once `armed()`; its pid."""
    while running():
        if armed():
            for child in psutil.Process(parent).children(recursive=True):
                try:
                    if module in child.cmdline():
                        os.kill(child.pid, sig)
                        return child.pid
                except psutil.Error:  # it ended meanwhile
                    continue
        time.sleep(0.005)
    return None


def test_isolated_calls_return_results_and_stream_items_from_another_process(tmp_path):
    path = tmp_path / "m.gguf"
    np.testing.assert_array_equal(isolated.call("testing", path, np.arange, 5), np.arange(5))
    assert isolated.call("testing", path, os.getpid) != os.getpid()
    assert list(isolated.stream("testing", path, range, 3)) == [0, 1, 2]


def test_exceptions_in_the_child_come_back_with_their_type_and_message(tmp_path):
    with pytest.raises(EdgepruneError, match=r"^llama.cpp cannot load missing.gguf: ") as e:
        isolated.call("testing", tmp_path, llamacpp.load, tmp_path / "missing.gguf", 8, 1)
    assert type(e.value) is EdgepruneError
    with pytest.raises(ValueError, match=r"^invalid literal for int\(\) with base 10: 'x'$"):
        isolated.call("testing", tmp_path, int, "x")
    # A crash two processes down (verify's answer runs llama.cpp's generation in its own child) stays a crash.
    with pytest.raises(RuntimeCrash, match=r"\(SIGABRT\) while generating .*inner\.gguf: "):
        isolated.call("answering", tmp_path / "outer.gguf", isolated.call, "generating", tmp_path / "inner.gguf",
                      os.abort)


def test_an_exception_that_does_not_pickle_keeps_its_type_name_and_message():
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a} and {b}")

    class OddUserError(EdgepruneError):
        def __init__(self, name: str) -> None:
            super().__init__(f"Bad {name}; fix it.")

    odd = isolated.rebuild(*isolated.portable(Odd(1, 2)))
    assert type(odd) is RuntimeError and str(odd) == "Odd: 1 and 2"
    user = isolated.rebuild(*isolated.portable(OddUserError("input")))
    assert type(user) is EdgepruneError and str(user) == "Bad input; fix it."


def test_log_records_of_the_child_reach_the_parents_loggers(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    isolated.call("testing", tmp_path, logging.getLogger("edgeprune.faults").warning, "%d windows left", 3)
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("edgeprune.faults", "WARNING", "3 windows left")]


@pytest.mark.parametrize(("fn", "args", "name"), [
    (ctypes.string_at, (0,), "SIGSEGV"),  # a real null-pointer read
    (os.abort, (), "SIGABRT"),
    (signal.raise_signal, (signal.SIGILL,), "SIGILL"),
    (signal.raise_signal, (signal.SIGBUS,), "SIGBUS"),
])
def test_a_signal_in_the_child_is_one_sentence_naming_the_work_the_model_and_the_signal(tmp_path, fn, args, name):
    model = tmp_path / "model.gguf"
    with pytest.raises(RuntimeCrash) as e:
        isolated.call("measuring the quality of", model, fn, *args)
    assert str(e.value) == f"llama.cpp crashed ({name}) while measuring the quality of {model}: {DOCTOR}"


def test_a_child_killed_by_the_oom_killer_says_memory_and_an_exit_code_is_named(tmp_path):
    model = tmp_path / "model.gguf"
    with pytest.raises(RuntimeCrash, match=rf"^llama.cpp was killed \(SIGKILL\) while quantizing {model}: most likely "
                                           r"the machine ran out of memory"):
        isolated.call("quantizing", model, signal.raise_signal, signal.SIGKILL)
    with pytest.raises(RuntimeCrash, match=rf"^llama.cpp's process exited with code 3 while quantizing {model} "
                                           r"\(no output\): "):
        isolated.call("quantizing", model, os._exit, 3)


def test_a_stream_abandoned_early_ends_its_child(tmp_path):
    logits = llamacpp.sequence_logits(embedded_gguf(), np.array([[1, 504, 2432, 28]] * 50), threads=1)
    assert next(logits).shape == (4, 49152)
    child = next(c for c in psutil.Process().children() if ISOLATED in c.cmdline())
    logits.close()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_a_benchmark_worker_killed_by_a_signal_is_a_runtime_crash():
    model = embedded_gguf()
    workload = Workload(prompt=tuple(range(100, 116)), answer_tokens=4, threads=1, warmup=0, repetitions=1)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get_runtime().runner(get_device("local")).benchmark, model, workload)
        killed = _kill_child(os.getpid(), "edgeprune.runtimes.bench_worker", signal.SIGSEGV, lambda: not future.done())
        assert killed is not None
        with pytest.raises(RuntimeCrash) as e:
            future.result()
    assert str(e.value) == f"llama.cpp crashed (SIGSEGV) while benchmarking {model}: {DOCTOR}"


@pytest.mark.slow
def test_a_quantizer_killed_mid_write_leaves_neither_its_output_nor_its_temporary_file(
        tmp_path, embedded_reference, embedded_tokenizer_spec):
    src, dst = tmp_path / "model-f16.gguf", tmp_path / "model-q4km.gguf"
    export_gguf(materialize(embedded_reference.weights), embedded_tokenizer_spec, src, "F16",
                Provenance("e", "0" * 64, {}), "e")
    partial = dst.with_name(dst.name + ".tmp")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(quantize, src, dst, "Q4_K_M", 1)
        killed = _kill_child(os.getpid(), ISOLATED, signal.SIGBUS, lambda: not future.done(), partial.exists)
        with pytest.raises(RuntimeCrash) as e:
            future.result()
    assert killed is not None
    assert str(e.value) == f"llama.cpp crashed (SIGBUS) while quantizing {src}: {DOCTOR}"
    assert sorted(tmp_path.iterdir()) == [src]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "doing"), [("quantize", "quantizing"), ("quality", "measuring the quality of")])
def test_a_runtime_crash_ends_prune_with_one_sentence_exit_2_and_nothing_half_written(
        tmp_path, embedded_reference, stage, doing):
    from conftest import tiny_llama

    model_dir = tmp_path / "tiny-llama"
    tiny_llama(tied=False).save_pretrained(model_dir)
    embedded_reference.tokenizer.save_pretrained(model_dir)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"Pump {i} reported {i * 7 % 90} bar at {i % 24}:00. " * 8})
                               for i in range(50)))
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    out, cache = tmp_path / "out", tmp_path / "cache"
    cli = subprocess.Popen([sys.executable, "-m", "edgeprune", "prune", "--plan", str(plan), "--model", str(model_dir),
                            "--calib", str(calib), "-p", "quick", "-o", str(out), "--cache-dir", str(cache), "-q"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    quantized = lambda: any(cache.glob("stages/candidate-model/*/result.json"))  # noqa: E731
    # The candidate's quantizer is the first llama.cpp process (and has ended when the candidate's stage is
    # complete); its quality measurement the first after it.
    killed = _kill_child(cli.pid, ISOLATED, signal.SIGSEGV, lambda: cli.poll() is None,
                         quantized if stage == "quality" else lambda: True)
    stdout, stderr = cli.communicate(timeout=600)
    assert killed is not None, stderr
    assert cli.returncode == 2
    assert_clean_error(subprocess.CompletedProcess(cli.args, cli.returncode, stdout, stderr),
                       f"llama.cpp crashed (SIGSEGV) while {doing} ", DOCTOR)
    assert not out.exists()
    assert [p for p in cache.rglob("*") if ".tmp" in p.name] == []
    assert quantized() == (stage == "quality")
    assert not any(cache.glob("stages/quality/*/result.json"))


def _edgeprune(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeprune", *args]


def _tmp_dirs(root: Path) -> list[Path]:
    try:
        return list(root.rglob("*.tmp-*"))
    except FileNotFoundError:  # a directory renamed or removed under the walk
        return _tmp_dirs(root)


def _calibration_file(path: Path) -> Path:
    """Text for calibration (self-generating it with a random tiny model would take a minute here)."""
    sentences = [f"Pump {i} reported a pressure of {i * 7 % 90} bar at {i % 24}:00, within limits." for i in range(400)]
    path.write_text("\n".join(json.dumps({"text": " ".join(sentences[i : i + 8])}) for i in range(0, 400, 8)))
    return path


# --- concurrent cache: two builds share one cache directory at the same time --------------------------


@pytest.mark.slow
def test_two_prunes_sharing_an_empty_cache_both_succeed_with_the_same_model(tmp_path, embedded_tokenizer_spec):
    """A GGUF source, so both first convert its tokenizer into a cached directory (as the torch reference
    was once, the step that used to end in "Directory not empty"), then build the same stages: one builds
    each, the other waits and reuses it."""
    source = tmp_path / "tiny.gguf"
    export_gguf(tiny_llama(tied=True), embedded_tokenizer_spec, source, "F32",
                Provenance("org/tiny", "ab" * 32, {}), "tiny")
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    cache, calib = tmp_path / "shared-cache", _calibration_file(tmp_path / "calib.jsonl")
    def prune(i: int) -> subprocess.Popen:
        args = ("prune", "--plan", str(plan), "-m", str(source), "-o", str(tmp_path / f"out{i}"), "--quant", "Q8_0",
                "--calib", str(calib), "-p", "quick", "--cache-dir", str(cache), "-q")
        return subprocess.Popen(_edgeprune(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [prune(0), prune(1)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    digests = {sha256_file(next((tmp_path / f"out{i}").glob("*.gguf"))) for i in range(2)}
    assert len(digests) == 1
    assert len([p for p in (cache / "tokenizer").iterdir() if p.is_dir()]) == 1
    for stage in ("candidate-model", "quality"):
        assert len([p for p in (cache / "stages" / stage).iterdir() if p.is_dir()]) == 1, stage
    assert _tmp_dirs(cache) == []


# --- kill: SIGKILL at any moment, then the same command again ------------------------------------------


def _finished(stage_dir: Path) -> dict[str, int]:
    """Finished entries of a stage -> their result's mtime (a rebuilt entry would have a new one)."""
    if not stage_dir.is_dir():
        return {}
    return {p.name: (p / "result.json").stat().st_mtime_ns for p in stage_dir.iterdir()
            if ".tmp-" not in p.name and (p / "result.json").is_file()}


@pytest.mark.slow
def test_a_build_killed_mid_search_resumes_from_its_finished_stages(tmp_path, embedded_reference):
    """`build` of a tiny HF model (the fastest realistic search), SIGKILLed while a stage of its third
    candidate is being written; the rerun reuses every finished stage, sweeps the killed build's
    temporary directories and ends as an uninterrupted build would."""
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(tied=False).save_pretrained(model_dir)
    embedded_reference.tokenizer.save_pretrained(model_dir)
    cache, out = tmp_path / "cache", tmp_path / "out"
    calib = _calibration_file(tmp_path / "calib.jsonl")
    # A speed-up a tiny model cannot reach (its output layer dominates): the search goes on.
    cmd = _edgeprune("build", "--target", "demo", "-m", str(model_dir), "--calib", str(calib), "-p", "quick",
                     "--speedup", "5", "-o", str(out), "--cache-dir", str(cache), "-q")
    candidates = cache / "stages" / "candidate-model"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    try:
        while not (len(_finished(candidates)) >= 2 and _tmp_dirs(cache / "stages")):
            assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _tmp_dirs(cache / "stages"), "killed while writing a stage"
    before = {stage.name: _finished(stage) for stage in (cache / "stages").iterdir()}
    assert not out.exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode in (0, 1), rerun.stderr  # 1: the budget is not met, said in one sentence
    assert "Traceback" not in rerun.stderr
    report = json.loads((out / "report.json").read_text())
    after = {stage.name: _finished(stage) for stage in (cache / "stages").iterdir()}
    for stage, entries in before.items():
        assert entries.items() <= after[stage].items(), f"{stage}: a finished entry was rebuilt"
    # The importance scores came from the killed build: the rerun spent no time on them.
    assert "structured-importance" not in report["timings_s"]
    assert len(report["search"]["candidates"]) > len(before["candidate-model"])
    assert _tmp_dirs(cache) == [] and _tmp_dirs(tmp_path) == []

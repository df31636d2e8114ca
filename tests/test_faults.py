"""Fault cases: what edgeprune does when the world misbehaves. Each section names its fault kind.
Disk faults use real file systems: small and read-only tmpfs mounts (the tests run as root)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from handmade_bundle import make_bundle, ssh_keypair
from test_cli import WITHOUT_DAC_OVERRIDE, assert_clean_error
from test_cli import edgeprune as edgeprune_cli
from test_prune_cli import case_study_model

from conftest import calibration_text
from edgeprune.bundle import sign_manifest
from edgeprune.pipeline import MODEL_FILE


def edgeprune(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


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
                     env=os.environ | {"PATH": str(tmp_path / "nothing")})
    assert proc.returncode == 2 and "ssh-keygen is not installed" in proc.stderr, proc.stderr


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


def _prune(model: tuple[Path, Path, Path], out: Path, cache: Path) -> subprocess.CompletedProcess:
    model_dir, calib, plan = model
    return edgeprune_cli("prune", "--plan", str(plan), "--model", str(model_dir), "--calib", str(calib), "-p", "quick",
                     "--no-imatrix", "-q", "-o", str(out), "--cache-dir", str(cache))


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name or ".old" in p.name]


# -- disk full ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_output_on_a_full_disk(tmp_path, tiny_model):
    """Full while the GGUF is copied (4 MiB), then, with room for the GGUF alone, while the HF checkpoint
    is saved: one sentence naming the output, nothing left on the disk."""
    cache = tmp_path / "cache"
    with tmpfs(tmp_path / "disk", 4 * MIB) as disk:
        proc = _prune(tiny_model, disk / "out", cache)
        assert_clean_error(proc, f"No space left on device while writing {disk / 'out'}", "--output-dir")
        assert proc.returncode == 2 and os.listdir(disk) == []
    gguf_size = next(cache.rglob(MODEL_FILE)).stat().st_size
    assert gguf_size > 4 * MIB
    with tmpfs(tmp_path / "disk", gguf_size + MIB) as disk:
        proc = _prune(tiny_model, disk / "out", cache)
        assert_clean_error(proc, f"No space left on device while writing {disk / 'out'}")
        assert proc.returncode == 2 and os.listdir(disk) == []
    assert _leftovers(cache) == []


@pytest.mark.slow
def test_cache_on_a_full_disk(tmp_path, tiny_model):
    with tmpfs(tmp_path / "disk", 4 * MIB) as disk:
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

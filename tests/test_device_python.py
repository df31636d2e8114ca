"""The Python an ONNX Runtime bundle will run on its device (runtimes/onnx/device_python.py, debian.py):
Debian's arm64 CPython and glibc with onnxruntime's aarch64 wheel, assembled from the package files
`make install` fetched (tests never download), started through its own loader under qemu, and giving
the host's logits for an int4 model of a non-uniform plan."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile

import numpy as np
import pytest

from conftest import tiny_llama
from edgeprune.devices import get_device
from edgeprune.devices.qemu import emulated_root
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance
from edgeprune.models.weights import ModuleStore
from edgeprune.prune import Plan
from edgeprune.runtimes.onnx import device_python, session
from edgeprune.runtimes.onnx.debian import ar_members, parse_index, unpack
from edgeprune.runtimes.onnx.llama import write_onnx
from edgeprune.runtimes.onnx.weights import WEIGHTS

TOKENS = [1, 504, 2432, 28, 3300, 17, 33, 34, 35, 216, 4389, 29, 44, 9000, 12, 77, 6345, 2]
# Logits of the model as onnxruntime's Python API gives them, written to stdout as .npy.
DEVICE_LOGITS = """
import io, sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
tokens = np.array([[int(t) for t in sys.argv[2].split(",")]], np.int64)
feeds = {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}
for i in s.get_inputs():
    if i.name.startswith("past_key_values."):
        feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
out = io.BytesIO()
np.save(out, s.run(["logits"], feeds)[0][0])
sys.stdout.buffer.write(out.getvalue())
"""


def _deb(members: dict[str, tuple[str, bytes | str]]) -> bytes:
    """A Debian package (ar archive) whose data.tar.xz holds files (bytes) and symlinks (str)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, (kind, content) in members.items():
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, str(content)
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o755
                tar.addfile(info, io.BytesIO(content))  # type: ignore[arg-type]
    out = b"!<arch>\n"
    for name, blob in (("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"), ("data.tar.xz", data.getvalue())):
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(blob):<10}`\n".encode() + blob
        out += b"\n" * (len(blob) % 2)
    return out


def test_a_package_unpacks_inside_its_root_with_absolute_links_made_relative(tmp_path):
    deb = tmp_path / "p.deb"
    deb.write_bytes(_deb({"./lib": ("dir", ""), "./lib/aarch64-linux-gnu/ld.so": ("file", b"\x7fELF"),
                          "./lib/ld-linux-aarch64.so.1": ("link", "/lib/aarch64-linux-gnu/ld.so"),
                          "./../escape": ("file", b"no")}))
    assert set(ar_members(deb)) == {"debian-binary", "control.tar.xz", "data.tar.xz"}
    root = tmp_path / "root"
    root.mkdir()
    unpack(deb, root)
    link = root / "lib" / "ld-linux-aarch64.so.1"
    assert link.is_symlink() and not str(link.readlink()).startswith("/")
    assert link.read_bytes() == b"\x7fELF" and link.resolve().is_relative_to(root.resolve())
    assert not (tmp_path / "escape").exists()

    deb.write_bytes(_deb({"./out": ("link", "../../.."), "./out/evil": ("file", b"no")}))
    with pytest.raises(EdgepruneError, match="would write ./out/evil outside the directory it is unpacked in"):
        unpack(deb, root)

    deb.write_bytes(deb.read_bytes()[:-40])
    with pytest.raises(EdgepruneError, match="truncated: its member data.tar.xz runs past the end"):
        ar_members(deb)
    deb.write_bytes(b"PK\x03\x04 not a deb")
    with pytest.raises(EdgepruneError, match="not a Debian package"):
        ar_members(deb)


def test_the_index_gives_each_packages_file_and_sha256():
    text = ("Package: libc6\nVersion: 2.36-9\nDepends: libgcc-s1\n continued line: x\nFilename: pool/main/g/l.deb\n"
            "Size: 12\nSHA256: ab\n\nPackage: docs\nVersion: 1\n")
    (only,) = parse_index(text).values()
    assert (only.name, only.version, only.filename, only.sha256, only.size) == ("libc6", "2.36-9", "pool/main/g/l.deb",
                                                                                "ab", 12)


@pytest.fixture(scope="module")
def aarch64_python(tmp_path_factory):
    return device_python.device_python("aarch64", tmp_path_factory.mktemp("cache"))


def test_a_changed_package_file_is_refused_naming_it(tmp_path, monkeypatch, aarch64_python):
    found, _ = device_python.packages("aarch64", tmp_path)
    copy = tmp_path / "packages"
    shutil.copytree(found, copy / "aarch64")
    sources = json.loads((copy / "aarch64" / "sources.json").read_text())
    deb = copy / "aarch64" / sources["debian"]["packages"]["libc6"]["file"]
    deb.write_bytes(deb.read_bytes()[:-1] + b"\0")
    monkeypatch.setenv(device_python.ENV, str(copy))
    with pytest.raises(EdgepruneError, match=re.escape(f"{deb.name} is missing or changed since it was fetched")):
        device_python.device_python("aarch64", tmp_path)
    monkeypatch.setenv(device_python.ENV, str(tmp_path / "nothing"))
    with pytest.raises(EdgepruneError, match="holds no aarch64/sources.json"):
        device_python.device_python("aarch64", tmp_path)
    with pytest.raises(EdgepruneError, match="for aarch64, x86_64, not riscv64"):
        device_python.device_python("riscv64", tmp_path)


def test_the_assembled_python_is_made_once_and_records_what_it_holds(aarch64_python, tmp_path):
    made = json.loads((aarch64_python.root / device_python.MADE).read_text())
    assert made["versions"] == aarch64_python.versions and made["arch"] == "aarch64"
    import onnxruntime

    assert aarch64_python.versions["onnxruntime"] == onnxruntime.__version__
    assert aarch64_python.versions["python"].startswith("3.11.")
    mtime = (aarch64_python.root / device_python.MADE).stat().st_mtime
    again = device_python.device_python("aarch64", aarch64_python.root.parent.parent)
    assert again.root == aarch64_python.root and (again.root / device_python.MADE).stat().st_mtime == mtime
    assert not (aarch64_python.root / "usr" / "share" / "doc").exists()


def test_onnxruntime_on_the_emulated_arm_device_gives_the_hosts_logits(aarch64_python, tmp_path):
    """int4 blocks of 32 (MatMulNBits, int8 compute) and GroupQueryAttention with per-layer KV heads:
    the contrib kernels the search's ONNX candidates use, run by the aarch64 build of onnxruntime."""
    model = tmp_path / "model.onnx"
    plan = Plan(heads=((0, (0, 2)), (1, (2, 3)), (3, (1,))), ffn=((1, tuple(range(0, 128, 2))),))
    write_onnx(ModuleStore(tiny_llama(tied=False)), plan, model, WEIGHTS["INT4"],
               Provenance("tiny", "0" * 64, plan.to_dict()), "tiny")
    (host,) = list(session.sequence_logits(model, np.array([TOKENS]), threads=1))

    device = get_device("qemu-aarch64")
    run = device.exec(device.tool([*aarch64_python.argv(), "-c", DEVICE_LOGITS, str(model),
                                   ",".join(map(str, TOKENS))]), "onnxruntime on aarch64")
    assert run.returncode == 0, run.stderr
    arm = np.load(io.BytesIO(run.stdout))
    assert arm.shape == host.shape
    # Other kernels (NEON, not AVX2) may round differently; the answer is the same.
    spread = float(host.max() - host.min())
    assert (arm.argmax(-1) == host.argmax(-1)).mean() >= 0.9
    assert np.abs(arm - host).max() <= 1e-3 * spread, np.abs(arm - host).max()  # measured: 2e-7 of it


def test_the_emulated_device_describes_arm_cores():
    cpuinfo = (emulated_root(3) / "proc" / "cpuinfo").read_text()
    assert cpuinfo.count("processor\t:") == 3 and "CPU implementer\t: 0x41" in cpuinfo
    assert emulated_root(3) == emulated_root(3)

"""Fault cases: what edgeprune does when the world misbehaves."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from handmade_bundle import make_bundle, ssh_keypair

from edgeprune.bundle import sign_manifest


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

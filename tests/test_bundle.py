"""The deployable bundle for an aarch64 target: contents, reproducibility, verification under qemu."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from test_cli import edgeprune

from conftest import flip_byte
from edgeprune.bundle import MEASURED_FILES, manifest_hashes
from edgeprune.hashing import sha256_file
from edgeprune.toolchain import TOOLS


def build_arm_bundle(out: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    # A budget the unpruned model meets on any machine: the bundle, not the search, is under test.
    return edgeprune("build", "--target", "arm16g", "--profile", "quick", "--latency-budget", "3600", "-o", str(out),
                     "--cache-dir", str(cache_dir), "-q")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("arm") / "bundle"
    proc = build_arm_bundle(out, cache_dir)
    assert proc.returncode == 0, proc.stderr
    return out


def test_malformed_ssh_device_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {}, "toolchain": {"arch": "aarch64",
                                                                                   "llama_cpp": "x"}}))
    proc = edgeprune("verify", str(tmp_path), "--device", "ssh://controller:port")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: Device 'ssh://controller:port' is not of the form ssh://[user@]host[:port]."


def test_verify_of_a_directory_without_manifest_is_bad_input(tmp_path):
    proc = edgeprune("verify", str(tmp_path), "--device", "qemu-aarch64")
    assert proc.returncode == 2 and "has no manifest.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bundle_holds_model_binaries_scripts_card_and_manifest(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = json.loads((bundle / "report.json").read_text())
    files = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert files == {report["artifact"], "README.md", "report.json", "report.md", "report.html", "run.sh", "serve.sh",
                     *(f"bin/{tool}" for tool in TOOLS)}
    assert set(manifest_hashes(manifest)) == files
    for name, digest in manifest_hashes(manifest).items():
        assert sha256_file(bundle / name) == digest
    assert set(manifest["run"]["files"]) == set(MEASURED_FILES)
    assert manifest["runtime"] == "llama.cpp"
    assert manifest["toolchain"]["triple"] == "aarch64-linux-gnu"
    assert manifest["toolchain"]["cpu_flags"] == "armv8.2-a+dotprod"
    assert "llama-cpp-python 0.3.36" in manifest["toolchain"]["llama_cpp"]
    assert manifest["target"]["name"] == "arm16g" and "llama.cpp" in manifest["tools"]

    desc = subprocess.run(["file", str(bundle / "bin" / "llama-cli")], capture_output=True, text=True).stdout
    assert "ARM aarch64" in desc, desc

    for script in ("run.sh", "serve.sh"):
        path = bundle / script
        assert path.stat().st_mode & stat.S_IXUSR
        text = path.read_text()
        assert text.startswith("#!/bin/sh") and report["artifact"] in text and "-t 8" in text  # arm16g: 8 cores
        assert subprocess.run(["sh", "-n", str(path)]).returncode == 0
    assert "--host 127.0.0.1" in (bundle / "serve.sh").read_text()

    card = (bundle / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "Not measured on the target" in card  # x86 stand-in
    # The target's figures are estimates transferred from the stand-in's measurements, labelled so.
    sel = next(c for c in report["search"]["candidates"] if c["selected"])
    est = sel["estimate_on_target"]
    assert est["label"] == "estimated" and "arm16g" in est["machine"] and est["observations"] >= 1
    assert 0 < est["latency_s"] < float("inf") and "Estimated on the target" in card and "not a measurement" in card
    assert "verified" not in card.split("## Run it")[0].lower()
    assert "./run.sh" in card and "edgeprune verify . --device qemu-aarch64" in card


@pytest.mark.slow
def test_run_script_answers_under_qemu(bundle, tmp_path):
    # run.sh execs an aarch64 binary; on this x86 machine only binfmt_misc would hand that to qemu, so
    # the same script runs with qemu-aarch64 put in front of the binary.
    text = (bundle / "run.sh").read_text()
    assert 'exec "$here/bin/llama-completion"' in text
    script = tmp_path / "run-qemu.sh"
    script.write_text(text.replace('exec "$here/bin/', 'exec qemu-aarch64 "$here/bin/')
                      .replace('here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)', f"here={shlex.quote(str(bundle))}"))
    # --temp 0: llama-completion samples with a random seed by default; greedy makes the answer the model's.
    proc = subprocess.run(["sh", str(script), "What is the capital of France?", "-n", "12", "-t", "2", "--temp", "0"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_verify_under_qemu_matches_the_host(bundle):
    proc = edgeprune("verify", str(bundle), "--device", "qemu-aarch64", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["device"] == "qemu-aarch64" and result["arch"] == "aarch64"
    assert len(result["host_tokens"]) > 0 and result["device_text"].strip()
    a = result["agreement"]  # every device token within the host's top 5 and 1 logit of its best
    assert a["failure"] == "" and a["positions"] >= 1 and a["max_gap"] <= a["gap_allowed"] == 1.0
    assert result["signature"] == "unsigned"
    assert result["device_decode_tok_s"] > 0
    assert result["host_text"].strip()
    assert set(result["programs"]) == set(TOOLS) and result["runtime"] == "llama.cpp"
    assert result["files_checked"] == len(TOOLS) + 7  # model, README, 3 reports, 2 scripts
    assert result["slo"] is None and "emulated" in result["slo_skipped"] and result["passed"]


@pytest.mark.slow
def test_verify_local_refuses_a_foreign_architecture(bundle):
    if os.uname().machine == "aarch64":
        pytest.skip("this machine runs aarch64 natively")
    proc = edgeprune("verify", str(bundle), "--device", "local")
    assert proc.returncode == 2 and "built for aarch64" in proc.stderr


@pytest.mark.slow
def test_one_changed_byte_fails_verification_naming_the_file(bundle, tmp_path):
    report = json.loads((bundle / "report.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    gguf = copy / report["artifact"]
    flip_byte(gguf)
    proc = edgeprune("verify", str(copy), "--device", "qemu-aarch64")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{report['artifact']} does not match its sha256" in proc.stderr
    assert "bin/" not in proc.stderr  # only the changed file is named

    # A file the manifest does not list is named too.
    shutil.copytree(bundle, tmp_path / "extra")
    (tmp_path / "extra" / "bin" / "helper").write_text("#!/bin/sh\n")
    proc = edgeprune("verify", str(tmp_path / "extra"), "--device", "qemu-aarch64")
    assert proc.returncode == 1 and "bin/helper is not in the manifest" in proc.stderr


@pytest.mark.slow
def test_two_builds_from_the_same_inputs_are_identical(bundle, tmp_path, cache_dir):
    # A second cache that shares the slow, input-only parts (the fp32 reference converted from the
    # embedded GGUF, the compiled binaries) but recomputes every stage: calibration text,
    # importance, imatrix, quantization.
    cache2 = tmp_path / "cache"
    cache2.mkdir()
    for shared in ("reference", "toolchain"):
        (cache2 / shared).symlink_to(cache_dir / shared)
    out = tmp_path / "again"
    proc = build_arm_bundle(out, cache2)
    assert proc.returncode == 0, proc.stderr

    first = json.loads((bundle / "manifest.json").read_text())
    second = json.loads((out / "manifest.json").read_text())
    gguf = json.loads((bundle / "report.json").read_text())["artifact"]
    assert sha256_file(out / gguf) == sha256_file(bundle / gguf)
    assert first["files"] == second["files"]
    first.pop("run")
    second.pop("run")
    assert first == second

"""The ONNX Runtime bundle: built by `edgeprune build --runtime onnxruntime` for an aarch64 and an
x86-64 target, its Python and runner answering under qemu-aarch64 and on this machine, verified
there (the device's answer read with the host's logits), over ssh:// (the SLO timed by the bundle's
own runner) and refused when a byte or the runner is changed."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import urllib.request
from pathlib import Path

import pytest
from test_cli import edgeprune

from conftest import flip_byte
from edgeprune.bundle import manifest_hashes
from edgeprune.devices import get_device
from edgeprune.hashing import sha256_file

pytestmark = pytest.mark.slow


def build(target: str, out: Path, cache_dir: Path) -> Path:
    # A budget the unpruned model meets on any machine: the bundle, not the search, is under test.
    proc = edgeprune("build", "--target", target, "--runtime", "onnxruntime", "--profile", "quick",
                     "--latency-budget", "3600", "-o", str(out), "--cache-dir", str(cache_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def arm_bundle(tmp_path_factory, cache_dir) -> Path:
    return build("arm16g", tmp_path_factory.mktemp("onnx-arm") / "bundle", cache_dir)


@pytest.fixture(scope="module")
def native_bundle(tmp_path_factory, cache_dir) -> Path:
    if os.uname().machine != "x86_64":
        pytest.skip("the demo target is x86-64")
    return build("demo", tmp_path_factory.mktemp("onnx-native") / "bundle", cache_dir)


def rehash(bundle: Path, name: str) -> None:
    """Record a changed file's new sha256 in the manifest, as someone who tampers would."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_the_bundle_holds_the_devices_python_the_runner_and_the_model(arm_bundle):
    manifest = json.loads((arm_bundle / "manifest.json").read_text())
    report = json.loads((arm_bundle / "report.json").read_text())
    model = report["artifact"]
    assert model == "model-SmolLM2-135M-Instruct-INT4.onnx" and manifest["runtime"] == "onnxruntime"
    files = {str(p.relative_to(arm_bundle)) for p in arm_bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest_hashes(manifest)) == files
    assert {model, model + ".data", "tokenizer.json", "run.sh", "serve.sh", "runner/runner.json", "runner/__main__.py",
            "runner/edgeprune/runtimes/onnx/runner.py", "python/usr/bin/python3.11"} <= files
    assert not any(p.is_symlink() for p in arm_bundle.rglob("*"))  # verify refuses links
    assert not any(p.suffix == ".pyc" for p in arm_bundle.rglob("*"))
    toolchain = manifest["toolchain"]
    import onnxruntime

    assert toolchain["arch"] == "aarch64" and toolchain["runtime_version"] == f"onnxruntime {onnxruntime.__version__}"
    desc = subprocess.run(["file", "-L", str(arm_bundle / "python/usr/bin/python3.11")], capture_output=True,
                          text=True).stdout
    assert "ARM aarch64" in desc, desc
    config = json.loads((arm_bundle / "runner" / "runner.json").read_text())
    assert config["model"] == f"../{model}" and config["threads"] == 8 and config["answer_tokens"] == 100
    assert config["chat"]["user"][1] == "<|im_end|>\n<|im_start|>assistant\n" and config["stop"] == [2]
    for script in ("run.sh", "serve.sh"):
        path = arm_bundle / script
        assert path.stat().st_mode & stat.S_IXUSR and subprocess.run(["sh", "-n", str(path)]).returncode == 0
        assert '"$here/python/lib/ld-linux-aarch64.so.1"' in path.read_text()
    card = (arm_bundle / "README.md").read_text()
    assert "Quantization: INT4" in card and "the device needs Linux on aarch64, nothing else" in card


def test_run_sh_answers_under_qemu(arm_bundle, tmp_path):
    # run.sh execs the bundle's aarch64 loader; here qemu-aarch64 goes in front of it, as binfmt_misc would.
    prefix = " ".join(get_device("qemu-aarch64").tool([]))
    script = tmp_path / "run-qemu.sh"
    script.write_text((arm_bundle / "run.sh").read_text().replace("exec ", f"exec {prefix} ", 1)
                      .replace('here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)', f"here='{arm_bundle}'"))
    proc = subprocess.run(["sh", str(script), "What is the capital of France?", "-n", "8", "-t", "2", "--tokens"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert 0 < len(got["answer"]) <= 8 and got["versions"]["machine"] == "aarch64"


def test_verify_under_qemu_reads_the_devices_answer_with_the_hosts_logits(arm_bundle):
    proc = edgeprune("verify", str(arm_bundle), "--device", "qemu-aarch64", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["passed"] and result["runtime"] == "onnxruntime" and result["arch"] == "aarch64"
    assert re.fullmatch(r"python 3\.11\.\d+, machine aarch64, onnxruntime .*", result["programs"]["runner"])
    a = result["agreement"]
    assert a["failure"] == "" and a["positions"] >= 1 and a["max_gap"] <= a["gap_allowed"] == 0.1
    assert result["device_text"].strip() and result["host_text"].strip()
    assert result["slo"] is None and "emulated" in result["slo_skipped"]


def test_a_changed_byte_or_runner_fails_verification(arm_bundle, tmp_path):
    report = json.loads((arm_bundle / "report.json").read_text())
    copy = tmp_path / "flipped"
    shutil.copytree(arm_bundle, copy)
    data = copy / (report["artifact"] + ".data")
    flip_byte(data)
    proc = edgeprune("verify", str(copy), "--device", "qemu-aarch64")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{data.name} does not match its sha256" in proc.stderr and "python/" not in proc.stderr

    # A runner that answers with the second-best token, its new hash in the manifest: the checksums
    # pass, and the host's reading of the device's answer does not.
    changed = tmp_path / "changed"
    shutil.copytree(arm_bundle, changed)
    runner = changed / "runner/edgeprune/runtimes/onnx/runner.py"
    greedy, second = "        return int(np.argmax(logits))\n", "        return int(np.argsort(logits)[-2])\n"
    assert greedy in runner.read_text()
    runner.write_text(runner.read_text().replace(greedy, second))
    rehash(changed, "runner/edgeprune/runtimes/onnx/runner.py")
    proc = edgeprune("verify", str(changed), "--device", "qemu-aarch64")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the device's greedy answer is not the host's within tolerance: at token " in proc.stderr, proc.stderr


def test_run_sh_and_serve_sh_answer_on_this_machine(native_bundle):
    run = subprocess.run([str(native_bundle / "run.sh"), "Name a colour.", "-n", "6", "--tokens"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["versions"]["machine"] == "x86_64" and 0 < len(got["answer"]) <= 6
    text = subprocess.run([str(native_bundle / "run.sh"), "Name a colour.", "-n", "6"], capture_output=True,
                          text=True, timeout=300, check=True).stdout
    server = subprocess.Popen([str(native_bundle / "serve.sh"), "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        request = urllib.request.Request(f"{line.split()[-1]}/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6}).encode(),
            {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            body = json.loads(response.read())
        assert body["choices"][0]["message"]["content"] + "\n" == text
        assert body["usage"]["completion_tokens"] == len(got["answer"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert not any(p.suffix == ".pyc" for p in native_bundle.rglob("*"))  # run with -B: the bundle stays intact


def test_verify_over_ssh_times_the_slo_with_the_bundles_runner(native_bundle, sshd, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(native_bundle, bundle)
    proc = edgeprune("verify", str(bundle), "--device", sshd.url, "--identity", str(sshd.identity), "--known-hosts",
                     str(sshd.known_hosts), "-r", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["passed"] and result["agreement"]["failure"] == "" and result["written_back"]
    slo = result["slo"]
    assert slo["verdict"] == "meets" and slo["device"] == sshd.url and slo["summary"]["repetitions"] == 2
    assert slo["benchmark"]["runner"] == "bundle runner (onnxruntime)" and slo["peak_rss_bytes"] > 1 << 20
    assert slo["runtime"].startswith("onnxruntime ")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name, digest in manifest_hashes(manifest).items():  # the figures written back, the bundle intact
        assert sha256_file(bundle / name) == digest, name

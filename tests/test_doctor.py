"""`edgeprune doctor` and the fixed instruction-set baseline the host runtime is compiled for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from edgeprune.doctor import _onnxruntime_decode, judge_runtime_build, run_selftest, runtime_features
from edgeprune.runtimes.llamacpp import system_info
from edgeprune.toolchain import baseline

AMX_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
            "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
            "OPENMP = 1 | REPACK = 1 |")


def doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeprune", "doctor", *args], capture_output=True, text=True,
                          env=env)


def test_the_installed_runtime_is_built_for_the_baseline_not_this_cpu():
    features = runtime_features(system_info())
    assert not any(v for k, v in features.items() if k.startswith("AMX")), features
    if baseline.machine() == "x86_64" and baseline.host_baseline() == "x86-64-v3":
        # x86-64-v3 and nothing above it, whatever this CPU has (an AVX-512 CPU still gets AVX2 kernels).
        assert features["AVX2"] and features["FMA"] and features["F16C"] and not features.get("AVX512"), features


def test_baseline_options_never_tune_for_the_build_machine():
    for level in baseline.X86_LEVELS:
        options = baseline.host_cmake_options(level)
        assert options["GGML_NATIVE"] == "OFF" and options["CMAKE_C_FLAGS"] == f"-march={level}"
        assert all(options[f"GGML_AMX_{k}"] == "OFF" for k in ("TILE", "INT8", "BF16"))
    assert baseline.host_cmake_options("armv8-a")["GGML_CPU_ARM_ARCH"] == "armv8-a"
    # The wheel directory's name changes with the options, so a changed recipe is never a stale wheel.
    assert baseline.wheel_key("0.3.36", "x86-64-v3") != baseline.wheel_key("0.3.36", "x86-64-v2")


def test_a_cpu_without_the_baseline_is_named():
    old_cpu = "processor : 0\nflags : fpu sse sse2 ssse3 sse4_1 sse4_2 avx popcnt\n"
    assert baseline.missing_cpu_features("x86-64-v3", old_cpu) == ["avx2", "bmi2", "fma", "f16c"]
    assert baseline.missing_cpu_features("x86-64-v2", old_cpu) == []
    graviton1 = "processor : 0\nFeatures : fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\n"
    assert baseline.missing_cpu_features("armv8.2-a+dotprod", graviton1) == ["asimddp"]
    ok, detail, fix = judge_runtime_build("CPU : AVX = 1 | AVX2 = 1 |", ["avx2"])
    assert not ok and "lacks avx2" in detail and baseline.BASELINE_ENV in fix


def test_an_amx_build_is_refused_with_the_fix():
    ok, detail, fix = judge_runtime_build(AMX_INFO, [])
    assert not ok and "AMX" in detail and "make install" in fix


@pytest.mark.slow
def test_doctor_runtime_check_passes_here(cache_dir):
    proc = doctor("--runtime-only", "--json", "--cache-dir", str(cache_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    findings = {f["name"]: f for f in json.loads(proc.stdout)}
    assert set(findings) == {"python packages", "embedded model", "runtime build", "runtime decode"}
    assert all(f["ok"] for f in findings.values()), findings
    assert "Q4_K_M mean KLD" in findings["runtime decode"]["detail"]


@pytest.mark.slow
def test_missing_tools_are_named_with_their_fix_and_exit_1(cache_dir, tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # nothing on PATH: every tool is missing
    proc = doctor("--cache-dir", str(cache_dir), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("MISSING  ninja") for line in lines), proc.stdout
    assert "sudo apt-get install ninja-build" in proc.stdout
    assert "sudo apt-get install qemu-user" in proc.stdout
    assert any(line.startswith("ok       runtime decode") for line in lines), proc.stdout
    assert any(line.startswith("ok       onnxruntime decode") for line in lines), proc.stdout


@pytest.mark.slow
def test_a_runtime_crash_is_a_finding_not_the_end_of_doctor(cache_dir):
    """llama.cpp's process under the decode test is killed with SIGSEGV, as a broken kernel would: doctor says so."""
    killed = []

    def kill_the_child() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for child in psutil.Process().children(recursive=True):
                if "edgeprune.runtimes.isolated" in child.cmdline():
                    os.kill(child.pid, signal.SIGSEGV)
                    killed.append(child.pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_child)
    killer.start()
    ok, detail, fix = run_selftest(cache_dir)
    killer.join()
    assert killed, "llama.cpp's process was never seen"
    assert not ok and detail == "llama.cpp crashed (SIGSEGV) decoding a quantized model", detail
    assert "make install" in fix


def test_the_onnx_check_measures_error_against_the_references_spread():
    import numpy as np

    from edgeprune.runtimes.onnx.selftest import relative_error

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(8, 1000))
    assert relative_error(reference, reference) == 0.0
    assert relative_error(reference, reference + 0.1 * rng.normal(size=reference.shape)) == pytest.approx(0.1, rel=0.1)
    assert relative_error(reference, rng.normal(size=reference.shape)) == pytest.approx(2 ** 0.5, rel=0.1)
    assert relative_error(reference, np.full_like(reference, np.nan)) == float("inf")


@pytest.mark.slow
def test_an_onnxruntime_crash_is_a_finding(tmp_path):
    """The ONNX decode test's process is killed with SIGSEGV, as a broken kernel would: doctor says so."""
    killed = []

    def kill_the_child() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for child in psutil.Process().children(recursive=True):
                if "edgeprune.runtimes.onnx.selftest" in child.cmdline():
                    os.kill(child.pid, signal.SIGSEGV)
                    killed.append(child.pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_child)
    killer.start()
    ok, detail, fix = _onnxruntime_decode(tmp_path)
    killer.join()
    assert killed, "the ONNX decode test's process was never seen"
    assert not ok and detail == "onnxruntime crashed (SIGSEGV) running a quantized model", detail
    assert "llama.cpp runtime" in fix

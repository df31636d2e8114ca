import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_llama
from edgeprune.config import SLO, DeviceConfig
from edgeprune.devices import get_device, host_arch
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, export_gguf
from edgeprune.measure import Workload
from edgeprune.models.embedded import embedded_gguf
from edgeprune.quantize import quantize
from edgeprune.runtimes.base import Programs
from edgeprune.runtimes.llamacpp.tools import ToolsRunner
from edgeprune.runtimes.registry import get_runtime
from edgeprune.search.budget import EMULATED, Budget


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, embedded_tokenizer_spec) -> Path:
    d = tmp_path_factory.mktemp("dev")
    f32 = d / "tiny-f32.gguf"
    export_gguf(tiny_llama(tied=True), embedded_tokenizer_spec, f32, "F32", Provenance("t", "0" * 64, {}), "t")
    q = d / "tiny-q4km.gguf"
    quantize(f32, q, "Q4_K_M", threads=2)
    # Width 64 is no multiple of 256, so llama.cpp falls back from K-quants to Q5_0/Q8_0 here.
    assert q.stat().st_size < f32.stat().st_size / 2
    return q


def timer(device: str | DeviceConfig = "local", ram_cap: int | None = None):
    return get_runtime().runner(get_device(device), ram_cap=ram_cap)


def test_local_benchmark_record(tiny_gguf):
    device = get_device("local")
    assert device.arch == host_arch() and device.cores >= 1
    workload = Workload(prompt=tuple(range(100, 132)), answer_tokens=16, threads=1, warmup=1, repetitions=3)
    record = get_runtime().runner(device).benchmark(tiny_gguf, workload, baseline=tiny_gguf)
    s = record.summary
    assert s["repetitions"] == 3 and len(record.runs) == len(record.baseline_runs) == 3
    assert s["latency_p50_s"] <= s["latency_p90_s"] <= s["latency_p99_s"] <= s["latency_max_s"]
    assert s["ttft_p50_s"] < s["latency_p50_s"]
    assert s["decode_tok_s_p50"] > 0 and s["prefill_tok_s_p50"] > 0
    assert 1 << 20 < record.peak_rss_bytes < 4 << 30  # the runner alone, not the parent's torch
    assert 0.3 < record.speedup < 3.0  # the same model against itself
    assert "llama-cpp-python" in record.runtime and record.threads == 1
    pooled = record.pooled(record)
    assert len(pooled.runs) == 6 and pooled.summary["repetitions"] == 6


def test_a_ram_cap_judges_the_candidate_alone_not_with_its_baseline_loaded(tiny_gguf):
    # The embedded model (about 100 MB) as a baseline heavier than the cap; the tiny candidate under it.
    alone = timer().benchmark(tiny_gguf, WORKLOAD)
    heavy = timer().benchmark(embedded_gguf(), WORKLOAD)
    assert heavy.peak_rss_bytes > alone.peak_rss_bytes + (60 << 20)
    cap = alone.peak_rss_bytes + (30 << 20)
    record = timer(DeviceConfig(ram_cap=True), cap).benchmark(tiny_gguf, WORKLOAD, baseline=embedded_gguf())
    assert not record.ram_cap_exceeded and record.one_model_per_process
    assert len(record.runs) == len(record.baseline_runs) == WORKLOAD.repetitions
    assert record.peak_rss_bytes < cap
    assert record.speedup > 0 and record.tokens == alone.tokens


def test_models_too_big_to_hold_together_alternate_one_per_process(tiny_gguf, monkeypatch):
    import edgeprune.devices.local as local

    together = timer().benchmark(tiny_gguf, WORKLOAD, baseline=tiny_gguf)
    assert not together.one_model_per_process
    # As if the machine had less free memory than the two files: 8B Q4_K_M pairs on a 16 GB laptop.
    monkeypatch.setattr(local, "memory_headroom", lambda: 2 * tiny_gguf.stat().st_size)
    apart = timer().benchmark(tiny_gguf, WORKLOAD, baseline=tiny_gguf)
    assert apart.one_model_per_process and apart.load_s > 0
    assert len(apart.runs) == len(apart.baseline_runs) == WORKLOAD.repetitions
    assert 0.3 < apart.speedup < 3.0 and apart.tokens == together.tokens


def _target(tmp_path, ceiling_gib: float, device: str = "") -> Path:
    path = tmp_path / "tight.toml"
    path.write_text(f"""description = "a device with less RAM than the model needs"
[hardware]
arch = "{host_arch()}"
cores = 1
ram_gib = 1
memory_bandwidth_gbs = 10
[slo]
prompt_tokens = 16
answer_tokens = 8
latency_budget_s = 60
ram_ceiling_gib = {ceiling_gib}
[toolchain]
triple = "x86_64-linux-gnu"
cpu_flags = "x86-64-v3"
{device}""")
    return path


WORKLOAD = Workload(prompt=tuple(range(100, 116)), answer_tokens=8, threads=1, warmup=1, repetitions=2)


def test_ram_ceiling_below_the_models_needs_is_an_over_budget_verdict(tiny_gguf):
    slo = SLO(prompt_tokens=16, answer_tokens=8, latency_budget_s=60, ram_ceiling_gib=0.01)
    record = timer().benchmark(tiny_gguf, WORKLOAD)
    assert record.peak_rss_bytes > 0.01 * (1 << 30)
    assert Budget.from_slo(slo).verdict(record) == "over RAM ceiling"
    assert Budget.from_slo(slo.model_copy(update={"ram_ceiling_gib": 4})).verdict(record) == "meets"


def test_ram_cap_kills_the_run_and_gives_the_verdict_not_a_crash(tiny_gguf):
    # 40 MiB: below what the runner needs to load llama.cpp and the model
    record = timer(DeviceConfig(ram_cap=True), 40 << 20).benchmark(tiny_gguf, WORKLOAD)
    assert record.ram_cap_exceeded and record.runs == [] and record.peak_rss_bytes > 40 << 20
    budget = Budget(latency_s=60, speedup=None, ram_bytes=40 << 20)
    assert budget.verdict(record) == "over RAM ceiling"
    assert budget.shortfall(record) == float("inf")


def test_bench_with_ram_cap_reports_the_overrun(tiny_gguf, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "bench", str(tiny_gguf), "-t",
                           str(_target(tmp_path, 0.04)), "--ram-cap", "-q"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Killed:     over the RAM cap" in proc.stdout and "Verdict:    over RAM ceiling" in proc.stdout


def test_bench_prints_the_record_and_judges_it(tiny_gguf, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "bench", str(tiny_gguf), "-t",
                           str(_target(tmp_path, 2)), "-r", "2", "--json", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verdict"] == "meets" and out["benchmark"]["summary"]["repetitions"] == 2
    assert out["benchmark"]["cpus"] == [sorted(os.sched_getaffinity(0))[0]]  # pinned: 1 thread, 1 core
    assert out["benchmark"]["threads"] == 1 and out["benchmark"]["peak_rss_bytes"] > 0
    # decode speed against this machine's measured bandwidth / bytes read per token
    roofline = out["roofline"]
    assert 0 < roofline["fraction"] < 1.5 and roofline["bandwidth_source"].startswith("measured")
    assert out["estimate_on_target"] is None  # measured on the target's own arch and core count


def test_bench_estimates_the_target_from_a_stand_in(tiny_gguf, tmp_path):
    target = _target(tmp_path, 2).read_text().replace("cores = 1", "cores = 8").replace("memory_bandwidth_gbs = 10",
                                                                                         "memory_bandwidth_gbs = 25")
    (tmp_path / "big.toml").write_text(target)
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "bench", str(tiny_gguf), "-t", str(tmp_path / "big.toml"),
                           "-r", "2", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Roofline:   decode at" in proc.stdout
    estimate = next(line for line in proc.stdout.splitlines() if line.startswith("Estimate:"))
    assert "estimated for target big" in estimate and "not a measurement" in estimate and "verified" not in estimate


def test_device_options_that_do_not_fit_the_device_are_refused(tiny_gguf, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "bench", str(tiny_gguf), "-t",
                           str(_target(tmp_path, 2)), "--identity", str(tmp_path / "k")], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "identity apply to ssh:// devices only" in proc.stderr
    with pytest.raises(ValueError, match="ram_cap applies to the local device only"):
        DeviceConfig(url="qemu-aarch64", ram_cap=True)
    with pytest.raises(ValueError, match="none of local"):
        DeviceConfig(url="telnet://plc")


@pytest.mark.slow
def test_qemu_device_times_the_arm_build_marked_emulated(tiny_gguf, cache_dir):
    from edgeprune.config import load_target
    from edgeprune.toolchain import ensure_binaries, spec_for

    device = get_device("qemu-aarch64")
    binaries = Programs(ensure_binaries(spec_for(load_target("arm16g")), cache_dir).bin, "aarch64")
    runner = get_runtime().runner(device, binaries)
    assert isinstance(runner, ToolsRunner)
    record = runner.benchmark(tiny_gguf, WORKLOAD)
    assert record.emulated and record.runner == "llama-bench" and len(record.runs) == 2
    assert Budget(latency_s=1000, speedup=None, ram_bytes=None).verdict(record) == EMULATED


def test_a_device_without_python_needs_binaries_of_its_architecture(tmp_path):
    device = get_device("qemu-aarch64")
    assert get_runtime().needs_binaries(device) and not get_runtime().needs_binaries(get_device("local"))
    with pytest.raises(EdgepruneError, match="none were given"):
        get_runtime().runner(device)
    with pytest.raises(EdgepruneError, match="built for x86_64, but qemu-aarch64 is aarch64"):
        get_runtime().runner(device, Programs(tmp_path, "x86_64"))


def test_unknown_runtime_is_a_clear_error():
    with pytest.raises(EdgepruneError, match="Unknown runtime 'tensorrt': edgeprune runs models with llama.cpp"):
        get_runtime("tensorrt")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(EdgepruneError, match="Unknown device 'carrier-pigeon://x'"):
        get_device("carrier-pigeon://x")


def test_quantize_rejects_unknown_type(tiny_gguf, tmp_path):
    with pytest.raises(EdgepruneError, match="Unknown quantization type"):
        quantize(tiny_gguf, tmp_path / "x.gguf", "Q9_Z", threads=1)

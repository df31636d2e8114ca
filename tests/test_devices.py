from pathlib import Path

import pytest

from conftest import tiny_llama
from edgeprune.devices import get_device, host_arch
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, export_gguf
from edgeprune.measure import Workload
from edgeprune.quantize import quantize


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


def test_local_benchmark_record(tiny_gguf):
    device = get_device("local")
    assert device.arch == host_arch() and device.cores >= 1
    workload = Workload(prompt=tuple(range(100, 132)), answer_tokens=16, threads=1, warmup=1, repetitions=3)
    record = device.benchmark(tiny_gguf, workload, baseline=tiny_gguf)
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


def test_unknown_device_is_a_clear_error():
    with pytest.raises(EdgepruneError, match="Unknown device 'carrier-pigeon://x'"):
        get_device("carrier-pigeon://x")


def test_quantize_rejects_unknown_type(tiny_gguf, tmp_path):
    with pytest.raises(EdgepruneError, match="Unknown quantization type"):
        quantize(tiny_gguf, tmp_path / "x.gguf", "Q9_Z", threads=1)

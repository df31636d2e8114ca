"""ONNX Runtime behind the runtime seam: its traffic model counts what the GGUF's counts, its files
are timed by the benchmark worker (alternating with a llama.cpp baseline in one process), and what
it cannot serve yet is refused in one sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import edgeprune

from conftest import tiny_llama
from edgeprune.config import load_target
from edgeprune.devices import get_device
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, write_gguf
from edgeprune.latency.traffic import ModelTraffic
from edgeprune.measure import Workload
from edgeprune.models.weights import ModuleStore
from edgeprune.prune import Plan
from edgeprune.runtimes.onnx import session
from edgeprune.runtimes.onnx.llama import OnnxWeights, write_onnx
from edgeprune.runtimes.registry import get_runtime

C = tuple(range(128))
# Per-layer heads and widths, a layer without attention; none without its MLP (a GGUF gives such a
# layer a placeholder MLP the ONNX graph does without).
PLAN = Plan(drop_layers=(1,), heads=((0, (1, 3)), (2, ())), ffn=((0, C[:100]), (3, C[::3])))
PROVENANCE = Provenance("tiny", "0" * 64, {})


@pytest.fixture(scope="module")
def files(tmp_path_factory, embedded_tokenizer_spec):
    tmp = tmp_path_factory.mktemp("onnx-runtime")
    store = ModuleStore(tiny_llama(tied=False))
    out = {}
    for name, weights in (("fp32", OnnxWeights()), ("int4", OnnxWeights(bits=4))):
        out[name] = tmp / f"{name}.onnx"
        write_onnx(store, PLAN, out[name], weights, PROVENANCE, "tiny")
    out["gguf"] = tmp / "f32.gguf"
    write_gguf(store, PLAN, embedded_tokenizer_spec, out["gguf"], "F32", PROVENANCE, "tiny")
    return out


def test_the_traffic_model_counts_what_the_ggufs_counts(files):
    onnx, gguf = get_runtime("onnxruntime").traffic(files["fp32"]), ModelTraffic.from_gguf(files["gguf"])
    assert onnx.flops_per_token == gguf.flops_per_token and onnx.output_flops == gguf.output_flops
    assert onnx.attention_flops_per_position == gguf.attention_flops_per_position
    assert onnx.kv_bytes_per_position == 2 * gguf.kv_bytes_per_position  # fp32 cache against F16
    assert onnx.parameters == gguf.parameters and not onnx.tied
    # fp32 weights: what a token reads is the file but the embedding table, less one row of it.
    assert onnx.weight_bytes_per_token == pytest.approx(gguf.weight_bytes_per_token, rel=1e-3)
    int4 = get_runtime("onnxruntime").traffic(files["int4"])
    assert int4.flops_per_token == onnx.flops_per_token and int4.parameters == onnx.parameters
    assert int4.weight_bytes_per_token < 0.4 * onnx.weight_bytes_per_token


def test_an_onnx_candidate_is_timed_alternating_with_a_llama_cpp_baseline(files):
    prompt = (1, 504, 2432, 28, 3300, 17, 33, 34)
    workload = Workload(prompt, 6, threads=1, warmup=1, repetitions=3)
    with get_device("local") as device:
        record = get_runtime("onnxruntime").runner(device).benchmark(files["int4"], workload, files["gguf"])
    assert len(record.runs) == len(record.baseline_runs) == 3
    assert all(r["decode_tok_s"] > 0 and r["latency_s"] > r["ttft_s"] > 0 for r in record.runs)
    assert record.runtime.startswith("onnxruntime ") and "CPUExecutionProvider" in record.system_info
    assert record.runner == "onnxruntime-python"
    assert record.tokens == session.greedy(files["int4"], list(prompt), 6, threads=1)
    assert record.peak_rss_bytes > 0 and record.speedup is not None and np.isfinite(record.speedup)


def test_a_search_times_onnx_candidates_only_where_edgeprunes_python_is(tmp_path):
    runtime = get_runtime("onnxruntime")
    runtime.check_target_programs(load_target("arm16g"), tmp_path)  # a bundle for aarch64 can be made
    with get_device("qemu-aarch64") as device, pytest.raises(EdgepruneError, match="has no Python"):
        runtime.runner(device)


def test_bench_times_an_onnx_file_beside_its_baseline_and_names_what_is_missing(files, tmp_path):
    model = tmp_path / "m.onnx"
    get_runtime("onnxruntime").format.copy(files["int4"], model)
    proc = edgeprune("bench", str(model), "-t", "demo", "--baseline", str(files["gguf"]), "-r", "2", "--json")
    assert proc.returncode in (0, 1), proc.stderr  # within budget or not: this CPU's business
    result = json.loads(proc.stdout)
    record = result["benchmark"]
    assert record["runner"] == "onnxruntime-python" and len(record["runs"]) == len(record["baseline_runs"]) == 2
    assert record["summary"]["paired_speedup"] > 0 and result["verdict"] in ("meets", "short of the speed-up")
    assert result["size_bytes"] == sum(f.stat().st_size for f in (model, tmp_path / "m.onnx.data"))
    assert 0 < result["roofline"]["fraction"]
    # Without a baseline the prompt needs the tokenizer beside the model (a bundle's, or prune's hf/).
    alone = edgeprune("bench", str(model), "-t", "demo", "-r", "1")
    assert alone.returncode == 2 and "has no tokenizer beside it" in alone.stderr and "Traceback" not in alone.stderr
    (tmp_path / "m.onnx.data").unlink()
    gone = edgeprune("bench", str(model), "-t", "demo", "--baseline", str(files["gguf"]))
    assert gone.returncode == 2 and "m.onnx.data does not exist" in gone.stderr
    other = edgeprune("bench", str(tmp_path / "m.bin"), "-t", "demo")
    assert other.returncode == 2 and "runs .gguf (llama.cpp), .onnx (onnxruntime) files" in other.stderr

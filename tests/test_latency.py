"""The latency model: byte and FLOP accounting from GGUFs, the fitted correction, transfer to a
target, and predictions fitted to llama.cpp measurements on this machine.

How close the predictions come is a property of the CPU and its load, so it lives in
benchmarks/latency.py (decode median 5.8% / max 24.8% on the embedded model's candidates where it
was written; -38% to +69% for Q8_0 random Llamas on an Intel Xeon with AMX). The tests here fit on
a real measurement and check what does not depend on the CPU's speed: the fit reproduces what it
was fitted on, and predictions order models by the bytes they read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_llama
from edgeprune.config import Hardware
from edgeprune.devices import get_device
from edgeprune.export import Provenance, export_gguf
from edgeprune.latency import (
    Calibration,
    HostProfile,
    LatencyModel,
    ModelTraffic,
    Observation,
    Prediction,
    hopeless,
    host_profile,
    measure_host,
    roofline_fraction,
)
from edgeprune.measure import Workload, summarize
from edgeprune.prune import Plan, apply_plan
from edgeprune.quantize import quantize
from edgeprune.runtimes.registry import get_runtime

# tiny_llama: hidden 64, FFN 128, 4 layers, 4 heads in 2 KV groups of head_dim 16, vocab 49152.
H, FFN, LAYERS, VOCAB, KV_DIM = 64, 128, 4, 49152, 2 * 16
ATTN_W = H * H + KV_DIM * H + KV_DIM * H + H * H  # q, k, v, o
MLP_W = 3 * FFN * H  # gate, up, down
EMBD = VOCAB * H
KV_PER_LAYER = 2 * 2 * 16 * 2  # (K + V) x 2 KV heads x head_dim 16 x 2 bytes (F16 cache)
THREADS = 1  # 2 threads on this shared 2-core machine stall at llama.cpp's barriers whenever another job runs


def _export(model, path, spec):
    export_gguf(model, spec, path, "F32", Provenance("t", "0" * 64, {}), "t")
    return path


# -- accounting ------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_and_flops_of_a_llama_gguf(tmp_path, embedded_tokenizer_spec, tied):
    path = _export(tiny_llama(tied=tied), tmp_path / "m.gguf", embedded_tokenizer_spec)
    t = ModelTraffic.from_gguf(path)
    layers = LAYERS * (ATTN_W + MLP_W + 2 * H)  # + attn_norm and ffn_norm
    # Untied: one embedding row, then the output matrix. Tied: token_embd is the output matrix, read whole.
    expected_elements = layers + H + (EMBD if tied else H + EMBD)  # + output_norm
    assert t.tied is tied
    assert t.weight_bytes_per_token == 4 * expected_elements  # F32
    assert t.flops_per_token == 2 * (LAYERS * (ATTN_W + MLP_W) + EMBD)
    assert t.output_flops == 2 * EMBD
    assert t.kv_bytes_per_position == LAYERS * KV_PER_LAYER
    assert t.kv_bytes_per_token(9) == 10 * LAYERS * KV_PER_LAYER
    assert t.decode_bytes(9) == t.weight_bytes_per_token + t.kv_bytes_per_token(9)
    assert t.attention_flops_per_position == LAYERS * 4 * 2 * (16 + 16)  # 4 heads x 2 x (q.k over K + p.v over V)
    assert t.parameters == layers + H + EMBD * (1 if tied else 2)
    assert t.file_bytes == path.stat().st_size
    # Prefill: the output layer for the last prompt token only, attention over 1 + 2 + ... + n positions.
    n = 10
    assert t.prefill_flops(n) == n * (t.flops_per_token - t.output_flops) + t.output_flops + \
        t.attention_flops_per_position * n * (n + 1) // 2


def test_removed_attention_and_mlp_of_a_deci_gguf(tmp_path, embedded_tokenizer_spec):
    plan = Plan(heads=((2, ()),), ffn=((1, ()),))  # layer 1 keeps attention only, layer 2 its MLP only
    path = _export(apply_plan(tiny_llama(tied=False), plan), tmp_path / "d.gguf", embedded_tokenizer_spec)
    t = ModelTraffic.from_gguf(path)
    placeholder = 3 * H  # our exporter's width-1 all-zero MLP under a kept attention
    matmul = 2 * (ATTN_W + MLP_W) + (ATTN_W + placeholder) + MLP_W
    norms = 3 * 2 * H + H  # layers 0, 1 (attn_norm + placeholder ffn_norm), 3: two each; layer 2: ffn_norm
    assert t.weight_bytes_per_token == 4 * (matmul + norms + H + H + EMBD)  # + output_norm, one row, output
    assert t.flops_per_token == 2 * (matmul + EMBD)
    assert t.kv_bytes_per_position == 3 * KV_PER_LAYER  # layer 2 has no attention: caches nothing
    assert t.attention_flops_per_position == 3 * 4 * 2 * (16 + 16)


def test_quantized_bytes_and_unchanged_flops(tmp_path, embedded_tokenizer_spec):
    f32 = _export(tiny_llama(tied=False), tmp_path / "f32.gguf", embedded_tokenizer_spec)
    q8 = tmp_path / "q8.gguf"
    quantize(f32, q8, "Q8_0", threads=2)
    t, ref = ModelTraffic.from_gguf(q8), ModelTraffic.from_gguf(f32)
    # Q8_0: blocks of 32 weights in 34 bytes (32 int8 + an F16 scale); norms stay F32.
    matrices = LAYERS * (ATTN_W + MLP_W) + H + EMBD  # one embedding row (64 = 2 blocks) + output
    assert t.weight_bytes_per_token == matrices * 34 // 32 + 4 * (LAYERS * 2 * H + H)
    assert (t.flops_per_token, t.kv_bytes_per_position, t.parameters) == \
        (ref.flops_per_token, ref.kv_bytes_per_position, ref.parameters)


# -- the model, on synthetic measurements -------------------------------------------------------


def _traffic(mib: float, gflop: float = 0.2, kv: int = 20_000) -> ModelTraffic:
    return ModelTraffic(name=f"{mib}MiB", weight_bytes_per_token=int(mib * (1 << 20)), flops_per_token=int(gflop * 1e9),
                        output_flops=int(gflop * 1e8), kv_bytes_per_position=kv, attention_flops_per_position=kv,
                        parameters=int(mib * (1 << 20)), file_bytes=int(mib * (1 << 20)), tied=True)


HOST = HostProfile(bandwidth_gbs=10.0, matmul_gflops=50.0, threads=1, cpu="test")
TRUE = Calibration(decode_efficiency=0.6, decode_overhead_s=0.5e-3, prefill_efficiency=0.7, prefill_overhead_s=0.0)


def _observe(model: LatencyModel, traffic: ModelTraffic, noise: float = 1.0, prompt: int = 64,
             answer: int = 100) -> Observation:
    p = model.predict(traffic, prompt, answer)
    summary = {"ttft_p50_s": p.ttft_s * noise, "decode_tok_s_p50": p.decode_tok_s / noise,
               "latency_p50_s": p.latency_s * noise}
    return Observation(traffic, prompt, answer, summary)


def test_prediction_is_the_roofline_with_the_defaults():
    model = LatencyModel.for_host(HOST)
    t = _traffic(100)
    p = model.predict(t, 64, 100)
    c = model.calibration
    step = (t.weight_bytes_per_token + t.kv_bytes_per_position * (64 + 49 + 1)) / 10e9 / c.decode_efficiency
    ttft = t.prefill_flops(64) / 50e9 / c.prefill_efficiency
    assert p.decode_tok_s == pytest.approx(1 / step)
    assert p.ttft_s == pytest.approx(ttft)
    assert p.latency_s == pytest.approx(ttft + 99 * step)
    assert (p.observations, p.estimated, p.label) == (0, False, "predicted")


def test_fit_recovers_known_efficiencies_and_overhead():
    truth = LatencyModel(10.0, 50.0, calibration=TRUE)
    obs = [_observe(truth, _traffic(m, g)) for m, g in ((20, 0.05), (60, 0.12), (150, 0.3), (300, 0.6))]
    fitted = LatencyModel.for_host(HOST).fitted(obs, fixed_costs=True).calibration
    assert fitted.observations == 4
    assert fitted.decode_efficiency == pytest.approx(0.6, rel=1e-6)
    assert fitted.decode_overhead_s == pytest.approx(0.5e-3, rel=1e-6)
    assert fitted.prefill_efficiency == pytest.approx(0.7, rel=1e-6)
    assert fitted.prefill_overhead_s == pytest.approx(0.0, abs=1e-9)


def test_fit_with_noise_stays_close():
    truth = LatencyModel(10.0, 50.0, calibration=TRUE)
    rng = np.random.default_rng(0)
    sizes = ((20, 0.05), (40, 0.08), (60, 0.12), (150, 0.3), (300, 0.6), (500, 1.0))
    obs = [_observe(truth, _traffic(m, g), float(rng.uniform(0.95, 1.05))) for m, g in sizes]
    model = LatencyModel.for_host(HOST).fitted(obs, fixed_costs=True)
    for m, g in ((30, 0.07), (400, 0.8)):
        want, got = truth.predict(_traffic(m, g), 64, 100), model.predict(_traffic(m, g), 64, 100)
        assert got.decode_tok_s == pytest.approx(want.decode_tok_s, rel=0.08)
        assert got.latency_s == pytest.approx(want.latency_s, rel=0.08)


def test_one_measurement_fits_an_efficiency_only():
    truth = LatencyModel(10.0, 50.0, calibration=Calibration(0.4, 0.0, 0.9, 0.0))
    model = LatencyModel.for_host(HOST).fitted([_observe(truth, _traffic(80))])
    c = model.calibration
    assert (c.observations, c.decode_overhead_s) == (1, 0.0)
    assert c.decode_efficiency == pytest.approx(0.4) and c.prefill_efficiency == pytest.approx(0.9)
    # Same sizes only: the fixed cost cannot be told from the slope, so efficiency only.
    same = LatencyModel.for_host(HOST).fitted([_observe(truth, _traffic(80), n) for n in (0.9, 1.1)], fixed_costs=True)
    assert same.calibration.decode_overhead_s == 0.0
    assert same.calibration.decode_efficiency == pytest.approx(0.4, rel=0.01)


def test_the_default_fit_is_the_median_ratio_and_ignores_an_outlier():
    truth = LatencyModel(10.0, 50.0, calibration=Calibration(0.4, 0.0, 0.9, 0.0))
    noise = (1.02, 0.98, 1.0, 1.6, 1.01)  # one candidate 60% slower than the roofline says (a slow kernel)
    obs = [_observe(truth, _traffic(m), n) for m, n in zip((30, 60, 90, 120, 150), noise, strict=True)]
    c = LatencyModel.for_host(HOST).fitted(obs).calibration
    assert c.decode_efficiency == pytest.approx(0.4, rel=0.021) and c.decode_overhead_s == 0.0
    assert c.prefill_efficiency == pytest.approx(0.9, rel=0.021)


def test_unusable_measurements_are_ignored():
    killed = Observation(_traffic(80), 64, 100, summarize([]))  # killed at the RAM cap: no runs
    model = LatencyModel.for_host(HOST)
    assert model.fitted([killed]) == model


def test_transfer_to_a_target_scales_bandwidth_and_labels_the_estimate():
    host = LatencyModel(10.0, 50.0, calibration=Calibration(0.5, 0.0, 0.8, 0.0, observations=3))
    target = Hardware(arch="aarch64", cores=8, ram_gib=16, memory_bandwidth_gbs=25.0)
    t = _traffic(100)
    here, there = host.predict(t, 64, 100), host.transfer(target).predict(t, 64, 100)
    # Same efficiencies, 2.5x the bandwidth; no compute figure: prefill scaled by the bandwidth ratio too.
    assert there.decode_tok_s == pytest.approx(2.5 * here.decode_tok_s)
    assert there.ttft_s == pytest.approx(here.ttft_s / 2.5)
    assert there.estimated and there.label == "estimated" and there.observations == 3
    assert "estimated" in there.describe() and "verified" not in there.describe().lower()
    assert "aarch64" in there.machine and not here.estimated
    given = host.transfer(target, compute_gflops=200.0).predict(t, 64, 100)
    assert given.ttft_s == pytest.approx(t.prefill_flops(64) / 200e9 / 0.8)
    assert given.decode_tok_s == pytest.approx(there.decode_tok_s)
    with pytest.raises(ValueError):
        host.transfer(target).fitted([_observe(host, t)])  # an estimate is never refitted as if measured


def test_roofline_fraction():
    t = _traffic(100, kv=1000)
    # 25 GB/s over 100 MiB per token: 238.4 tok/s at full bandwidth, so 119.2 tok/s is half of it.
    assert roofline_fraction(119.2, t, 25.0) == pytest.approx(119.2 * 100 * (1 << 20) / 25e9)
    assert 0.49 < roofline_fraction(119.2, t, 25.0) < 0.51
    # The same speed with a K/V cache of 100 positions to read as well is closer to the limit.
    assert roofline_fraction(119.2, t, 25.0, context=100) == pytest.approx(119.2 * (100 * (1 << 20) + 100_000) / 25e9)


def test_hopeless_needs_a_calibrated_model_and_a_clear_miss():
    def pred(latency: float, observations: int = 2) -> Prediction:
        return Prediction(ttft_s=0.1, decode_tok_s=50, latency_s=latency, machine="x", estimated=False,
                          observations=observations)

    assert hopeless(pred(5.0, observations=1), latency_budget_s=2.0) is None  # one measurement: never skip
    assert "over the 2 s budget" in hopeless(pred(2.5), latency_budget_s=2.0)
    assert hopeless(pred(2.3), latency_budget_s=2.0) is None  # within the 20% margin
    base = pred(3.0)
    assert hopeless(pred(2.9), speedup=1.3, baseline=base) is not None  # 1.03x predicted, 1.3x needed
    assert hopeless(pred(2.6), speedup=1.3, baseline=base) is None  # 1.15x: within the margin
    assert hopeless(pred(2.0), speedup=1.3, baseline=base, latency_budget_s=2.5) is None


# -- the host profile -----------------------------------------------------------------------


def test_host_profile_is_measured_once_and_cached(tmp_path, monkeypatch):
    threads_before = torch.get_num_threads()
    first = host_profile(tmp_path, 1)
    assert torch.get_num_threads() == threads_before
    assert 0.5 < first.bandwidth_gbs < 2000 and 0.5 < first.matmul_gflops < 100_000 and first.threads == 1
    files = list((tmp_path / "host").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["bandwidth_gbs"] == first.bandwidth_gbs

    def fail(threads):
        raise AssertionError("measured again")

    monkeypatch.setattr("edgeprune.latency.host.measure_host", fail)
    assert host_profile(tmp_path, 1) == first
    with pytest.raises(AssertionError):
        host_profile(tmp_path, 2)  # another thread count is another profile


def test_host_measurement_takes_seconds():
    import time

    t0 = time.perf_counter()
    measure_host(1)
    assert time.perf_counter() - t0 < 10


# -- predictions against measurements -------------------------------------------------------


def _random_llama(hidden: int, layers: int):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, head_dim=64,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05) if p.ndim > 1 else p.fill_(1.0)
    return model.eval()


def _fit_and_predict(fit_on, others, cache_dir) -> tuple[dict, dict]:
    """Fit on `fit_on` timed on this machine (alongside the first of `others`); predict every file.
    Returns (measured summary of `fit_on`, {file: Prediction})."""
    timer = get_runtime().runner(get_device("local"))
    workload = Workload(tuple(range(100, 164)), 48, THREADS, warmup=1, repetitions=3)
    prompt, answer = len(workload.prompt), workload.answer_tokens
    base = LatencyModel.for_host(host_profile(cache_dir, THREADS))
    record = timer.benchmark(others[0], workload, baseline=fit_on)
    measured = summarize(record.baseline_runs)
    model = base.fitted([Observation(ModelTraffic.from_gguf(fit_on), prompt, answer, measured)])
    return measured, {p: model.predict(ModelTraffic.from_gguf(p), prompt, answer) for p in [fit_on, *others]}


def _check_fit(fit_on, measured, predictions) -> None:
    """A one-measurement fit reproduces that measurement's decode speed (what it is fitted to)."""
    assert predictions[fit_on].decode_tok_s == pytest.approx(measured["decode_tok_s_p50"], rel=1e-6)
    assert predictions[fit_on].observations == 1 and not predictions[fit_on].estimated


@pytest.mark.slow
def test_predictions_order_random_llamas_by_size(tmp_path, embedded_tokenizer_spec, cache_dir):
    files = {}
    for hidden, layers in ((256, 2), (512, 4), (768, 8)):
        f32 = _export(_random_llama(hidden, layers), tmp_path / f"h{hidden}.f32.gguf", embedded_tokenizer_spec)
        files[hidden] = tmp_path / f"h{hidden}-l{layers}.Q8_0.gguf"
        quantize(f32, files[hidden], "Q8_0", threads=2)
        f32.unlink()
    measured, predicted = _fit_and_predict(files[512], [files[256], files[768]], cache_dir)
    _check_fit(files[512], measured, predicted)
    decode = [predicted[files[h]].decode_tok_s for h in (256, 512, 768)]
    latency = [predicted[files[h]].latency_s for h in (256, 512, 768)]
    assert decode[0] > decode[1] > decode[2] and latency[0] < latency[1] < latency[2], predicted


@pytest.fixture(scope="module")
def embedded_depths(embedded_reference, cache_dir):
    """The embedded model's Q4_K_M, unpruned and with 6 and 12 layers removed (cached stages)."""
    from edgeprune.pipeline import CandidateModel
    from edgeprune.quantize import QuantSpec
    from edgeprune.stages import StageRunner

    runner = StageRunner(cache_dir / "stages")
    plans = {0: Plan(), 6: Plan(drop_layers=tuple(range(20, 26))), 12: Plan(drop_layers=tuple(range(14, 26)))}
    stages = {k: CandidateModel(embedded_reference, plan, QuantSpec("Q4_K_M", imatrix=False), None, 2)
              for k, plan in plans.items()}
    return {k: stage.file(runner.run(stage)) for k, stage in stages.items()}


@pytest.mark.slow
def test_predictions_of_shallower_embedded_models(embedded_depths, cache_dir):
    measured, predicted = _fit_and_predict(embedded_depths[0], [embedded_depths[6], embedded_depths[12]], cache_dir)
    _check_fit(embedded_depths[0], measured, predicted)
    speedup = {k: predicted[embedded_depths[0]].latency_s / predicted[embedded_depths[k]].latency_s for k in (6, 12)}
    # Fewer layers read fewer bytes, but the 49k-token output layer is read whatever the depth: the
    # speed-up stays below the share of layers removed (30/24 and 30/18).
    assert 1.0 < speedup[6] < speedup[12], speedup
    assert speedup[6] < 30 / 24 and speedup[12] < 30 / 18, speedup

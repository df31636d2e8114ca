"""Runtime settings chosen by measurement (search/tuning.py) and llama.cpp's settings
(runtimes/llamacpp/settings.py): the decision rule on small arrays, the settings' three spellings,
and a real tuning run through the benchmark worker on the embedded model."""

from __future__ import annotations

import json

import pytest

from edgeprune.evaluate import Quality
from edgeprune.measure import Workload
from edgeprune.report import _settings_lines
from edgeprune.runtimes.llamacpp.settings import LlamaSettings, space
from edgeprune.runtimes.threads import thread_counts
from edgeprune.search.tuning import MAX_LOSSY_KLD_RISE, MIN_GAIN, Tuning, better, lossy_check, paired, tune


def _runs(*latencies: float) -> list[dict[str, float]]:
    return [{"latency_s": x, "decode_tok_s": 1 / x, "ttft_s": x / 10} for x in latencies]


def test_paired_speedup_is_the_median_of_ratios_taken_side_by_side():
    speedup, wins = paired(_runs(1.0, 2.0, 1.0, 1.0), _runs(1.1, 2.2, 0.9, 1.2))
    assert speedup == pytest.approx(1.1) and wins == 0.75


@pytest.mark.parametrize(("speedup", "wins", "kept"), [
    (1.0 + MIN_GAIN, 0.75, True),
    (1.0 + MIN_GAIN / 2, 1.0, False),  # within the noise of one machine
    (1.5, 0.5, False),  # large, but not consistent
])
def test_a_value_replaces_the_current_one_only_by_a_clear_consistent_margin(speedup, wins, kept):
    assert better(speedup, wins) is kept


@pytest.mark.parametrize(("rise", "ships"), [(MAX_LOSSY_KLD_RISE / 2, True), (MAX_LOSSY_KLD_RISE * 2, False)])
def test_a_lossy_setting_ships_only_if_the_picks_quality_holds_with_it(rise, ships):
    default = {"threads": 2, "flash_attn": "off", "kv_cache": "f16"}
    chosen = {"threads": 2, "flash_attn": "on", "kv_cache": "q8_0"}
    searched = Quality(perplexity=20.0, mean_kld=0.30, top1_agreement=0.80, positions=1000)
    with_q8 = Quality(perplexity=20.1, mean_kld=0.30 + rise, top1_agreement=0.79, positions=1000)

    checked = lossy_check(Tuning(chosen, default), {"kv_cache": "q8_0"}, searched, with_q8)

    # Turned down, only the lossy setting goes back: flash attention won on its own timing.
    assert checked.chosen == (chosen if ships else chosen | {"kv_cache": "f16"})
    record = json.loads(json.dumps(checked.to_dict()))["lossy_check"]
    assert record["kept"] is ships and record["kld"] == pytest.approx(0.30 + rise) and record["kld_as_searched"] == 0.30
    text = "\n".join(_settings_lines(checked.to_dict()))
    assert "kv_cache q8_0 changes the output" in text and ("not shipped" in text) is not ships
    skipped = Tuning(default, default, skipped=[{"setting": "kv_cache", "value": "q8_0", "why": "needs | this"}])
    assert "| kv_cache q8_0 | not timed: needs \\| this |" in "\n".join(_settings_lines(skipped.to_dict()))


def test_thread_counts_start_with_every_core():
    assert thread_counts(1) == (1,)
    assert thread_counts(2) == (2, 1)
    assert thread_counts(4) == (4, 3, 2, 1)
    assert thread_counts(16) == (16, 15, 8, 4)
    assert thread_counts(6) == (6, 5, 3, 1)


def test_llama_settings_spell_the_same_everywhere():
    import llama_cpp

    s = LlamaSettings.of({"flash_attn": "on", "ubatch": 256, "kv_cache": "q8_0"}, threads=3)
    assert s.cli_args() == ["-t", "3", "-fa", "on", "-ub", "256", "-ctk", "q8_0", "-ctv", "q8_0", "-lm", "none"]
    assert s.context_kwargs(n_batch=100) == {"n_threads": 3, "n_threads_batch": 3, "flash_attn": True,
                                             "n_batch": 100, "n_ubatch": 100, "type_k": llama_cpp.GGML_TYPE_Q8_0,
                                             "type_v": llama_cpp.GGML_TYPE_Q8_0, "use_mmap": False}
    assert LlamaSettings(2).context_kwargs(8)["type_k"] == llama_cpp.GGML_TYPE_F16
    assert LlamaSettings.of(s.to_dict(), threads=8) == s
    assert s.lossy() == {"kv_cache": "q8_0"} and LlamaSettings(2).lossy() == {}
    assert {k: v[0] for k, v in space(4).items()} == LlamaSettings(4).to_dict()  # defaults first
    with pytest.raises(ValueError, match="no setting kv_type"):
        LlamaSettings.of({"kv_type": "q8_0"}, 2)
    with pytest.raises(ValueError, match="out of range"):
        LlamaSettings.of({"flash_attn": "auto"}, 2)
    with pytest.raises(ValueError, match="only with flash attention on"):
        LlamaSettings.of({"kv_cache": "q8_0"}, 2)


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory, embedded_reference):
    from edgeprune.export import Provenance
    from edgeprune.export.gguf_llama import write_gguf
    from edgeprune.prune import Plan
    from edgeprune.quantize.llamacpp import quantize

    root = tmp_path_factory.mktemp("tuning")
    f16 = root / "model-F16.gguf"
    write_gguf(embedded_reference.weights, Plan(), embedded_reference.tokenizer_spec, f16, "F16",
               Provenance("embedded", embedded_reference.sha256, {}), "embedded")
    out = root / "model-Q4_K_M.gguf"
    quantize(f16, out, "Q4_K_M", threads=2)
    return out


def test_tune_times_every_value_against_the_best_so_far_and_keeps_only_clear_wins(q4_model):
    """Real timings through the benchmark worker: which value wins depends on the machine and its
    load, so only the bookkeeping is asserted."""
    from edgeprune.devices import get_device
    from edgeprune.devices.base import DeviceConfig
    from edgeprune.runtimes.registry import get_runtime

    runtime = get_runtime("llama.cpp")
    timer = runtime.runner(get_device(DeviceConfig(url="local")))
    workload = Workload(tuple(range(100, 164)), 16, threads=2, warmup=1, repetitions=4)
    grid = {"threads": (2, 1), "flash_attn": ("off", "on"), "kv_cache": ("f16", "q8_0")}
    tuning = tune(timer, q4_model, workload, grid, lambda settings: runtime.settings_gap(settings, 2, q4_model))

    assert tuning.default == {"threads": 2, "flash_attn": "off", "kv_cache": "f16"}
    tried = [(t.setting, t.value) for t in tuning.trials]
    # A q8_0 KV cache needs flash attention: timed only if flash attention won, else skipped, saying why.
    if tuning.chosen["flash_attn"] == "on":
        assert tried == [("threads", 1), ("flash_attn", "on"), ("kv_cache", "q8_0")] and tuning.skipped == []
    else:
        assert tried == [("threads", 1), ("flash_attn", "on")]
        assert tuning.skipped == [{"setting": "kv_cache", "value": "q8_0",
                                   "why": "llama.cpp quantizes the V cache (q8_0) only with flash attention on"}]
    best = dict(tuning.default)
    for trial in tuning.trials:
        assert trial.against == best and trial.settings == best | {trial.setting: trial.value}
        assert trial.kept == better(trial.speedup, trial.wins)
        assert trial.decode_tok_s > 0 and trial.against_decode_tok_s > 0 and 0 <= trial.wins <= 1
        if trial.kept:
            best = trial.settings
    assert tuning.chosen == best
    assert json.loads(json.dumps(tuning.to_dict()))["chosen"] == best


def test_a_q8_0_kv_cache_is_timed_and_measured_as_it_runs(q4_model, embedded_reference):
    """The quantized KV cache runs in the benchmark worker, and the logits measured with it differ
    from the F16 cache's (it loses information) by a small KL divergence."""
    import numpy as np

    from edgeprune.devices import get_device
    from edgeprune.devices.base import DeviceConfig
    from edgeprune.evaluate import kl_divergence, log_probs
    from edgeprune.runtimes.llamacpp import sequence_logits
    from edgeprune.runtimes.registry import get_runtime

    runtime = get_runtime("llama.cpp")
    q8 = {"threads": 2, "flash_attn": "on", "ubatch": 512, "kv_cache": "q8_0"}
    assert runtime.lossy_settings(q8, 2) == {"kv_cache": "q8_0"}
    assert runtime.lossy_settings(q8 | {"kv_cache": "f16"}, 2) == {}
    timer = runtime.runner(get_device(DeviceConfig(url="local")))
    workload = Workload(tuple(range(100, 164)), 8, threads=2, warmup=0, repetitions=2, settings=q8,
                        baseline_settings={"threads": 2})
    record = timer.benchmark(q4_model, workload, q4_model)
    assert len(record.runs) == len(record.baseline_runs) == 2
    assert all(r["decode_tok_s"] > 0 and r["ttft_s"] > 0 for r in record.runs)

    text = "The river carried the boats past the old mill, where the miller counted sacks of grain each morning."
    windows = np.asarray([embedded_reference.tokenizer(text * 6)["input_ids"][:160]], dtype=np.int64)
    (f16,) = [x.copy() for x in sequence_logits(q4_model, windows, 2, settings={"flash_attn": "on"})]
    (q8_0,) = [x.copy() for x in sequence_logits(q4_model, windows, 2, settings=q8)]
    kld = kl_divergence(log_probs(f16), log_probs(q8_0)).mean().item()
    assert 0 < kld < 0.05, kld
    assert (f16.argmax(-1) == q8_0.argmax(-1)).mean() > 0.9


def test_a_kv_cache_the_models_head_width_cannot_hold_is_skipped_saying_why(tmp_path, embedded_tokenizer_spec):
    """16-wide heads (a tiny model's) cannot be cached in q8_0's blocks of 32: the gap names it before
    any run, and without the gap the real run fails and tuning records it instead of ending the build."""
    from conftest import tiny_llama
    from edgeprune.devices import get_device
    from edgeprune.devices.base import DeviceConfig
    from edgeprune.export import Provenance, export_gguf
    from edgeprune.runtimes.registry import get_runtime

    model = tmp_path / "tiny.gguf"
    export_gguf(tiny_llama(tied=True, head_dim=16), embedded_tokenizer_spec, model, "F16",
                Provenance("t", "0" * 64, {}), "t")
    runtime = get_runtime("llama.cpp")
    q8 = {"threads": 2, "flash_attn": "on", "kv_cache": "q8_0"}
    assert runtime.settings_gap(q8, 2, model) == ("a q8_0 KV cache stores blocks of 32, and this model's attention "
                                                  "heads are 16 wide (keys) and 16 (values)")
    assert runtime.settings_gap(q8 | {"kv_cache": "f16"}, 2, model) is None

    timer = runtime.runner(get_device(DeviceConfig(url="local")))
    workload = Workload(tuple(range(100, 116)), 4, threads=2, warmup=0, repetitions=1)
    tuning = tune(timer, model, workload, {"flash_attn": ("on",), "kv_cache": ("f16", "q8_0")})
    assert tuning.trials == [] and tuning.chosen == {"flash_attn": "on", "kv_cache": "f16"}
    (skip,) = tuning.skipped
    assert skip["setting"] == "kv_cache" and skip["value"] == "q8_0"
    assert skip["why"].startswith("the run failed:") and "tiny.gguf" in skip["why"]


def test_a_timed_model_is_read_into_memory_not_mapped(q4_model):
    """The benchmark worker's engine loads the weights as the bundle's scripts do (`-lm none`): with
    the file mapped, peak RSS would count the weights llama.cpp repacks twice. The same load with
    llama.cpp's default maps the file, so the check can fail."""
    from pathlib import Path

    import llama_cpp

    from edgeprune.runtimes.llamacpp.engine import LlamaCppEngine

    def mapped() -> bool:
        return str(q4_model.resolve()) in Path("/proc/self/maps").read_text()

    engine = LlamaCppEngine(q4_model, n_ctx=64, threads=2, settings={})
    try:
        assert not mapped()
    finally:
        engine.close()
    default = llama_cpp.Llama(model_path=str(q4_model), n_ctx=64, verbose=False)
    try:
        assert mapped()
    finally:
        default.close()

"""Runtime settings chosen by measurement (search/tuning.py) and llama.cpp's settings
(runtimes/llamacpp/settings.py): the decision rule on small arrays, the settings' three spellings,
and a real tuning run through the benchmark worker on the embedded model."""

from __future__ import annotations

import json

import pytest

from edgeprune.measure import Workload
from edgeprune.runtimes.llamacpp.settings import LlamaSettings, space
from edgeprune.runtimes.threads import thread_counts
from edgeprune.search.tuning import MIN_GAIN, better, paired, tune


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


def test_thread_counts_start_with_every_core():
    assert thread_counts(1) == (1,)
    assert thread_counts(2) == (2, 1)
    assert thread_counts(4) == (4, 3, 2, 1)
    assert thread_counts(16) == (16, 15, 8, 4)
    assert thread_counts(6) == (6, 5, 3, 1)


def test_llama_settings_spell_the_same_everywhere():
    s = LlamaSettings.of({"flash_attn": "on", "ubatch": 256}, threads=3)
    assert s.cli_args() == ["-t", "3", "-fa", "on", "-ub", "256"]
    assert s.context_kwargs(n_batch=100) == {"n_threads": 3, "n_threads_batch": 3, "flash_attn": True,
                                             "n_batch": 100, "n_ubatch": 100}
    assert LlamaSettings.of(s.to_dict(), threads=8) == s
    assert {k: v[0] for k, v in space(4).items()} == LlamaSettings(4).to_dict()  # defaults first
    with pytest.raises(ValueError, match="no setting kv_type"):
        LlamaSettings.of({"kv_type": "q8_0"}, 2)
    with pytest.raises(ValueError, match="out of range"):
        LlamaSettings.of({"flash_attn": "auto"}, 2)


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
    grid = {"threads": (2, 1), "flash_attn": ("off", "on")}
    tuning = tune(timer, q4_model, workload, grid)

    assert tuning.default == {"threads": 2, "flash_attn": "off"}
    assert [(t.setting, t.value) for t in tuning.trials] == [("threads", 1), ("flash_attn", "on")]
    best = dict(tuning.default)
    for trial in tuning.trials:
        assert trial.against == best and trial.settings == best | {trial.setting: trial.value}
        assert trial.kept == better(trial.speedup, trial.wins)
        assert trial.decode_tok_s > 0 and trial.against_decode_tok_s > 0 and 0 <= trial.wins <= 1
        if trial.kept:
            best = trial.settings
    assert tuning.chosen == best
    assert json.loads(json.dumps(tuning.to_dict()))["chosen"] == best

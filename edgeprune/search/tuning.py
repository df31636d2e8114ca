"""Runtime settings for the selected candidate, chosen by measurement on the device.

One setting at a time (`Runtime.settings_space`, default first): each other value is timed against
the best settings so far, the same file in the same worker, in alternation, so a gain is a ratio of
runs taken side by side. A value replaces the current one only when its median paired speed-up of
the SLO's request latency is at least MIN_GAIN and it wins at least MIN_WINS of the pairs: on a
shared machine the same settings differ by a few percent from run to run, and a setting picked on
noise would ship for nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.evaluate import Quality
from edgeprune.measure import Workload
from edgeprune.runtimes.base import Runner

log = logging.getLogger(__name__)

MIN_GAIN = 0.03
MIN_WINS = 0.75
# How much held-out KLD a faster but lossy setting may cost the pick (a q8_0 KV cache: ~1e-3 here).
MAX_LOSSY_KLD_RISE = 0.01


@dataclass
class Trial:
    setting: str
    value: Any
    settings: dict[str, Any]  # what was timed
    against: dict[str, Any]  # the best settings so far, timed alongside
    speedup: float  # median over pairs of against's latency / this one's
    wins: float  # share of pairs this one was faster in
    decode_tok_s: float  # median
    ttft_s: float  # median
    against_decode_tok_s: float
    kept: bool = False


@dataclass
class Tuning:
    chosen: dict[str, Any]
    default: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # values the runtime cannot run with the best so far
    lossy: dict[str, Any] | None = None  # the quality check of chosen settings that change the output

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "default": self.default, "trials": [asdict(t) for t in self.trials],
                "skipped": self.skipped, **({"lossy_check": self.lossy} if self.lossy else {}),
                "rule": f"a value replaces the current one at a median paired speed-up of at least {1 + MIN_GAIN:.2f}x "
                        f"that wins at least {MIN_WINS:.0%} of the pairs (request latency, timed alongside)"}


def paired(runs: list[dict[str, float]], against: list[dict[str, float]]) -> tuple[float, float]:
    """Median of against/this latency over pairs of runs, and the share of pairs this one wins."""
    ratios = np.array([b["latency_s"] / r["latency_s"] for r, b in zip(runs, against, strict=True)])
    return float(np.median(ratios)), float(np.mean(ratios > 1.0))


def better(speedup: float, wins: float) -> bool:
    return speedup >= 1.0 + MIN_GAIN and wins >= MIN_WINS


def tune(timer: Runner, model: Path, workload: Workload, space: dict[str, tuple[Any, ...]],
         gap: Callable[[dict[str, Any]], str | None] = lambda settings: None) -> Tuning:
    """`gap`: why the runtime cannot run a combination (`Runtime.settings_gap`): such a value is
    skipped, e.g. a quantized KV cache when flash attention was not faster. A value whose run fails
    anyway is skipped too, saying how: the defaults, timed as the search's candidates were, still ship."""
    default = {name: values[0] for name, values in space.items()}
    best = dict(default)
    trials: list[Trial] = []
    skipped: list[dict[str, Any]] = []
    for name, values in space.items():
        winner: Trial | None = None
        for value in values[1:]:
            settings = best | {name: value}
            why = gap(settings)
            if why is not None:
                log.info("settings %s: not timed, %s", _show(settings), why)
                skipped.append({"setting": name, "value": value, "why": why})
                continue
            try:
                record = timer.benchmark(model, replace(workload, settings=settings, baseline_settings=best), model)
            except EdgepruneError as e:  # e.g. a flash attention kernel the device's build lacks
                log.warning("settings %s: the run failed, not shipped: %s", _show(settings), e)
                skipped.append({"setting": name, "value": value, "why": f"the run failed: {e}"})
                continue
            speedup, wins = paired(record.runs, record.baseline_runs)
            trial = Trial(name, value, settings, dict(best), speedup, wins,
                          float(np.median([r["decode_tok_s"] for r in record.runs])),
                          float(np.median([r["ttft_s"] for r in record.runs])),
                          float(np.median([r["decode_tok_s"] for r in record.baseline_runs])))
            trials.append(trial)
            log.info("settings %s: %.2fx the latency of %s, faster in %.0f%% of the runs", _show(settings), speedup,
                     _show(best), 100 * wins)
            if better(speedup, wins) and (winner is None or speedup > winner.speedup):
                winner = trial
        if winner is not None:
            winner.kept = True
            best = winner.settings
    log.info("runtime settings: %s", _show(best))
    return Tuning(best, default, trials, skipped)


def lossy_check(tuning: Tuning, lossy: dict[str, Any], as_searched: Quality, with_them: Quality) -> Tuning:
    """Settings that change the output (`lossy`, among `tuning.chosen`) ship only if the pick's
    held-out KLD measured with them (`with_them`) rises by at most MAX_LOSSY_KLD_RISE over its KLD
    as searched; else those settings go back to their defaults."""
    rise = with_them.mean_kld - as_searched.mean_kld
    kept = rise <= MAX_LOSSY_KLD_RISE
    log.info("with %s the pick's KLD is %.4f (%+.4f): %s", _show(lossy), with_them.mean_kld, rise,
             "shipped" if kept else "not shipped")
    check = {"settings": lossy, "kld": with_them.mean_kld, "top1": with_them.top1_agreement,
             "kld_as_searched": as_searched.mean_kld, "kept": kept,
             "rule": f"kept if the held-out KLD rises by at most {MAX_LOSSY_KLD_RISE}"}
    chosen = tuning.chosen if kept else tuning.chosen | {k: tuning.default[k] for k in lossy}
    return replace(tuning, chosen=chosen, lossy=check)


def _show(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())

"""What a benchmark asks for (Workload) and what it returns (BenchmarkRecord), device-independent."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

LATENCY_PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Workload:
    """One SLO-shaped request, repeated: prefill `prompt` then decode `answer_tokens` tokens."""

    prompt: tuple[int, ...]
    answer_tokens: int
    threads: int
    warmup: int
    repetitions: int
    # Runtime settings (`Runtime.settings_space`) the model, and the baseline beside it, run with;
    # a setting left out takes the runtime's default (threads: `threads`).
    settings: dict[str, Any] = field(default_factory=dict)
    baseline_settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"prompt": list(self.prompt)}


@dataclass
class BenchmarkRecord:
    """One device's measurement of one model, the same for every device and runner.

    Each run is one SLO-shaped request: `ttft_s`, `latency_s` (prompt + answer, end to end),
    `prefill_tok_s`, `decode_tok_s`. `raw` keeps what the runner printed where it is structured
    (llama-bench's JSON records), so nothing the runner measured is lost in the summary.
    """

    device: str
    runs: list[dict[str, float]]  # one per timed repetition (warm-up excluded)
    peak_rss_bytes: int
    load_s: float
    threads: int
    runtime: str  # runtime name and version (the llama.cpp build)
    system_info: str
    # The unpruned model's runs, alternated with these ones (empty for the baseline itself):
    # speed-ups are ratios of runs taken side by side.
    baseline_runs: list[dict[str, float]] = field(default_factory=list)
    runner: str = "llama-cpp-python"  # what timed it (`Runner.name`): "llama-bench" runs the device's own llama.cpp
    cpu: str = ""  # the device's CPU model
    cpus: list[int] | None = None  # cores the runner was pinned to (None: not pinned)
    emulated: bool = False  # timed under an emulator: never evidence for a budget verdict
    ram_cap_exceeded: bool = False  # killed at the RAM cap before it finished: no timings
    raw: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the greedy answer of one run (Python runner)
    # Alternated with the baseline one model per process (each run loaded afresh), not both loaded at once.
    one_model_per_process: bool = False

    @cached_property
    def summary(self) -> dict[str, float]:
        return summarize(self.runs, self.baseline_runs)

    @property
    def latency_p50(self) -> float:
        return self.summary["latency_p50_s"]

    @property
    def latency_p90(self) -> float:
        return self.summary["latency_p90_s"]

    @property
    def speedup(self) -> float:
        """Speed-up over the baseline timed alongside: the median of the ratios of adjacent runs
        (1.0 for the baseline itself)."""
        return self.summary.get("paired_speedup", 1.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"summary": self.summary}

    def pooled(self, other: BenchmarkRecord) -> BenchmarkRecord:
        """Both measurements' runs as one record (for confirming a verdict with a second run)."""
        return replace(
            self,
            runs=self.runs + other.runs,
            peak_rss_bytes=max(self.peak_rss_bytes, other.peak_rss_bytes),
            load_s=min(self.load_s, other.load_s),
            baseline_runs=self.baseline_runs + other.baseline_runs,
            ram_cap_exceeded=self.ram_cap_exceeded or other.ram_cap_exceeded,
            raw=self.raw + other.raw,
        )


def summarize(runs: list[dict[str, float]], baseline_runs: list[dict[str, float]] = ()) -> dict[str, float]:
    """Medians and percentiles over repetitions, plus the spread that says how far to trust them."""
    if not runs:  # killed before any timed run: infinitely slow, for every comparison
        inf = float("inf")
        out = {f"latency_p{p}_s": inf for p in LATENCY_PERCENTILES}
        return out | {"latency_min_s": inf, "latency_max_s": inf, "latency_spread": 0.0, "ttft_p50_s": inf,
                      "prefill_tok_s_p50": 0.0, "decode_tok_s_p50": 0.0, "repetitions": 0, "paired_speedup": 0.0}
    lat = np.array([r["latency_s"] for r in runs])
    out = {f"latency_p{p}_s": float(np.percentile(lat, p)) for p in LATENCY_PERCENTILES}
    out["latency_min_s"] = float(lat.min())
    out["latency_max_s"] = float(lat.max())
    out["latency_spread"] = float((lat.max() - lat.min()) / np.median(lat))
    out["ttft_p50_s"] = float(np.median([r["ttft_s"] for r in runs]))
    out["prefill_tok_s_p50"] = float(np.median([r["prefill_tok_s"] for r in runs]))
    out["decode_tok_s_p50"] = float(np.median([r["decode_tok_s"] for r in runs]))
    out["repetitions"] = len(runs)
    if baseline_runs:
        ratios = [b["latency_s"] / r["latency_s"] for r, b in zip(runs, baseline_runs, strict=True)]
        out["paired_baseline_p50_s"] = float(np.median([b["latency_s"] for b in baseline_runs]))
        out["paired_speedup"] = float(np.median(ratios))
        out["paired_speedup_min"] = float(np.min(ratios))
        out["paired_speedup_max"] = float(np.max(ratios))
    return out

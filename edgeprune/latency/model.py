"""A roofline latency model for one GGUF on one machine, corrected by what was measured there.

Decoding a token reads every weight once (plus the K/V cache so far): its time is those bytes over
the memory bandwidth, divided by the share of it llama.cpp reaches (`decode_efficiency`), plus a
fixed per-token cost. Prefill is compute: its FLOPs over the matmul throughput times
`prefill_efficiency`, plus a fixed cost. End to end, as `runtimes.llamacpp.timed_generation`
measures it: the prefill (which yields the first answer token), then `answer_tokens - 1` decode
steps.

Before any measurement the efficiencies are the defaults below; each measurement taken on the
device (an `Observation`) refines them. `transfer` carries the fitted efficiencies to another
machine's bandwidth and compute: such a prediction is an *estimate*, labelled so, never a
measurement and never "verified".
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgeprune.latency.host import HostProfile
from edgeprune.latency.traffic import ModelTraffic
from edgeprune.measure import BenchmarkRecord, Workload

log = logging.getLogger(__name__)

# Defaults until something is measured. On this repository's x86 host (AMD EPYC, one llama.cpp
# thread; SmolLM2-135M from F16 to Q3_K_M, random Llamas of 12-115 MiB) decode reached 0.35-0.8 of
# the streaming-read bandwidth on a quiet machine (F16 most, Q4_K_M least: its 576-wide tensors
# fall back to Q5_0, whose dequantizing dot product costs more per byte than the read), and Q4_K_M
# 0.27-0.30 under load; prefill reached 0.6 (loaded) to 0.8 of torch's fp32 GEMM rate for Q4_K_M.
# The defaults are the pipeline's Q4_K_M figures.
DEFAULT_DECODE_EFFICIENCY = 0.35
DEFAULT_PREFILL_EFFICIENCY = 0.7
# llama.cpp's fixed cost per eval (graph build, thread wake-up, copying the logits out, argmax):
# well under 0.1 ms here, below what the fits can tell from zero.
DEFAULT_DECODE_OVERHEAD_S = 0.0
DEFAULT_PREFILL_OVERHEAD_S = 0.0
MIN_OBSERVATIONS_TO_SKIP = 2  # one measurement sets a scale; a second one checks it
MIN_SIZE_SPREAD = 1.5  # a fixed cost is told apart from the slope only across sizes this far apart


@dataclass(frozen=True)
class Observation:
    """One measurement: what the model costs (traffic), what was asked (workload) and the summary
    of the BenchmarkRecord (`ttft_p50_s`, `decode_tok_s_p50`, `latency_p50_s`)."""

    traffic: ModelTraffic
    prompt_tokens: int
    answer_tokens: int
    summary: dict[str, float]

    @classmethod
    def from_record(cls, traffic: ModelTraffic, workload: Workload, record: BenchmarkRecord) -> Observation:
        return cls(traffic, len(workload.prompt), workload.answer_tokens, dict(record.summary))

    @property
    def usable(self) -> bool:
        s = self.summary
        return (s.get("repetitions", 1) > 0 and self.answer_tokens > 1 and s.get("decode_tok_s_p50", 0) > 0
                and 0 < s.get("ttft_p50_s", 0) < float("inf"))


@dataclass(frozen=True)
class Calibration:
    """The per-device correction: shares of the roofline reached, and fixed costs per eval."""

    decode_efficiency: float = DEFAULT_DECODE_EFFICIENCY
    decode_overhead_s: float = DEFAULT_DECODE_OVERHEAD_S
    prefill_efficiency: float = DEFAULT_PREFILL_EFFICIENCY
    prefill_overhead_s: float = DEFAULT_PREFILL_OVERHEAD_S
    observations: int = 0  # measurements fitted (0: the defaults)


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    decode_tok_s: float
    latency_s: float
    machine: str  # what it is a prediction for
    estimated: bool  # for another machine than the one measured: an estimate, never a verdict
    observations: int  # measurements the correction rests on

    @property
    def label(self) -> str:
        return "estimated" if self.estimated else "predicted"

    def describe(self) -> str:
        basis = (f"calibrated on {self.observations} measurement(s)" if self.observations
                 else "uncalibrated defaults")
        return (f"{self.label} for {self.machine}: TTFT {self.ttft_s:.3f} s, {self.decode_tok_s:.1f} tok/s decode, "
                f"{self.latency_s:.3f} s end to end ({basis}; not a measurement)")

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft_s, "decode_tok_s": self.decode_tok_s, "latency_s": self.latency_s,
                "machine": self.machine, "label": self.label, "observations": self.observations}


@dataclass(frozen=True)
class LatencyModel:
    bandwidth_gbs: float  # memory bandwidth the decode roofline uses
    gflops: float  # matmul throughput the prefill roofline uses
    machine: str = "this host"
    calibration: Calibration = field(default_factory=Calibration)
    estimated: bool = False  # transferred to a machine it was not measured on

    @classmethod
    def for_host(cls, profile: HostProfile) -> LatencyModel:
        return cls(profile.bandwidth_gbs, profile.matmul_gflops,
                   f"{profile.cpu or 'this host'} ({profile.threads} thread(s))")

    # -- prediction --------------------------------------------------------------------------

    def decode_roofline_s(self, traffic: ModelTraffic, prompt_tokens: int, answer_tokens: int) -> float:
        """Mean seconds per decode step at full bandwidth: the steps decode positions
        prompt_tokens .. prompt_tokens + answer_tokens - 2 (the first answer token comes from prefill)."""
        steps = max(answer_tokens - 1, 1)
        mean_position = prompt_tokens + (steps - 1) / 2  # K/V bytes grow linearly: the mean is the middle step's
        kv = traffic.kv_bytes_per_position * (mean_position + 1)
        return (traffic.weight_bytes_per_token + kv) / (self.bandwidth_gbs * 1e9)

    def prefill_roofline_s(self, traffic: ModelTraffic, prompt_tokens: int) -> float:
        return traffic.prefill_flops(prompt_tokens) / (self.gflops * 1e9)

    def predict(self, traffic: ModelTraffic, prompt_tokens: int, answer_tokens: int) -> Prediction:
        c = self.calibration
        ttft = self.prefill_roofline_s(traffic, prompt_tokens) / c.prefill_efficiency + c.prefill_overhead_s
        step = self.decode_roofline_s(traffic, prompt_tokens, answer_tokens) / c.decode_efficiency + c.decode_overhead_s
        return Prediction(ttft_s=ttft, decode_tok_s=1.0 / step, latency_s=ttft + (answer_tokens - 1) * step,
                          machine=self.machine, estimated=self.estimated, observations=c.observations)

    # -- correction --------------------------------------------------------------------------

    def fitted(self, observations: Sequence[Observation], fixed_costs: bool = False) -> LatencyModel:
        """This model with its efficiencies fitted to measurements taken on this machine (and, with
        `fixed_costs`, its fixed costs: see fit_efficiency for why not by default)."""
        if self.estimated:
            raise ValueError("fit on the machine that was measured, then transfer")
        obs = [o for o in observations if o.usable]
        if not obs:
            return self
        decode_x = [self.decode_roofline_s(o.traffic, o.prompt_tokens, o.answer_tokens) for o in obs]
        decode_y = [1.0 / o.summary["decode_tok_s_p50"] for o in obs]
        prefill_x = [self.prefill_roofline_s(o.traffic, o.prompt_tokens) for o in obs]
        prefill_y = [o.summary["ttft_p50_s"] for o in obs]
        d_eff, d_over = fit_efficiency(decode_x, decode_y, DEFAULT_DECODE_OVERHEAD_S, fixed_costs)
        p_eff, p_over = fit_efficiency(prefill_x, prefill_y, DEFAULT_PREFILL_OVERHEAD_S, fixed_costs)
        calibration = Calibration(d_eff, d_over, p_eff, p_over, len(obs))
        log.debug("latency model fitted on %d measurement(s): %s", len(obs), calibration)
        return replace(self, calibration=calibration)

    def transfer(self, hardware: Any, compute_gflops: float | None = None, name: str | None = None) -> LatencyModel:
        """The same efficiencies and fixed costs on another machine (a target's `Hardware`): its
        `memory_bandwidth_gbs` for decode, and `compute_gflops` (this argument, else a
        `compute_gflops` field of `hardware` if it has one) for prefill. Without a compute figure,
        prefill is scaled by the bandwidth ratio: a guess (compute and bandwidth need not scale
        together), which is one reason the result is labelled estimated."""
        bandwidth = float(hardware.memory_bandwidth_gbs)
        compute = compute_gflops if compute_gflops is not None else getattr(hardware, "compute_gflops", None)
        gflops = float(compute) if compute is not None else self.gflops * bandwidth / self.bandwidth_gbs
        machine = name or f"{hardware.arch}, {hardware.cores} cores, {bandwidth:g} GB/s"
        return replace(self, bandwidth_gbs=bandwidth, gflops=gflops, machine=machine, estimated=True)


def fit_efficiency(roofline_s: Sequence[float], measured_s: Sequence[float], default_overhead_s: float,
                   fixed_cost: bool = False) -> tuple[float, float]:
    """(efficiency, fixed cost) such that measured ~ roofline / efficiency + fixed cost.

    By default the efficiency alone, as the median of roofline/measured ratios (the fixed cost
    stays the default). With `fixed_cost`, least squares on relative errors fits both, provided the
    sizes measured differ by MIN_SIZE_SPREAD (else the two cannot be told apart) and the cost comes
    out non-negative. The median predicts better on the embedded model's 12 candidates
    (benchmarks/latency.py, leave-one-out decode error, median / max, two runs): 8-9% / 33-35%
    against 15-19% / 33-35% for least squares, and within the baseline's type mix (pruned Q4_K_M)
    2-5% / 8-9% against 6-16% / 16-24%. Kernels whose cost per byte differs from the rest (here
    Q5_0, the Q4_K_M fallback, is slow; Q6_K, Q8_0 and IQ4_NL are fast) are no fixed cost, but
    least squares fits the difference as one (5-7 ms per token, where the real one is under
    0.5 ms), and a mean follows the one candidate far off where a median does not.
    """
    x, y = np.asarray(roofline_s, float), np.asarray(measured_s, float)
    if fixed_cost and len(x) >= 2 and x.max() >= MIN_SIZE_SPREAD * x.min():
        a = np.c_[x, np.ones_like(x)] / y[:, None]
        (slope, intercept), *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
        if slope > 0 and intercept >= 0:
            return 1.0 / float(slope), float(intercept)
    ratio = statistics.median((m - default_overhead_s) / r for r, m in zip(x, y, strict=True))
    return 1.0 / max(float(ratio), 1e-9), default_overhead_s


def roofline_fraction(decode_tok_s: float, traffic: ModelTraffic, bandwidth_gbs: float, context: int = 0) -> float:
    """Measured decode speed as a share of the bandwidth roofline: tokens/s over (bandwidth / bytes
    read per token), the bytes being every weight plus the K/V cache of `context` earlier
    positions. 1.0 would read at the full bandwidth; llama.cpp on CPUs reaches roughly 0.3-0.8."""
    return decode_tok_s * (traffic.weight_bytes_per_token + traffic.kv_bytes_per_position * context) / (
        bandwidth_gbs * 1e9)


def hopeless(prediction: Prediction, *, latency_budget_s: float | None = None, speedup: float | None = None,
             baseline: Prediction | None = None, margin: float = 0.2) -> str | None:
    """Why a candidate is not worth measuring, or None. Only with a calibrated model
    (MIN_OBSERVATIONS_TO_SKIP measurements), and only when clearly out: predicted latency over the
    budget by more than `margin`, or predicted speed-up over `baseline` (a ratio of predicted
    latencies) short of the required one by more than `margin`."""
    if prediction.observations < MIN_OBSERVATIONS_TO_SKIP:
        return None
    if latency_budget_s is not None and prediction.latency_s > latency_budget_s * (1 + margin):
        return (f"{prediction.label} latency {prediction.latency_s:.3f} s is over the {latency_budget_s:g} s budget "
                f"by more than {margin:.0%}")
    if speedup is not None and baseline is not None:
        predicted = baseline.latency_s / prediction.latency_s
        if predicted * (1 + margin) < speedup:
            return f"{prediction.label} speed-up {predicted:.2f}x is short of {speedup:g}x by more than {margin:.0%}"
    return None

"""Predictions inside the search: which candidates are not worth timing, and in what order to time
the rest.

The latency model (edgeprune.latency) is fitted to the candidates already timed on the device, so
its fixed scale (this device's bandwidth, its share of the roofline) comes from measurements, and a
candidate's prediction differs from theirs only through what its model file reads and computes.
Each runtime is fitted to its own measurements: llama.cpp and ONNX Runtime reach different shares
of the roofline on the same device. Until `MIN_OBSERVATIONS_TO_SKIP` candidates of a runtime are
timed, none of its candidates is skipped; after that a candidate is
skipped only when its prediction misses the budget by more than `margin`, widened by the errors
measured on its kinds of step. The roofline counts bytes, not the fixed cost of each layer's
operations nor how fast each quantization type's kernels run: on the embedded model (135M, 2
threads) it predicts the speed-up of removing 12 layers as 1.40x where 1.54x is measured, of
removing 28 attention sublayers as 1.23x where 1.54x is measured (benchmarks/structured.py), and
of the iq4_nl-narrow-keep-v recipe as 1.09x where 1.45x is measured; per kernel type it is off by
up to a third (benchmarks/latency.py). So each kind of step (`SearchSpace.kinds`: layers, heads, a
recipe, a runtime...) keeps the largest under-prediction measured on a candidate that has it, its
prediction made before it was timed (a candidate of several kinds credits each with what the
others' known errors leave unexplained); a candidate is never skipped while one of its kinds has
no such measurement, and otherwise its kinds' errors multiply into its margin.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeprune.latency import HostProfile, LatencyModel, ModelTraffic, Observation, Prediction, hopeless
from edgeprune.measure import BenchmarkRecord, Workload
from edgeprune.search.budget import Budget

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.35
# Matmul GFLOP/s per GB/s of bandwidth where neither is measured: about this host's one-thread ratio
# (90 GFLOP/s, 28 GB/s). Only a starting scale: fitting to measurements replaces it.
NOMINAL_GFLOPS_PER_GBS = 3.0


@dataclass
class SearchPredictor:
    """The device's latency model, refitted after every measurement."""

    model: LatencyModel  # uncalibrated, for the device's bandwidth and compute (or a nominal figure)
    workload: Workload
    traffic_of: Callable[[object], ModelTraffic]  # a candidate's model -> its per-token costs
    margin: float = DEFAULT_MARGIN
    observations: list[Observation] = field(default_factory=list)
    # Per kind of step: the largest measured/predicted speed-up of a candidate that has it (>= 1).
    under_prediction: dict[str, float] = field(default_factory=dict)
    _fitted: dict[str, LatencyModel] = field(default_factory=dict)  # by runtime

    def observe(self, model: object, record: BenchmarkRecord) -> None:
        if record.runs and not record.emulated:
            self.observations.append(Observation.from_record(self.traffic_of(model), self.workload, record))
            self._fitted.clear()

    def fitted_for(self, runtime: str) -> LatencyModel:
        """The model fitted to `runtime`'s measurements (uncalibrated before the first)."""
        if runtime not in self._fitted:
            self._fitted[runtime] = self.model.fitted([o for o in self.observations if o.traffic.runtime == runtime])
        return self._fitted[runtime]

    def runtimes(self) -> list[str]:
        """The runtimes measured so far, in the order of their first measurement."""
        return list(dict.fromkeys(o.traffic.runtime for o in self.observations))

    def predict(self, traffic: ModelTraffic) -> Prediction:
        return self.fitted_for(traffic.runtime).predict(traffic, len(self.workload.prompt), self.workload.answer_tokens)

    def speedup(self, traffic: ModelTraffic, baseline: ModelTraffic) -> float:
        return self.predict(baseline).latency_s / self.predict(traffic).latency_s

    def learn_error(self, kinds: frozenset[str], predicted_speedup: float, measured_speedup: float) -> None:
        """A candidate with these kinds of step was predicted, then timed: each kind takes what of the
        error its other kinds' known errors do not explain (all of it, for a kind's first candidate)."""
        error = measured_speedup / predicted_speedup
        known = dict(self.under_prediction)
        for kind in kinds:
            explained = math.prod(known[k] for k in kinds if k != kind and k in known)
            self.under_prediction[kind] = max(known.get(kind, 1.0), error / explained, 1.0)

    def skip_reason(self, prediction: Prediction, budget: Budget, baseline: ModelTraffic | None,
                    kinds: frozenset[str]) -> str | None:
        """Why timing a candidate with these kinds of step would be wasted (its prediction misses
        the budget by more than the margin and its kinds' measured errors), or None."""
        if any(kind not in self.under_prediction for kind in kinds):
            return None  # the model's error on this kind of step is not known yet
        widened = 1.0 + self.margin
        for kind in kinds:
            widened *= self.under_prediction[kind]
        return hopeless(prediction, latency_budget_s=budget.latency_s, speedup=budget.speedup,
                        baseline=self.predict(baseline) if baseline is not None else None, margin=widened - 1.0)


def interpolated(a: ModelTraffic, b: ModelTraffic, t: float, name: str) -> ModelTraffic:
    """The traffic of a model between `a` (t=0) and `b` (t=1) that differ only in depth: every
    per-token cost is a sum over layers, so it moves linearly with the layers removed."""

    def mix(x: int, y: int) -> int:
        return round(x + (y - x) * t)

    return ModelTraffic(
        name=name,
        weight_bytes_per_token=mix(a.weight_bytes_per_token, b.weight_bytes_per_token),
        flops_per_token=mix(a.flops_per_token, b.flops_per_token),
        output_flops=a.output_flops,
        kv_bytes_per_position=mix(a.kv_bytes_per_position, b.kv_bytes_per_position),
        attention_flops_per_position=mix(a.attention_flops_per_position, b.attention_flops_per_position),
        parameters=mix(a.parameters, b.parameters),
        file_bytes=mix(a.file_bytes, b.file_bytes),
        tied=a.tied,
        runtime=a.runtime,
    )


def device_latency_model(local: bool, host: HostProfile | None, hardware: Any, url: str) -> LatencyModel:
    """The measuring device's uncalibrated model: this host's measured bandwidth and compute for
    `local`, else the target file's bandwidth as a nominal scale (fitting to the device's own
    measurements replaces the scale; only ratios between candidates carry over)."""
    if local and host is not None:
        return LatencyModel.for_host(host)
    bandwidth = float(hardware.memory_bandwidth_gbs)
    return LatencyModel(bandwidth, NOMINAL_GFLOPS_PER_GBS * bandwidth, machine=url)


def target_estimates(predictor: SearchPredictor, hardware: Any, name: str,
                     models: dict[str, object]) -> dict[str, Prediction]:
    """Each candidate's latency on the target, transferred from the measurements on this host:
    estimates (labelled so), for a build measured on a stand-in. Needs a measured host profile."""
    if not predictor.observations:
        return {}
    n, m = len(predictor.workload.prompt), predictor.workload.answer_tokens
    estimates = {}
    for cid, model in models.items():
        traffic = predictor.traffic_of(model)
        target = predictor.fitted_for(traffic.runtime).transfer(hardware, name=name)
        estimates[cid] = target.predict(traffic, n, m)
    return estimates

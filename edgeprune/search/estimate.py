"""What the model-guided search believes about plans it has not built: pure models, refitted after
each measurement.

- `SpeedCorrection`: the latency model's speed-up (a roofline over the plan's bytes) is off by a
  factor that depends on what the plan changes: removing attention sublayers saves fixed costs the
  bytes do not show, a recipe's types run at their own speed per byte. log(measured / predicted) is
  fitted as a linear function of the plan's features (the share of layers, attention sublayers,
  heads and FFN channels removed; 1 for a recipe or another runtime) by ridge regression, so a
  feature never measured keeps the roofline's prediction.
- `QualityModel`: a built candidate's KLD (quantized, on every held-out window) is predicted from a
  cheap proxy (the plan's unquantized KLD on a slice, in torch) as quantization error + scale x
  proxy: the unpruned model's quantization error is measured, the scale and each recipe's own
  error are fitted to the candidates built (until a recipe's first, the default recipe's error).
- `AdditiveProxy`: the proxy of any plan, from one sweep per dimension (layers, attention sublayers,
  heads, FFN width) measured alone, summed: a first ranking of the whole space, replaced by the
  plan's own proxy for the plans that rank first.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

RIDGE = 0.005  # shrinks each feature's correction toward none until measurements support it
MIN_SPEED_NOISE = 0.03  # the spread of a speed-up timed side by side on a shared machine
UNMEASURED_KIND_ERROR = 1.15  # the spread added for a kind of step never timed


@dataclass
class SpeedCorrection:
    """log(measured / predicted speed-up) ~ sum over features of coefficient x amount."""

    samples: list[tuple[dict[str, float], float]] = field(default_factory=list)
    _coefficients: dict[str, float] | None = None

    def add(self, features: Mapping[str, float], predicted: float, measured: float) -> None:
        self.samples.append((dict(features), math.log(measured / predicted)))
        self._coefficients = None

    @property
    def measured_kinds(self) -> set[str]:
        return {k for f, _ in self.samples for k in f}

    def coefficients(self) -> dict[str, float]:
        if self._coefficients is None:
            kinds = sorted(self.measured_kinds)
            if not kinds:
                self._coefficients = {}
            else:
                x = np.array([[f.get(k, 0.0) for k in kinds] for f, _ in self.samples])
                y = np.array([e for _, e in self.samples])
                c = np.linalg.solve(x.T @ x + RIDGE * np.eye(len(kinds)), x.T @ y)
                self._coefficients = dict(zip(kinds, map(float, c), strict=True))
        return self._coefficients

    def factor(self, features: Mapping[str, float]) -> float:
        """Measured / roofline speed-up expected for a plan with these features."""
        c = self.coefficients()
        return math.exp(sum(c.get(k, 0.0) * v for k, v in features.items()))

    def sigma(self, features: Mapping[str, float]) -> float:
        """The spread (log scale) of a plan's measured speed-up about its corrected prediction: the
        fit's RMS error, at least a timing's noise, widened for a kind of step never timed."""
        residuals = [e - math.log(self.factor(f)) for f, e in self.samples]
        rms = math.sqrt(statistics.fmean(r * r for r in residuals)) if residuals else 0.0
        spread = max(math.log1p(MIN_SPEED_NOISE), rms)
        if any(k not in self.measured_kinds for k in features):
            spread = math.hypot(spread, math.log(UNMEASURED_KIND_ERROR))
        return spread

    def chance(self, features: Mapping[str, float], margin: float) -> float:
        """Probability that a plan beats a requirement it is predicted to beat by `margin` (a ratio:
        1.1 = predicted 10% better than needed; below 1, short of it)."""
        return 0.5 * math.erfc(-math.log(margin) / (self.sigma(features) * math.sqrt(2)))

    def to_dict(self) -> dict[str, object]:
        return {"coefficients": self.coefficients(), "sigma": self.sigma({}), "samples": len(self.samples)}


@dataclass
class QualityModel:
    """Measured KLD ~ quantization error of the (recipe, runtime) + scale x proxy KLD."""

    baseline_key: str
    baseline_kld: float  # the unpruned model's, quantized: the default recipe's quantization error
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # key -> (proxy, measured)

    def add(self, key: str, proxy: float, measured: float) -> None:
        self.samples.setdefault(key, []).append((proxy, measured))

    def _fit(self) -> tuple[float, dict[str, float]]:
        """Least squares over every sample: one shared scale, one quantization error per key (the
        baseline's fixed at its measured KLD)."""
        num = den = 0.0
        for key, pairs in self.samples.items():
            if key == self.baseline_key:
                num += sum(p * (m - self.baseline_kld) for p, m in pairs)
                den += sum(p * p for p, _ in pairs)
            else:
                p_mean = statistics.fmean(p for p, _ in pairs)
                m_mean = statistics.fmean(m for _, m in pairs)
                num += sum((p - p_mean) * (m - m_mean) for p, m in pairs)
                den += sum((p - p_mean) ** 2 for p, _ in pairs)
        scale = max(num / den, 0.05) if den > 1e-12 else 1.0
        errors = {key: max(statistics.fmean(m - scale * p for p, m in pairs), 0.0)
                  for key, pairs in self.samples.items() if key != self.baseline_key}
        return scale, errors | {self.baseline_key: self.baseline_kld}

    @property
    def scale(self) -> float:
        """Measured pruning damage over the proxy's (1 until two plans of one recipe tell it)."""
        return self._fit()[0]

    def quantization_error(self, key: str) -> float:
        """A recipe's (in a runtime) measured error; the baseline's until one is built with it."""
        return self._fit()[1].get(key, self.baseline_kld)

    def predict(self, key: str, proxy: float) -> float:
        scale, errors = self._fit()
        return errors.get(key, self.baseline_kld) + scale * proxy

    def to_dict(self) -> dict[str, object]:
        scale, errors = self._fit()
        return {"scale": scale, "quantization_error": errors}


@dataclass
class AdditiveProxy:
    """Per dimension, the proxy KLD measured at a few amounts (each alone), interpolated; a plan's
    additive proxy is the sum over its dimensions, times the ratio of exact to additive measured on
    the plans whose exact proxy is known."""

    sweeps: dict[str, dict[float, float]] = field(default_factory=dict)  # dimension -> amount -> proxy
    ratios: list[float] = field(default_factory=list)

    def add_point(self, dimension: str, amount: float, proxy: float) -> None:
        self.sweeps.setdefault(dimension, {0.0: 0.0})[amount] = proxy

    def raw(self, amounts: Mapping[str, float]) -> float:
        total = 0.0
        for dim, amount in amounts.items():
            points = sorted(self.sweeps.get(dim, {0.0: 0.0}).items())
            xs, ys = [x for x, _ in points], [y for _, y in points]
            total += float(np.interp(amount, xs, ys)) if amount <= xs[-1] else ys[-1] * amount / max(xs[-1], 1e-9)
        return total

    def observe_exact(self, amounts: Mapping[str, float], exact: float) -> None:
        raw = self.raw(amounts)
        if raw > 1e-6 and len([a for a in amounts.values() if a]) > 1:  # only combinations teach the interaction
            self.ratios.append(exact / raw)

    @property
    def interaction(self) -> float:
        """Exact over summed proxy, on the combinations measured (1 until one is)."""
        return statistics.median(self.ratios) if self.ratios else 1.0

    def predict(self, amounts: Mapping[str, float]) -> float:
        return self.raw(amounts) * self.interaction


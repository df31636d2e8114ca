"""What both runners capture from a decoder layer, and how layer scores are tallied.

`LayerProbe` hooks one decoder layer: on each forward it hands (h_in, h_mid, h_out) to a callback
and accumulates its projections' input statistics. `StateTally` turns those states into the
per-token scores of the "states" layer methods, whatever order layers and batches arrive in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgeprune.analysis.layer_scores import sublayer_pair
from edgeprune.analysis.methods import LayerImportance
from edgeprune.analysis.unit_scores import ColumnStats, UnitScores

# The projection whose input each statistic describes: the first of these the layer has (the
# second, Phi-3's fused projections).
STAT_INPUTS = {"attn_in": ("self_attn.q_proj", "self_attn.qkv_proj"), "o_in": ("self_attn.o_proj",),
               "mlp_in": ("mlp.gate_proj", "mlp.gate_up_proj"), "down_in": ("mlp.down_proj",)}


def stat_input(layer: nn.Module, key: str) -> nn.Module:
    names = dict(layer.named_modules())
    return names[next(path for path in STAT_INPUTS[key] if path in names)]

StatesCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class LayerProbe:
    """Hooks on one decoder layer; use as a context manager (hooks removed on exit).

    With `states`, each forward calls `on_states(h_in, h_mid, h_out)`; the runner points it at the
    batch in hand. With `stats`, the projections' input statistics accumulate in `self.stats`.
    """

    def __init__(self, layer: nn.Module, states: bool = False, stats: bool = False,
                 on_states: StatesCallback | None = None) -> None:
        self.layer, self.on_states = layer, on_states
        self.states = states or on_states is not None
        self.stats: dict[str, ColumnStats] = {}
        if stats:
            for key in STAT_INPUTS:
                self.stats[key] = ColumnStats(stat_input(layer, key).in_features)
        self._attn_out: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> LayerProbe:
        if self.states:
            self._handles.append(self.layer.self_attn.register_forward_hook(self._keep_attention))
            self._handles.append(self.layer.register_forward_hook(self._layer_done, with_kwargs=True))
        for key, stat in self.stats.items():
            module = stat_input(self.layer, key)
            self._handles.append(module.register_forward_pre_hook(lambda _m, args, s=stat: s.add(args[0])))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keep_attention(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._attn_out = output[0] if isinstance(output, tuple) else output

    def _layer_done(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = output[0] if isinstance(output, tuple) else output
        # The decoder layer adds the attention output to its input exactly so.
        h_mid = h_in + self._attn_out
        self._attn_out = None
        self.on_states(h_in.detach(), h_mid.detach(), h_out.detach())


def layer_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in layer.named_parameters()}


class StateTally:
    """Token-averaged scores of the "states" methods, fed (layer, batch, h_in, h_mid, h_out).

    An n-layer block ending at layer l needs the input of layer l-n+1, so inputs are kept until the
    longest block no longer needs them; calls may come batch by batch or layer by layer.
    """

    def __init__(self, methods: Sequence[LayerImportance], n_layers: int) -> None:
        self.methods = [m for m in methods if m.needs == "states"]
        self.n_layers = n_layers
        self.sums = {m.key: torch.zeros(max(n_layers - m.n + 1, 0), dtype=torch.float64) for m in self.methods}
        self.counts = {m.key: torch.zeros(max(n_layers - m.n + 1, 0), dtype=torch.float64) for m in self.methods}
        self.max_n = max((m.n for m in self.methods), default=1)
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, layer: int, batch: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor) -> None:
        if self.max_n > 1:
            self._inputs[layer, batch] = h_in
        for m in self.methods:
            if m.n == 1:
                start, (skipped, kept) = layer, sublayer_pair(m.granularity, h_in, h_mid, h_out)
            else:
                start = layer - m.n + 1
                if start < 0:
                    continue
                skipped, kept = self._inputs[start, batch], h_out
            scores = m.score(skipped, kept)
            self.sums[m.key][start] += scores.sum()
            self.counts[m.key][start] += scores.numel()
        self._inputs.pop((layer - self.max_n + 1, batch), None)

    def result(self) -> dict[str, torch.Tensor]:
        self._inputs.clear()
        return {key: self.sums[key] / self.counts[key] for key in self.sums}


@dataclass
class StructuredImportance:
    """Scores from one analysis pass. Layer scores are indexed by the block's first layer (a block of
    n layers has n_layers - n + 1 starts); unit scores are per layer."""

    layer_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # LayerImportance.key -> scores
    unit_scores: dict[str, list[UnitScores]] = field(default_factory=dict)  # UnitImportance.name -> per layer
    runner: str = ""
    calibration_tokens: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int | None = None  # during the pass; None where the counter cannot be reset

    def merge(self, other: StructuredImportance) -> StructuredImportance:
        """Both passes' scores (e.g. layer-by-layer states with whole-model loss); the larger peak."""
        peaks = [p for p in (self.peak_rss_bytes, other.peak_rss_bytes) if p is not None]
        return StructuredImportance(
            {**self.layer_scores, **other.layer_scores}, {**self.unit_scores, **other.unit_scores},
            f"{self.runner}+{other.runner}", max(self.calibration_tokens, other.calibration_tokens),
            self.seconds + other.seconds, max(peaks) if peaks else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "calibration_tokens": self.calibration_tokens,
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "layer_scores": {k: v.tolist() for k, v in self.layer_scores.items()},
            "unit_scores": {k: [s.to_dict() for s in v] for k, v in self.unit_scores.items()},
        }

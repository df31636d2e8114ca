"""What the search ranks by: per-layer and per-attention-sublayer scores, and per-head and
per-FFN-channel scores, taken from one structured importance pass (edgeprune.structured)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeprune.analysis.capture import StructuredImportance


@dataclass
class Importance:
    layer_scores: list[float]  # per layer; low = removing it costs little
    head_scores: list[list[float]]  # per layer, per query head; high = keep
    channel_scores: list[list[float]]  # per layer, per FFN channel; high = keep
    attention_scores: list[float] | None = None  # per layer, its attention sublayer; low = removable
    methods: dict[str, str] = field(default_factory=dict)  # which score each list holds

    @classmethod
    def from_structured(cls, scores: StructuredImportance, layer_key: str, attention_key: str | None,
                        unit: str) -> Importance:
        units = scores.unit_scores[unit]
        return cls(
            layer_scores=scores.layer_scores[layer_key].tolist(),
            head_scores=[s.heads.tolist() for s in units],
            channel_scores=[s.channels.tolist() for s in units],
            attention_scores=scores.layer_scores[attention_key].tolist() if attention_key else None,
            methods={"layers": layer_key, "attention": attention_key or "", "units": unit},
        )

    def summary(self) -> dict[str, Any]:
        """What reports show: per-layer scores (the per-channel lists run to thousands per layer)."""
        return {"methods": self.methods, "layer_scores": self.layer_scores, "attention_scores": self.attention_scores,
                "head_scores": self.head_scores}

    def layers_by_importance(self, protect: tuple[int, ...] = ()) -> list[int]:
        """Layer indices, least important first, excluding `protect`."""
        return _order(self.layer_scores, protect)

    def attention_by_importance(self, protect: tuple[int, ...] = ()) -> list[int]:
        """Layers whose attention sublayer matters least first (none without attention scores)."""
        return _order(self.attention_scores, protect) if self.attention_scores is not None else []


def _order(scores: list[float], protect: tuple[int, ...]) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return [i for i in order if i not in protect]

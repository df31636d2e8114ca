"""Structured pruning methods, one registry: each turns importance scores into a Plan.

A method names what the analysis must compute (`analyses`) and has one hook, `plan`. Depth methods
remove the least important layers or sublayers (ShortGPT's Block Influence, Gromov et al.'s
angular distance over a block of consecutive layers, the measured loss increase); width methods
remove the least important query heads (GQA-consistent) and FFN channels by a unit importance
(magnitude, Wanda-sp, first- and second-order Taylor over LLM-Pruner's dependency groups, FLAP's
fluctuation), allocated over layers uniformly or globally (allocation.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from edgeprune.analysis.capture import StructuredImportance
from edgeprune.analysis.layer_scores import block_to_drop, layers_to_drop
from edgeprune.analysis.methods import LAYER_IMPORTANCE, UNIT_IMPORTANCE, LayerImportance, UnitImportance
from edgeprune.config import Strict
from edgeprune.errors import EdgepruneError
from edgeprune.prune.plan import ModelShape, Plan
from edgeprune.structured.allocation import ALLOCATIONS, allocate, best_heads, nearest_head_count, shared_heads


class StructuredSettings(Strict):
    """What a user asks of a structured method (`edgeprune prune --method ...`)."""

    method: str
    layer_ratio: float = Field(default=0.25, gt=0, lt=1, description="depth methods: share of layers/sublayers removed")
    granularity: Literal["layer", "attention", "mlp"] = "layer"
    head_ratio: float = Field(default=0.0, ge=0, lt=1, description="width methods: share of query heads removed")
    ffn_ratio: float = Field(default=0.0, ge=0, lt=1, description="width methods: share of FFN channels removed")
    allocation: Literal[ALLOCATIONS] = "uniform"  # type: ignore[valid-type]
    ffn_multiple: Literal[32, 256] = Field(default=256, description="FFN widths kept are multiples of this")

    @model_validator(mode="after")
    def _known(self) -> StructuredSettings:
        if self.method not in STRUCTURED_METHODS:
            names = ", ".join(STRUCTURED_METHODS)
            raise ValueError(f"unknown structured method {self.method!r}; choose one of {names}")
        if isinstance(STRUCTURED_METHODS[self.method], WidthMethod) and not (self.head_ratio or self.ffn_ratio):
            raise ValueError(f"{self.method} prunes widths: give --head-ratio and/or --ffn-ratio")
        return self

    def describe(self) -> str:
        m = STRUCTURED_METHODS[self.method]
        if isinstance(m, DepthMethod):
            what = "layers" if self.granularity == "layer" else f"{self.granularity} sublayers"
            return f"{self.method}: {self.layer_ratio:.0%} of {what}"
        parts = [f"{self.head_ratio:.0%} of heads"] if self.head_ratio else []
        parts += [f"{self.ffn_ratio:.0%} of FFN channels (multiples of {self.ffn_multiple})"] if self.ffn_ratio else []
        return f"{self.method}: {' and '.join(parts)}, {self.allocation} allocation"


class StructuredMethod(ABC):
    """A named way to choose what to remove; subclasses register by naming themselves."""

    name: ClassVar[str]
    description: ClassVar[str]
    registry: ClassVar[dict[str, StructuredMethod]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            if cls.name in StructuredMethod.registry:
                raise TypeError(f"two structured methods are named {cls.name!r}")
            StructuredMethod.registry[cls.name] = cls()

    @abstractmethod
    def analyses(self, settings: StructuredSettings, shape: ModelShape) -> tuple[list[LayerImportance],
                                                                                   list[UnitImportance]]:
        """The layer and unit importance configurations the plan needs scores of."""

    @abstractmethod
    def plan(self, settings: StructuredSettings, shape: ModelShape, scores: StructuredImportance) -> Plan:
        """What to remove."""

    def check(self, settings: StructuredSettings, shape: ModelShape) -> None:
        """Refuse, before any work, settings whose plan the model's family cannot hold."""
        return None

    def notes(self) -> list[str]:
        """What the method's paper does that the output cannot carry, said in the report."""
        return []


def removed_count(ratio: float, n: int) -> int:
    return int(ratio * n + 0.5)


class DepthMethod(StructuredMethod):
    """Removes the `layer_ratio` least important layers (or attention / MLP sublayers). The first
    and last layers are kept: they read the embeddings and write the logits."""

    importance: ClassVar[str]  # a LAYER_IMPORTANCE name
    # Scores one block whose length depends on how many layers go, so it cannot rank layers one
    # step at a time as the search removes them.
    block: ClassVar[bool] = False

    def configured(self, settings: StructuredSettings, shape: ModelShape) -> LayerImportance:
        return LAYER_IMPORTANCE[self.importance](settings.granularity)

    def analyses(self, settings, shape):
        return [self.configured(settings, shape)], []

    def check(self, settings, shape):
        if settings.granularity != "layer" and not shape.per_layer:
            raise EdgepruneError(f"--granularity {settings.granularity} removes sublayers, but llama.cpp runs "
                                 f"{shape.family} models with one shape for every layer; use --granularity layer.")

    def plan(self, settings, shape, scores):
        layer = self.configured(settings, shape)
        k = removed_count(settings.layer_ratio, shape.n_layers)
        if not 1 <= k <= shape.n_layers - 2:
            raise EdgepruneError(f"A layer ratio of {settings.layer_ratio:g} removes {k} of {shape.n_layers} layers; "
                                 f"choose one that removes 1 to {shape.n_layers - 2} (the first and last stay).")
        chosen = self.choose(scores.layer_scores[layer.key], k, shape)
        if settings.granularity == "layer":
            return Plan(drop_layers=tuple(chosen))
        if settings.granularity == "attention":
            return Plan(heads=tuple((l, ()) for l in chosen))
        return Plan(ffn=tuple((l, ()) for l in chosen))

    def choose(self, scores: torch.Tensor, k: int, shape: ModelShape) -> list[int]:
        return layers_to_drop(scores, k, protect=(0, shape.n_layers - 1))


class BlockInfluenceMethod(DepthMethod):
    name = "block-influence"
    description = "ShortGPT: remove the layers whose output is most like their input (lowest Block Influence)"
    importance = "block_influence"


class LossIncreaseMethod(DepthMethod):
    name = "loss-increase"
    description = "remove the layers whose skipping raises the calibration loss least (measured one at a time)"
    importance = "loss_increase"


class AngularDistanceMethod(DepthMethod):
    name = "angular-distance"
    description = ("Gromov et al.: remove the block of consecutive layers whose input and output are closest in "
                   "angle (layers only)")
    importance = "angular_distance"
    block = True

    def configured(self, settings, shape):
        if settings.granularity != "layer":
            raise EdgepruneError("angular-distance removes a block of whole layers: use --granularity layer.")
        return LAYER_IMPORTANCE[self.importance]("layer", n=removed_count(settings.layer_ratio, shape.n_layers))

    def choose(self, scores, k, shape):
        # A block touching the first or last layer is not a candidate (as for the other methods).
        inner = scores.clone().double()
        inner[0] = inner[-1] = float("inf")
        return block_to_drop(inner, k)


class WidthMethod(StructuredMethod):
    """Keeps the most important query heads (GQA structures only) and FFN channels of every layer."""

    importance: ClassVar[str]  # a UNIT_IMPORTANCE name

    def analyses(self, settings, shape):
        return [], [UNIT_IMPORTANCE[self.importance]()]

    def check(self, settings, shape):
        if settings.head_ratio and not shape.head_pruning:
            raise EdgepruneError(f"--head-ratio removes query heads, but llama.cpp's {shape.family} graph needs every "
                                 "query head; prune FFN channels (--ffn-ratio) or layers instead.")
        if settings.allocation != "uniform" and not shape.per_layer:
            raise EdgepruneError(f"--allocation {settings.allocation} gives layers different widths, but "
                                 f"llama.cpp runs {shape.family} models with one shape for every layer; use "
                                 "--allocation uniform.")

    def plan(self, settings, shape, scores):
        per_layer = scores.unit_scores[self.importance]
        heads: list[tuple[int, tuple[int, ...]]] = []
        ffn: list[tuple[int, tuple[int, ...]]] = []
        if settings.head_ratio:
            counts = allocate([s.heads for s in per_layer], 1 - settings.head_ratio, settings.allocation)
            counts = [nearest_head_count(n, shape.n_head_kv, shape.group_size) for n in counts]
            if not shape.per_layer and counts[0] < shape.n_head:  # uniform: one count, and one GQA split
                heads = list(enumerate(shared_heads([s.heads for s in per_layer], shape.n_head_kv, counts[0])))
            else:
                heads = [(layer, best_heads(s.heads, shape.n_head_kv, n))
                         for layer, (s, n) in enumerate(zip(per_layer, counts, strict=True)) if n < shape.n_head]
        if settings.ffn_ratio:
            multiple = min(settings.ffn_multiple, shape.ffn)
            counts = allocate([s.channels for s in per_layer], 1 - settings.ffn_ratio, settings.allocation,
                              multiple=multiple, minimum=multiple)
            for layer, (s, n) in enumerate(zip(per_layer, counts, strict=True)):
                if n < shape.ffn:
                    best = torch.argsort(s.channels, descending=True, stable=True)[:n]
                    ffn.append((layer, tuple(sorted(int(c) for c in best))))
        plan = Plan(heads=tuple(heads), ffn=tuple(ffn))
        plan.validate(shape)
        return plan


class MagnitudeSP(WidthMethod):
    name = "magnitude-sp"
    description = "sum of |W| over each head's / channel's dependency group; no calibration text"
    importance = "magnitude"


class WandaSPMethod(WidthMethod):
    name = "wanda-sp"
    description = "Wanda-sp: sum of |W| x ||X|| over the dependency group"
    importance = "wanda_sp"


class Taylor1Method(WidthMethod):
    name = "taylor1"
    description = "LLM-Pruner: first-order Taylor |sum w dL/dw| over the dependency group"
    importance = "taylor1"


class Taylor2Method(WidthMethod):
    name = "taylor2"
    description = "LLM-Pruner: first- plus diagonal second-order (Fisher) Taylor term"
    importance = "taylor2"


class FlapMethod(WidthMethod):
    name = "flap"
    description = "FLAP: fluctuation Var(x_j) x ||W[:, j]||^2 of the output projections' inputs"
    importance = "flap"

    def notes(self):
        return [f"FLAP's bias compensation is unavailable: {UNIT_IMPORTANCE[self.importance].bias_compensation}."]


STRUCTURED_METHODS: dict[str, StructuredMethod] = StructuredMethod.registry

"""Structured-pruning importance methods, two registries: layers (and sublayers), and units (query
heads, KV groups, FFN channels).

Subclassing registers a method; `LAYER_IMPORTANCE` / `UNIT_IMPORTANCE` are the one list of names.
Each method says what the runner must capture for it (`needs`) and has one scoring hook; the
runners (`layerwise.py`, `whole_model.py`) do the capturing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from edgeprune.analysis import layer_scores, unit_scores
from edgeprune.analysis.groups import LayerGroups
from edgeprune.analysis.unit_scores import ColumnStats, UnitScores

LayerNeeds = Literal["states", "loss"]
UnitNeeds = Literal["weights", "activations", "gradients"]


class LayerImportance(ABC):
    """Scores a block (one layer, n consecutive layers, or one sublayer) by comparing the model with
    the block skipped against the model with it kept, per token; the runner averages over tokens.

    needs "states": the residual stream right after the block (runs layer by layer);
    needs "loss": the next-token NLL at the output (needs the whole model after the block).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs: ClassVar[LayerNeeds]
    registry: ClassVar[dict[str, type[LayerImportance]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in LayerImportance.registry:
            raise TypeError(f"two layer importance methods are named {cls.name!r}")
        LayerImportance.registry[cls.name] = cls

    def __init__(self, granularity: str = "layer", n: int = 1) -> None:
        if granularity not in layer_scores.GRANULARITIES:
            raise ValueError(f"granularity must be one of {layer_scores.GRANULARITIES}, not {granularity!r}")
        if n < 1 or (n > 1 and granularity != "layer"):
            raise ValueError(f"a block of n={n} layers needs n >= 1, and n > 1 only at granularity 'layer'")
        self.granularity, self.n = granularity, n

    @property
    def key(self) -> str:
        """Names this configuration in results, e.g. "angular_distance/layer/n8"."""
        return f"{self.name}/{self.granularity}/n{self.n}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key})"

    @abstractmethod
    def score(self, skipped: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Per-token score from what is observed with the block skipped and with it kept; low = unimportant."""


class BlockInfluence(LayerImportance):
    name = "block_influence"
    description = "1 - cos(input, output) of the block (ShortGPT, arXiv 2403.03853)"
    needs = "states"

    def score(self, skipped, kept):
        return layer_scores.block_influence(skipped, kept)


class AngularDistance(LayerImportance):
    name = "angular_distance"
    description = "arccos(cos(input, output)) / pi over n layers (Gromov et al., arXiv 2403.17887)"
    needs = "states"

    def score(self, skipped, kept):
        return layer_scores.angular_distance(skipped, kept)


class LossIncrease(LayerImportance):
    name = "loss_increase"
    description = "next-token NLL with the block skipped minus with it kept, on calibration windows"
    needs = "loss"

    def score(self, skipped, kept):
        return layer_scores.loss_increase(skipped, kept)


@dataclass
class UnitInputs:
    """What a unit scorer may read for one decoder layer (parameter names inside the layer)."""

    weights: dict[str, torch.Tensor]
    groups: LayerGroups
    stats: dict[str, ColumnStats] | None = None  # by input: attn_in, o_in, mlp_in, down_in
    grads: dict[str, torch.Tensor] | None = None  # dL/dw of the mean calibration loss
    fisher: dict[str, torch.Tensor] | None = None  # mean over windows of the squared per-window gradient


class UnitImportance(ABC):
    """Scores every query head, KV group and FFN channel of one layer over its dependency groups."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs: ClassVar[UnitNeeds]
    registry: ClassVar[dict[str, type[UnitImportance]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in UnitImportance.registry:
            raise TypeError(f"two unit importance methods are named {cls.name!r}")
        UnitImportance.registry[cls.name] = cls

    @abstractmethod
    def score(self, inputs: UnitInputs) -> UnitScores:
        """Scores of the layer's units; higher = more important."""


class Magnitude(UnitImportance):
    name = "magnitude"
    description = "sum of |W| over the dependency group; no calibration"
    needs = "weights"

    def score(self, inputs):
        return unit_scores.group_scores(inputs.groups, unit_scores.magnitude_salience(inputs.weights))


class WandaSP(UnitImportance):
    name = "wanda_sp"
    description = "sum of |W|*||X|| over the dependency group (structured Wanda)"
    needs = "activations"

    def score(self, inputs):
        return unit_scores.group_scores(inputs.groups, unit_scores.wanda_salience(inputs.weights, inputs.stats))


class Taylor1(UnitImportance):
    name = "taylor1"
    description = "|sum of w*dL/dw| over the dependency group: first-order loss change (LLM-Pruner)"
    needs = "gradients"

    def score(self, inputs):
        salience = unit_scores.taylor_first_order(inputs.weights, inputs.grads)
        return unit_scores.group_scores(inputs.groups, salience, absolute=True)


class Taylor2(UnitImportance):
    name = "taylor2"
    description = "sum of |w*g - F*w^2/2|, F the diagonal empirical Fisher (LLM-Pruner's param_mix)"
    needs = "gradients"

    def score(self, inputs):
        salience = unit_scores.taylor_second_order(inputs.weights, inputs.grads, inputs.fisher)
        return unit_scores.group_scores(inputs.groups, salience)


class Flap(UnitImportance):
    name = "flap"
    description = "Var(x_j)*||W[:, j]||^2 of o_proj / down_proj input columns (FLAP, arXiv 2312.11983)"
    needs = "activations"
    # What the runtime can do with FLAP's mean-compensation bias (see `unit_scores.flap_bias`).
    bias_compensation: ClassVar[str] = (
        "llama.cpp's llama and deci graphs load optional blk.N.attn_output.bias / blk.N.ffn_down.bias and add "
        "them; edgeprune's GGUF exporter and the plain transformers Llama (attention_bias / mlp_bias switch "
        "every projection's bias at once) do not carry them yet, so the compensation is computed but not applied"
    )

    def score(self, inputs):
        out = unit_scores.group_scores(inputs.groups, unit_scores.fluctuation_salience(inputs.weights, inputs.stats))
        # Kept so the compensation of whichever units are pruned later can be computed.
        out.extras = {"o_in_mean": inputs.stats["o_in"].mean, "down_in_mean": inputs.stats["down_in"].mean}
        return out


LAYER_IMPORTANCE: dict[str, type[LayerImportance]] = LayerImportance.registry
UNIT_IMPORTANCE: dict[str, type[UnitImportance]] = UnitImportance.registry

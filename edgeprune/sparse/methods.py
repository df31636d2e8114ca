"""Sparse pruning methods, one registry: a method names itself, says which calibration statistic
it needs per linear layer, and turns (weight, statistic) into (new weight, mask).

Subclassing registers a method; `SPARSE_METHODS` is the one list of names (config and CLI read it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from edgeprune.quantize.imatrix import add_squares
from edgeprune.sparse.masks import magnitude_scores, select_mask, wanda_scores
from edgeprune.sparse.sparsegpt import HessianAccumulator, sparsegpt


@dataclass(frozen=True)
class SparseSettings:
    """What a method needs to know; built from the user's `SparsitySpec`."""

    sparsity: float
    nm: tuple[int, int] | None = None
    blocksize: int = 128
    percdamp: float = 0.01
    mask_group: Literal["row", "block"] = "row"  # SparseGPT: exact per-row sparsity, or the reference code's


class ColumnSquares:
    """Sum of x_j^2 per input column over every calibration token (Wanda's ||X_j||^2)."""

    def __init__(self, columns: int) -> None:
        self.total = torch.zeros(columns, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        self.total, _ = add_squares(self.total, x)


class SparseMethod(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    registry: ClassVar[dict[str, type[SparseMethod]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in SparseMethod.registry:
            raise TypeError(f"two sparse methods are named {cls.name!r}")
        SparseMethod.registry[cls.name] = cls

    def statistic(self, columns: int) -> ColumnSquares | HessianAccumulator | None:
        """A fresh accumulator of the layer inputs this method needs; None: no calibration."""
        return None

    @abstractmethod
    def prune(self, weight: torch.Tensor, stat, settings: SparseSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """(new weight, mask of pruned entries) for one [out, in] weight."""


class Magnitude(SparseMethod):
    name = "magnitude"
    description = "smallest |W| in each output row; no calibration (the papers' baseline)"

    def prune(self, weight, stat, settings):
        mask = select_mask(magnitude_scores(weight), settings.sparsity, settings.nm)
        return weight.masked_fill(mask, 0), mask


class Wanda(SparseMethod):
    name = "wanda"
    description = "smallest |W|*||X|| in each output row (Sun et al., arXiv 2306.11695); no weight update"

    def statistic(self, columns):
        return ColumnSquares(columns)

    def prune(self, weight, stat, settings):
        mask = select_mask(wanda_scores(weight, stat.total), settings.sparsity, settings.nm)
        return weight.masked_fill(mask, 0), mask


class SparseGPT(SparseMethod):
    name = "sparsegpt"
    description = "OBS mask + weight update from the inverse Hessian (Frantar & Alistarh, arXiv 2301.00774)"

    def statistic(self, columns):
        return HessianAccumulator(columns)

    def prune(self, weight, stat, settings):
        n, m = settings.nm or (0, 0)
        return sparsegpt(weight, stat.h, settings.sparsity, n, m, settings.blocksize, settings.percdamp,
                         settings.mask_group)


SPARSE_METHODS: dict[str, type[SparseMethod]] = SparseMethod.registry


def needs_calibration(method: str) -> bool:
    """Whether the method reads calibration activations (its statistic says so)."""
    return SPARSE_METHODS[method]().statistic(1) is not None

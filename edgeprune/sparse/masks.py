"""Pure functions over one weight matrix: importance scores and the masks they select.

A mask is a bool tensor shaped like the weight, True where the weight is pruned. Weights are
[out_features, in_features] (nn.Linear layout); "row" means one output, the comparison group both
Wanda and our SparseGPT use.
"""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, with input_sq_sum[j] = sum of x_j^2 over all calibration tokens."""
    if input_sq_sum.shape != (weight.shape[1],):
        raise ValueError(f"input statistics of shape {tuple(input_sq_sum.shape)} for weight {tuple(weight.shape)}")
    return weight.abs() * input_sq_sum.sqrt().to(weight.dtype).unsqueeze(0)


def prune_count(columns: int, sparsity: float) -> int:
    """Weights pruned per row of `columns`: floor, as the reference implementations do."""
    return int(columns * sparsity)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring `sparsity` share of every row (ties broken by column order)."""
    k = prune_count(scores.shape[1], sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the `n` lowest-scoring of every `m` consecutive inputs in each row (N:M sparsity)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns do not split into groups of {m}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)

"""Block Influence and GQA-consistent selection of heads and channels by score (pure functions)."""

from __future__ import annotations

import torch


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Per-token Block Influence (ShortGPT): 1 - cos(input, output) of a layer, shape [tokens]."""
    h_in = h_in.reshape(-1, h_in.shape[-1]).double()
    h_out = h_out.reshape(-1, h_out.shape[-1]).double()
    return 1.0 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)


def select_channels(channel_scores: torch.Tensor, keep: int) -> tuple[int, ...]:
    """The `keep` highest-scoring FFN channels, sorted."""
    if not 0 <= keep <= channel_scores.numel():
        raise ValueError(f"cannot keep {keep} of {channel_scores.numel()} channels")
    best = torch.argsort(channel_scores, descending=True, stable=True)[:keep]
    return tuple(best.sort().values.tolist())  # not by iterating the tensor: an 8B's 14k channels, 32 layers


def group_scores(head_scores: torch.Tensor, n_head_kv: int) -> torch.Tensor:
    """Sum of the query-head scores of each KV group, shape [n_head_kv]."""
    return head_scores.reshape(n_head_kv, -1).sum(dim=-1)


def select_heads(head_scores: torch.Tensor, n_head_kv: int, keep_groups: int, keep_per_group: int) -> tuple[int, ...]:
    """GQA-consistent choice: the `keep_groups` best KV groups, and in each its best query heads.

    Returns sorted query-head indices; a KV head is kept exactly when some of its queries are.
    """
    group_size = head_scores.numel() // n_head_kv
    if not (1 <= keep_groups <= n_head_kv and 1 <= keep_per_group <= group_size):
        raise ValueError(f"cannot keep {keep_groups} groups x {keep_per_group} heads of {n_head_kv} x {group_size}")
    groups = torch.argsort(group_scores(head_scores, n_head_kv), descending=True, stable=True)[:keep_groups]
    kept: list[int] = []
    for g in groups.tolist():
        within = head_scores[g * group_size : (g + 1) * group_size]
        best = torch.argsort(within, descending=True, stable=True)[:keep_per_group]
        kept.extend(g * group_size + int(i) for i in best)
    return tuple(sorted(kept))

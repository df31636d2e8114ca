"""How many heads and FFN channels each layer keeps, given one global ratio (pure functions).

`uniform`: every layer keeps the same share. `global` (FLAP's adaptive structure search, arXiv
2312.11983): each layer's unit scores are standardised (minus the layer's mean, over its standard
deviation), all layers' units are ranked together, and the lowest are removed, so a layer whose
units stand further apart from each other keeps more. Counts are then rounded to what the runtime
can hold: FFN widths to a multiple (32: the block of every legacy GGML quant; 256: the K-quant
super-block, see benchmarks/structured.py for what each costs), head counts to a GQA structure
(KV groups x query heads per group, via `best_heads`).
"""

from __future__ import annotations

import itertools

import torch

ALLOCATIONS = ("uniform", "global")


def _round_to(n: float, multiple: int, lo: int, hi: int) -> int:
    return int(min(max(round(n / multiple) * multiple, lo), hi))


def standardised(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.double()
    std = scores.std() if scores.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    return (scores - scores.mean()) / (std if std > 0 else 1.0)


def allocate(scores: list[torch.Tensor], keep_ratio: float, mode: str, multiple: int = 1,
             minimum: int = 1) -> list[int]:
    """Units kept per layer (a multiple of `multiple`, at least `minimum`, at most the layer's
    count) so that about `keep_ratio` of all units are kept."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep ratio must be in (0, 1], not {keep_ratio}")
    if mode not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, not {mode!r}")
    sizes = [s.numel() for s in scores]
    if mode == "uniform":
        return [_round_to(keep_ratio * n, multiple, minimum, n) for n in sizes]
    z = torch.cat([standardised(s) for s in scores])
    keep = round(keep_ratio * z.numel())
    if keep >= z.numel():
        return sizes
    threshold = torch.sort(z, descending=True).values[keep - 1] if keep else float("inf")
    counts, start = [], 0
    for n in sizes:
        kept = int((z[start : start + n] >= threshold).sum())
        counts.append(_round_to(kept, multiple, minimum, n))
        start += n
    return counts


def head_counts(n_head_kv: int, group_size: int) -> list[int]:
    """The head counts a layer can keep: KV groups x query heads per group."""
    return sorted({g * q for g in range(1, n_head_kv + 1) for q in range(1, group_size + 1)})


def nearest_head_count(n: int, n_head_kv: int, group_size: int) -> int:
    """The valid head count nearest to `n` (the larger one on a tie: never remove more than asked)."""
    return min(head_counts(n_head_kv, group_size), key=lambda c: (abs(c - n), -c))


def _splits(n: int, n_head_kv: int, group_size: int) -> list[tuple[int, int]]:
    """Every (KV groups, queries per group) that keeps `n` query heads."""
    splits = [(g, q) for g, q in itertools.product(range(1, n_head_kv + 1), range(1, group_size + 1)) if g * q == n]
    if not splits:
        raise ValueError(f"{n} heads is no GQA structure of {n_head_kv} groups x {group_size}")
    return splits


def _kept(head_scores: torch.Tensor, n_head_kv: int, groups: int, per_group: int) -> tuple[float, tuple[int, ...]]:
    """The best `per_group` queries of each KV group, in the `groups` groups whose kept queries score
    most; and their total score."""
    group_size = head_scores.numel() // n_head_kv
    best = [sorted(range(k * group_size, (k + 1) * group_size), key=lambda h: -float(head_scores[h]))[:per_group]
            for k in range(n_head_kv)]
    chosen = sorted(range(n_head_kv), key=lambda k: -sum(float(head_scores[h]) for h in best[k]))[:groups]
    kept = tuple(sorted(h for k in chosen for h in best[k]))
    return sum(float(head_scores[h]) for h in kept), kept


def best_heads(head_scores: torch.Tensor, n_head_kv: int, n: int) -> tuple[int, ...]:
    """The `n` query heads to keep, GQA-consistent (every kept KV group keeps the same number of
    queries), maximising the kept score over every (groups, per group) split of `n`."""
    splits = _splits(n, n_head_kv, head_scores.numel() // n_head_kv)
    return max((_kept(head_scores, n_head_kv, g, q) for g, q in splits), key=lambda t: t[0])[1]


def shared_heads(layer_scores: list[torch.Tensor], n_head_kv: int, n: int) -> list[tuple[int, ...]]:
    """Each layer's `n` query heads in one (groups, per group) split shared by every layer, the split
    that keeps the most score summed over layers: for runtimes that give all layers one shape."""
    splits = _splits(n, n_head_kv, layer_scores[0].numel() // n_head_kv)
    g, q = max(splits, key=lambda s: sum(_kept(scores, n_head_kv, *s)[0] for scores in layer_scores))
    return [_kept(scores, n_head_kv, g, q)[1] for scores in layer_scores]

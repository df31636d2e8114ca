"""Layer and sublayer importance as pure functions (tested on hand-built tensors).

Every score compares the model with a block skipped against the model with it kept, per token:

- Block Influence (ShortGPT, arXiv 2403.03853): 1 - cos(h_in, h_out) of the block;
- angular distance (Gromov et al., arXiv 2403.17887): arccos(cos(h_in, h_out)) / pi, h_in the input
  of layer l and h_out the output of layer l+n-1 (a block of n layers);
- loss increase: NLL with the block skipped minus NLL with it kept.

A sublayer is a block too: the attention sublayer maps the residual stream h_in to
h_mid = h_in + attn(h_in), the MLP sublayer maps h_mid to h_out = h_mid + mlp(h_mid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from edgeprune.analysis.scores import block_influence

__all__ = [
    "GRANULARITIES", "angular_distance", "block_influence", "block_to_drop", "layers_to_drop", "loss_increase",
    "sublayer_pair", "token_nll",
]

GRANULARITIES = ("layer", "attention", "mlp")


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Per-token angular distance arccos(cos(h_in, h_out)) / pi, in [0, 1], shape [tokens].

    Gromov et al. read only the last token of each sequence; averaging over all tokens (the
    caller's choice) uses every calibration token, as Block Influence does.
    """
    h_in = h_in.reshape(-1, h_in.shape[-1]).double()
    h_out = h_out.reshape(-1, h_out.shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
    # Rounding can push cos a hair past 1, where arccos is NaN.
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def sublayer_pair(granularity: str, h_in: torch.Tensor, h_mid: torch.Tensor,
                  h_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(state with the block skipped, state with it kept) for a layer or one of its sublayers.

    h_in: the layer's input; h_mid: the residual stream after the attention's output is added;
    h_out: the layer's output.
    """
    if granularity == "layer":
        return h_in, h_out
    if granularity == "attention":
        return h_in, h_mid
    if granularity == "mlp":
        return h_mid, h_out
    raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood of every predicted position, [batch * (seq - 1)], float64.

    Computed in the logits' own dtype (a float64 copy of a 49k-vocabulary batch would double its memory).
    """
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(pred, input_ids[:, 1:].reshape(-1), reduction="none").double()


def loss_increase(nll_skipped: torch.Tensor, nll_kept: torch.Tensor) -> torch.Tensor:
    """Per-token loss increase when a block is skipped; its mean is the increase of the mean loss."""
    return nll_skipped.double() - nll_kept.double()


def layers_to_drop(scores: Sequence[float] | torch.Tensor, k: int, protect: Sequence[int] = ()) -> list[int]:
    """The k least important layers one at a time (lowest score first; ties to the lower index)."""
    values = torch.as_tensor(scores, dtype=torch.float64)
    order = sorted(range(len(values)), key=lambda i: (float(values[i]), i))
    chosen = [i for i in order if i not in set(protect)][:k]
    if len(chosen) < k:
        raise ValueError(f"cannot drop {k} of {len(values)} layers with {list(protect)} protected")
    return sorted(chosen)


def block_to_drop(block_scores: Sequence[float] | torch.Tensor, n: int) -> list[int]:
    """Gromov et al.'s choice: the n consecutive layers starting where the n-block score is least.

    `block_scores[l]` scores the block l..l+n-1 (so there are n_layers - n + 1 of them).
    """
    values = torch.as_tensor(block_scores, dtype=torch.float64)
    start = int(torch.argmin(values))  # first minimum on ties
    return list(range(start, start + n))

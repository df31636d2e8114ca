"""Head and FFN-channel importance as pure functions (tested on hand-built tensors).

Each method turns a layer's weights (and, where it needs them, input statistics or gradients) into
a *salience map* shaped like the weights; a dependency group's score is the sum of its entries
(`groups.GroupSet.reduce`), so query heads, whole KV groups and FFN channels are scored alike.
Parameter names are those inside a decoder layer ("self_attn.q_proj.weight", ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from edgeprune.analysis.groups import LayerGroups

# Which captured input feeds each projection (q/k/v share one, as do gate/up).
INPUT_OF = {
    "self_attn.q_proj.weight": "attn_in",
    "self_attn.k_proj.weight": "attn_in",
    "self_attn.v_proj.weight": "attn_in",
    "self_attn.o_proj.weight": "o_in",
    "mlp.gate_proj.weight": "mlp_in",
    "mlp.up_proj.weight": "mlp_in",
    "mlp.down_proj.weight": "down_in",
    "self_attn.qkv_proj.weight": "attn_in",  # Phi-3's fused projections
    "mlp.gate_up_proj.weight": "mlp_in",
}
# The projections whose input columns are the prunable units (FLAP scores these alone).
OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


class ColumnStats:
    """Per input column over every calibration token: count, sum and sum of squares (float64)."""

    def __init__(self, columns: int) -> None:
        self.count = 0
        self.total = torch.zeros(columns, dtype=torch.float64)
        self.squares = torch.zeros(columns, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.count += x.shape[0]
        self.total += x.sum(dim=0)
        self.squares += x.square().sum(dim=0)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 over all tokens (Wanda's activation norm)."""
        return self.squares.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        """Population variance over tokens (FLAP's fluctuation); clamped at 0 against rounding."""
        return (self.squares / self.count - self.mean.square()).clamp_min(0.0)


@dataclass
class UnitScores:
    """Scores of one layer's prunable units; higher = more important."""

    heads: torch.Tensor  # [n_head]: a query head (its q rows and o columns)
    kv_groups: torch.Tensor  # [n_head_kv]: a KV head together with all its query heads
    channels: torch.Tensor  # [ffn]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. FLAP's input means

    def to_dict(self) -> dict[str, list[float]]:
        return {"heads": self.heads.tolist(), "kv_groups": self.kv_groups.tolist(),
                "channels": self.channels.tolist()}


def group_scores(groups: LayerGroups, salience: Mapping[str, torch.Tensor], absolute: bool = False) -> UnitScores:
    """Sum each group's salience; `absolute`: take |sum| (signed first-order terms cancel within a group)."""
    post = torch.abs if absolute else (lambda t: t)
    return UnitScores(post(groups.heads.reduce(salience)), post(groups.kv_groups.reduce(salience)),
                      post(groups.channels.reduce(salience)))


# -- salience maps ------------------------------------------------------------------------------

class SalienceMaps(Mapping[str, torch.Tensor]):
    """Per-parameter salience maps, each computed in float64 when it is read and not kept: a layer's
    maps held together are 8 bytes per weight (1.75 GB for a Llama-3.1-8B layer), one at a time the
    largest matrix's."""

    def __init__(self, names: Iterable[str], compute: Callable[[str], torch.Tensor]) -> None:
        self._names, self._compute = list(names), compute

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._compute(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64, copy=True)  # a copy even when `t` is float64: the maps are built in place


def magnitude_salience(weights: Mapping[str, torch.Tensor]) -> SalienceMaps:
    """|W|: a group's score is the L1 norm of its weights."""
    return SalienceMaps([n for n in weights if n in INPUT_OF], lambda n: _float64(weights[n]).abs_())


def wanda_salience(weights: Mapping[str, torch.Tensor], stats: Mapping[str, ColumnStats]) -> SalienceMaps:
    """|W_ij| * ||X_j|| (Wanda, arXiv 2306.11695) on every projection of the group (Wanda-sp)."""
    return SalienceMaps([n for n in weights if n in INPUT_OF],
                        lambda n: _float64(weights[n]).abs_().mul_(stats[INPUT_OF[n]].norm.unsqueeze(0)))


def fluctuation_salience(weights: Mapping[str, torch.Tensor], stats: Mapping[str, ColumnStats]) -> SalienceMaps:
    """FLAP (An et al., arXiv 2312.11983), WIFV: Var(x_j) * W_ij^2 on o_proj / down_proj, so a column's
    sum is Var(x_j) * ||W[:, j]||^2 - how much the output moves when column j is replaced by its mean."""
    return SalienceMaps([n for n in OUTPUT_PROJECTIONS if n in weights],
                        lambda n: _float64(weights[n]).square_().mul_(stats[INPUT_OF[n]].variance.unsqueeze(0)))


def taylor_first_order(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """w * dL/dw. Zeroing a group G changes the loss by -sum_G w*g to first order, so the group's
    score is |sum_G w*g| (LLM-Pruner's "vectorize"; `group_scores(..., absolute=True)`)."""
    return {name: weights[name].double() * grads[name].double() for name in grads if name in weights}


def taylor_second_order(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                        fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w*g - 1/2 * F * w^2| per weight, F the diagonal of the empirical Fisher (mean over
    calibration windows of the squared per-window gradient), which stands in for the Hessian's
    diagonal: LLM-Pruner's "param_mix" (its `acc_grad` is this F). Absolute per weight, then summed."""
    out = {}
    for name in grads:
        w = weights[name].double()
        out[name] = (w * grads[name].double() - 0.5 * fisher[name].double() * w.square()).abs()
    return out


def second_order_term(weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """F * w^2 alone (LLM-Pruner's "param_second")."""
    return {name: fisher[name].double() * weights[name].double().square() for name in fisher if name in weights}


# -- FLAP bias compensation -----------------------------------------------------------------------

def flap_bias(weight: torch.Tensor, column_mean: torch.Tensor, removed_columns: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation for the removed input columns of o_proj / down_proj: W[:, removed] @
    mean(x[removed]), added to that projection's bias so the output keeps its mean, [out_features]."""
    idx = torch.as_tensor(removed_columns, dtype=torch.long)
    return weight.double().index_select(1, idx) @ column_mean.double().index_select(0, idx)


def head_columns(heads: torch.Tensor | list[int], head_dim: int) -> torch.Tensor:
    """The o_proj input columns of the given query heads."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in torch.as_tensor(heads).tolist()]) \
        if len(heads) else torch.zeros(0, dtype=torch.long)

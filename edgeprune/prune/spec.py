"""Plans as users write them (TOML or JSON), resolved into index-level Plans by importance.

    drop_layers = [14, 20]
    [all]                 # every kept layer, unless a [layers.N] table says otherwise
    heads = 6             # query heads to keep: a count (the most important, GQA-consistent) or indices
    ffn = 1024            # FFN channels to keep: a count (the most important) or indices
    [layers.7]
    attention = false     # remove this layer's attention
    [layers.9]
    mlp = false           # remove this layer's MLP
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import tomllib
import torch
from pydantic import Field, ValidationError

from edgeprune.analysis import Importance
from edgeprune.analysis.scores import select_channels, select_heads
from edgeprune.config import Strict, first_error
from edgeprune.errors import EdgepruneError
from edgeprune.gguf_file import K_BLOCK
from edgeprune.prune.plan import ModelShape, Plan, PlanError

log = logging.getLogger(__name__)



class LayerSpec(Strict):
    heads: int | list[int] | None = Field(default=None, description="query heads kept: count or indices")
    kv_heads: int | None = Field(default=None, ge=1, description="KV groups kept, with a head count")
    ffn: int | list[int] | None = Field(default=None, description="FFN channels kept: count or indices")
    attention: bool = True
    mlp: bool = True


class PlanSpec(Strict):
    drop_layers: list[int] = []
    all: LayerSpec = LayerSpec()
    layers: dict[int, LayerSpec] = {}

    def needs_importance(self) -> bool:
        return any(isinstance(s.heads, int) or isinstance(s.ffn, int) for s in [self.all, *self.layers.values()])


def load_plan_spec(path: Path) -> PlanSpec:
    if not path.is_file():
        raise EdgepruneError(f"Plan file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise EdgepruneError(f"Plan file {path} is not valid {kind} ({e}); fix the syntax.") from None
    except OSError as e:
        raise EdgepruneError(f"Cannot read plan file {path} ({e.strerror}); check its permissions.") from None
    if not isinstance(data, dict):
        raise EdgepruneError(f"Plan file {path} is JSON but not an object; write the plan as one, e.g. "
                             '{"drop_layers": [3], "all": {"heads": 6}}.')
    try:
        return PlanSpec(**data)
    except ValidationError as e:
        raise EdgepruneError(f"Plan file {path}: {first_error(e)}; fix the file.") from None


def _merged(spec: PlanSpec, layer: int) -> LayerSpec:
    own = spec.layers.get(layer)
    if own is None:
        return spec.all
    return spec.all.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})


def _heads(s: LayerSpec, layer: int, shape: ModelShape, importance: Importance | None) -> tuple[int, ...] | None:
    if not s.attention:
        return ()
    if s.heads is None or isinstance(s.heads, list):
        return None if s.heads is None else tuple(s.heads)
    n = s.heads
    groups = s.kv_heads or next(
        (g for g in range(shape.n_head_kv, 0, -1) if n % g == 0 and n // g <= shape.group_size), None
    )
    if groups is None or n % groups or not 1 <= n // groups <= shape.group_size or groups > shape.n_head_kv:
        raise PlanError(
            f"Layer {layer}: {n} heads cannot be split evenly over {s.kv_heads or 'any number of'} KV groups "
            f"({shape.n_head_kv} groups of {shape.group_size} query heads); choose another count."
        )
    if n == shape.n_head:
        return None
    assert importance is not None
    return select_heads(torch.tensor(importance.head_scores[layer]), shape.n_head_kv, groups, n // groups)


def _channels(s: LayerSpec, layer: int, shape: ModelShape, importance: Importance | None) -> tuple[int, ...] | None:
    if not s.mlp:
        return ()
    if s.ffn is None or isinstance(s.ffn, list):
        return None if s.ffn is None else tuple(s.ffn)
    if not 1 <= s.ffn <= shape.ffn:
        raise PlanError(f"Layer {layer}: cannot keep {s.ffn} FFN channels of {shape.ffn}.")
    if s.ffn == shape.ffn:
        return None
    assert importance is not None
    return select_channels(torch.tensor(importance.channel_scores[layer]), s.ffn)


def check(spec: PlanSpec, shape: ModelShape) -> Plan:
    """Reject a spec the model or runtime cannot express before any costly work (scores are
    irrelevant to structure, so flat ones stand in for the real importance). Returns that plan:
    its shapes are the real plan's, only which heads and channels it keeps may differ."""
    flat = Importance([0.0] * shape.n_layers, [[0.0] * shape.n_head] * shape.n_layers,
                      [[0.0] * shape.ffn] * shape.n_layers)
    return resolve(spec, shape, flat, warn=False)


def resolve(spec: PlanSpec, shape: ModelShape, importance: Importance | None, warn: bool = True) -> Plan:
    """The index-level Plan a spec describes; counts pick the most important heads / channels."""
    if spec.needs_importance() and importance is None:
        raise PlanError("The plan keeps heads or channels by count, which needs importance scores.")
    bad = [l for l in [*spec.drop_layers, *spec.layers] if not 0 <= l < shape.n_layers]
    if bad:
        raise PlanError(f"The plan names layers {bad}, but the model has {shape.n_layers} (0–{shape.n_layers - 1}).")
    heads, ffn = [], []
    for layer in range(shape.n_layers):
        if layer in spec.drop_layers:
            continue
        s = _merged(spec, layer)
        if (h := _heads(s, layer, shape, importance)) is not None:
            heads.append((layer, h))
        if (c := _channels(s, layer, shape, importance)) is not None:
            ffn.append((layer, c))
    plan = Plan(drop_layers=tuple(spec.drop_layers), heads=tuple(heads), ffn=tuple(ffn))
    plan.validate(shape)
    if warn:
        _warn_k_quant_widths(plan, shape)
    return plan


def _warn_k_quant_widths(plan: Plan, shape: ModelShape) -> None:
    widths = sorted({s.ffn for s in plan.layer_shapes(shape) if s.has_mlp and s.ffn % K_BLOCK})
    if widths and shape.ffn % K_BLOCK == 0:
        log.warning(
            "FFN widths %s are not multiples of %d: K-quants cannot pack ffn_down, and llama.cpp falls back "
            "to a larger type for it; multiples of %d quantize as asked.", widths, K_BLOCK, K_BLOCK
        )

"""Apply a Plan to a Llama config and its tensors, one tensor at a time: no modules.

A removed sublayer takes its norm with it: the attention's `input_layernorm`, the MLP's
`post_attention_layernorm`. The per-layer slices are the model's truth; `prune/modules.py`
builds the torch model that holds them, and `pruned_tensors` lists the pruned model's tensors
unread, for writers that hold one tensor at a time.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from edgeprune.errors import EdgepruneError
from edgeprune.prune.plan import ModelShape, Plan, PlanError

if TYPE_CHECKING:
    from edgeprune.models.weights import WeightStore

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
ATTENTION_PARAMS = ("self_attn.", "input_layernorm.")
MLP_PARAMS = ("mlp.", "post_attention_layernorm.")


def pruned_config(config: Any, plan: Plan) -> Any:
    """The plain transformers config of a uniformly pruned model (what `save_pretrained` writes)."""
    shape = ModelShape.from_config(config)
    plan.validate(shape)
    uniform = plan.uniform_shape(shape)
    if uniform is None:
        raise PlanError(
            f"The plan gives layers different shapes ({plan.describe(shape)}); a plain transformers Llama config "
            "has one head count and FFN width for all layers, so only the GGUF (arch deci) can hold this model."
        )
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(plan.kept_layers(shape))
    new.num_attention_heads, new.num_key_value_heads = uniform.n_head, uniform.n_head_kv
    new.intermediate_size = uniform.ffn
    # head_dim no longer follows from hidden_size / heads once heads are removed.
    new.head_dim = shape.head_dim
    return kept_layer_types(new, plan.kept_layers(shape))


def kept_layer_types(config: Any, kept: list[int]) -> Any:
    """`config` with the attention types of the `kept` layers only, renumbered (Gemma 3's sliding and
    global layers); widths stay as they are."""
    if getattr(config, "layer_types", None) is None:
        return config
    out = copy.deepcopy(config)
    out.layer_types, out.num_hidden_layers = [config.layer_types[i] for i in kept], len(kept)
    return out


def _head_rows(heads: tuple[int, ...], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


# Indices a tensor keeps along dims 0 and 1 (None: all of them).
Kept = tuple[torch.Tensor | None, torch.Tensor | None]
_ALL: Kept = (None, None)


def kept_index(relative: str, layer: int, plan: Plan, shape: ModelShape) -> Kept | None:
    """What the plan keeps of one tensor of (original) layer `layer`, `relative` to the layer
    (`self_attn.q_proj.weight`): None when it goes with its sublayer, else the kept rows and columns.
    Query heads keep rows of q and columns of o, KV heads rows of k and v; FFN channels keep rows
    of gate and up, columns of down. Fused projections (Phi-3's qkv_proj: q, k, v rows stacked;
    gate_up_proj: gate rows, then up rows) keep the same rows of each part."""
    if relative.startswith(ATTENTION_PARAMS):
        heads = dict(plan.heads)
        if layer not in heads:
            return _ALL
        if not heads[layer]:
            return None
        if relative.startswith("self_attn.q_proj."):
            return _head_rows(plan.kept_heads(layer, shape), shape.head_dim), None
        if relative.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            return _head_rows(plan.kept_kv_heads(layer, shape), shape.head_dim), None
        if relative.startswith("self_attn.qkv_proj."):
            q, kv = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
            kv_rows = _head_rows(plan.kept_kv_heads(layer, shape), shape.head_dim)
            return torch.cat([_head_rows(plan.kept_heads(layer, shape), shape.head_dim), q + kv_rows,
                              q + kv + kv_rows]), None
        if relative == "self_attn.o_proj.weight":
            return None, _head_rows(plan.kept_heads(layer, shape), shape.head_dim)
        return _ALL
    if relative.startswith(MLP_PARAMS):
        channels = dict(plan.ffn)
        if layer not in channels:
            return _ALL
        if not channels[layer]:
            return None
        index = torch.tensor(channels[layer], dtype=torch.long)
        if relative.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            return index, None
        if relative.startswith("mlp.gate_up_proj."):
            return torch.cat([index, shape.ffn + index]), None
        if relative == "mlp.down_proj.weight":
            return None, index
    return _ALL


def slice_tensor(relative: str, tensor: torch.Tensor, layer: int, plan: Plan,
                 shape: ModelShape) -> torch.Tensor | None:
    """One tensor of original layer `layer` with the plan applied (None: removed). An untouched
    tensor is returned as is, not copied."""
    kept = kept_index(relative, layer, plan, shape)
    if kept is None:
        return None
    rows, columns = kept
    if rows is not None:
        tensor = tensor.index_select(0, rows)
    if columns is not None:
        tensor = tensor.index_select(1, columns)
    return tensor


def prune_layer(tensors: dict[str, torch.Tensor], layer: int, plan: Plan,
                shape: ModelShape) -> dict[str, torch.Tensor]:
    """One layer's tensors (names relative to the layer) with the plan applied to original layer `layer`."""
    out = {}
    for relative, tensor in tensors.items():
        sliced = slice_tensor(relative, tensor, layer, plan, shape)
        if sliced is not None:
            out[relative] = sliced
    return out


def sliced_shape(relative: str, full: tuple[int, ...], layer: int, plan: Plan,
                 shape: ModelShape) -> tuple[int, ...] | None:
    """The shape `slice_tensor` gives a tensor of shape `full`, without the tensor."""
    kept = kept_index(relative, layer, plan, shape)
    if kept is None:
        return None
    rows, columns = kept
    out = list(full)
    if rows is not None:
        out[0] = len(rows)
    if columns is not None:
        out[1] = len(columns)
    return tuple(out)


def pruned_name(name: str, plan: Plan, shape: ModelShape) -> tuple[str, int | None, str] | None:
    """(name in the pruned model, original layer or None, name relative to the layer) of an original
    tensor name, or None when its layer is dropped. Kept layers are renumbered in order."""
    m = _LAYER_KEY.match(name)
    if m is None:
        return name, None, name
    old = int(m.group(1))
    if old in plan.drop_layers:
        return None
    new = old - sum(d < old for d in plan.drop_layers)
    return f"model.layers.{new}.{m.group(2)}", old, m.group(2)


def pruned_state_dict(state: dict[str, torch.Tensor], config: Any, plan: Plan) -> dict[str, torch.Tensor]:
    shape = ModelShape.from_config(config)
    plan.validate(shape)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target = pruned_name(key, plan, shape)
        if target is None:
            continue
        new, layer, relative = target
        sliced = tensor if layer is None else slice_tensor(relative, tensor, layer, plan, shape)
        if sliced is not None:
            out[new] = sliced.clone() if sliced is tensor else sliced
    return out


Loader = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class PrunedTensor:
    """One tensor of the pruned model, not read yet: `read()` returns it sliced, in HF layout."""

    name: str  # HF name in the pruned model (layers renumbered)
    shape: tuple[int, ...]
    source_dtype: torch.dtype  # what the source stores it in
    layer: int | None  # layer in the pruned model; None for the embedding, final norm and head
    read: Loader


def _read_sliced(store: WeightStore, name: str, relative: str, layer: int, plan: Plan,
                 shape: ModelShape) -> torch.Tensor:
    return slice_tensor(relative, store.read(name), layer, plan, shape)


def _read_override(load: Loader, name: str, expected: tuple[int, ...]) -> torch.Tensor:
    tensor = load().detach()
    if tuple(tensor.shape) != expected:
        raise EdgepruneError(f"The replacement weights for {name} have shape {list(tensor.shape)}, but the pruned "
                             f"model's tensor has {list(expected)}; they were computed for another plan.")
    return tensor


# A transformers Llama's state-dict order: files written from any store list tensors alike.
_LAYER_ORDER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                "input_layernorm.weight", "post_attention_layernorm.weight")
_GLOBAL_ORDER = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}


def _order(t: PrunedTensor) -> tuple[int, int, int, str]:
    if t.layer is None:
        return _GLOBAL_ORDER.get(t.name, 4), 0, 0, t.name
    relative = t.name.split(".", 3)[3]
    rank = _LAYER_ORDER.index(relative) if relative in _LAYER_ORDER else len(_LAYER_ORDER)
    return 1, t.layer, rank, t.name


def pruned_tensors(store: WeightStore, plan: Plan,
                   overrides: Mapping[str, Loader] | None = None) -> list[PrunedTensor]:
    """The pruned model's tensors, each read on demand, in a transformers Llama's state-dict order.
    `overrides`: HF names of the pruned model -> loaders of tensors that replace the sliced ones
    (sparsified weights)."""
    shape = ModelShape.from_config(store.config)
    plan.validate(shape)
    overrides = overrides or {}
    out = []
    for name in store.names():
        target = pruned_name(name, plan, shape)
        if target is None:
            continue
        new, layer, relative = target
        if layer is None:
            new_shape, read = store.shape(name), partial(store.read, name)
        else:
            new_shape = sliced_shape(relative, store.shape(name), layer, plan, shape)
            if new_shape is None:
                continue
            read = partial(_read_sliced, store, name, relative, layer, plan, shape)
        if new in overrides:
            read = partial(_read_override, overrides[new], new, new_shape)
        out.append(PrunedTensor(new, new_shape, store.stored_dtype(name),
                                None if layer is None else int(new.split(".")[2]), read))
    unknown = sorted(set(overrides) - {t.name for t in out})
    if unknown:
        raise EdgepruneError(f"Replacement weights name tensors the pruned model does not have "
                             f"({', '.join(unknown[:3])}); they were computed for another plan or model.")
    return sorted(out, key=_order)

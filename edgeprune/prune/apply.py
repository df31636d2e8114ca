"""Apply a Plan to a Llama state dict and config: pure functions, no modules.

A removed sublayer takes its norm with it: the attention's `input_layernorm`, the MLP's
`post_attention_layernorm`. The per-layer slices are the model's truth; `prune/modules.py`
builds the torch model that holds them.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch

from edgeprune.prune.plan import ModelShape, Plan, PlanError

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
    if getattr(new, "layer_types", None) is not None:
        new.layer_types = [new.layer_types[i] for i in plan.kept_layers(shape)]
    return new


def _head_rows(heads: tuple[int, ...], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def prune_layer_heads(tensors: dict[str, torch.Tensor], q_heads: tuple[int, ...], kv_heads: tuple[int, ...],
                      head_dim: int) -> dict[str, torch.Tensor]:
    """Keep the given query heads (rows of q, columns of o) and KV heads (rows of k and v)."""
    q_rows, kv_rows = _head_rows(q_heads, head_dim), _head_rows(kv_heads, head_dim)
    out = dict(tensors)
    for name, t in tensors.items():
        if name.startswith("self_attn.q_proj."):
            out[name] = t.index_select(0, q_rows)
        elif name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            out[name] = t.index_select(0, kv_rows)
        elif name == "self_attn.o_proj.weight":
            out[name] = t.index_select(1, q_rows)
    return out


def prune_layer_channels(tensors: dict[str, torch.Tensor], channels: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Keep the given FFN channels (rows of gate and up, columns of down)."""
    index = torch.tensor(channels, dtype=torch.long)
    out = dict(tensors)
    for name, t in tensors.items():
        if name.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            out[name] = t.index_select(0, index)
        elif name == "mlp.down_proj.weight":
            out[name] = t.index_select(1, index)
    return out


def prune_layer(tensors: dict[str, torch.Tensor], layer: int, plan: Plan,
                shape: ModelShape) -> dict[str, torch.Tensor]:
    """One layer's tensors (names relative to the layer) with the plan's slices for original layer `layer`."""
    heads, channels = dict(plan.heads), dict(plan.ffn)
    if layer in heads:
        if heads[layer]:
            tensors = prune_layer_heads(tensors, plan.kept_heads(layer, shape), plan.kept_kv_heads(layer, shape),
                                        shape.head_dim)
        else:
            tensors = {k: v for k, v in tensors.items() if not k.startswith(ATTENTION_PARAMS)}
    if layer in channels:
        if channels[layer]:
            tensors = prune_layer_channels(tensors, channels[layer])
        else:
            tensors = {k: v for k, v in tensors.items() if not k.startswith(MLP_PARAMS)}
    return tensors


def pruned_state_dict(state: dict[str, torch.Tensor], config: Any, plan: Plan) -> dict[str, torch.Tensor]:
    shape = ModelShape.from_config(config)
    plan.validate(shape)
    new_index = {old: new for new, old in enumerate(plan.kept_layers(shape))}
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            out[key] = tensor.clone()
        elif int(m.group(1)) in new_index:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    for old, tensors in per_layer.items():
        for name, t in prune_layer(tensors, old, plan, shape).items():
            out[f"model.layers.{new_index[old]}.{name}"] = t.clone()
    return out

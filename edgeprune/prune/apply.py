"""Apply a Plan to a Llama model: pure functions over the config and the state dict.

The pruned model is built fresh from the pruned config and loaded with `strict=True`, so a
config that disagrees with its tensors fails here rather than in a runtime.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch

from edgeprune.prune.plan import ModelShape, Plan

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def pruned_config(config: Any, plan: Plan) -> Any:
    shape = ModelShape.from_config(config)
    plan.validate(shape)
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(plan.kept_layers(shape))
    new.num_attention_heads, new.num_key_value_heads = plan.layer_heads(shape)
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
        if dict(plan.heads).get(old) is not None:
            tensors = prune_layer_heads(
                tensors, plan.kept_heads(old, shape), plan.kept_kv_heads(old, shape), shape.head_dim
            )
        for name, t in tensors.items():
            out[f"model.layers.{new_index[old]}.{name}"] = t.clone()
    return out


def apply_plan(model: Any, plan: Plan) -> Any:
    """A pruned copy of `model` (the reference is left untouched)."""
    from transformers import LlamaForCausalLM

    config = pruned_config(model.config, plan)
    state = pruned_state_dict(model.state_dict(), model.config, plan)
    pruned = LlamaForCausalLM(config)
    pruned.load_state_dict(state, strict=True)
    return pruned.eval()

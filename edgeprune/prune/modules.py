"""The torch side of a pruned model: per-layer shapes in a transformers Llama.

A uniform plan is a plain `LlamaForCausalLM` of a smaller config. Otherwise each layer gets its own
attention / MLP modules sized to what it keeps, and a removed sublayer becomes a module that adds
nothing to the residual stream, so the torch model computes what llama.cpp's `deci` graph does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from edgeprune.prune.apply import pruned_config, pruned_state_dict
from edgeprune.prune.plan import LayerShape, ModelShape, Plan


class RemovedAttention(nn.Module):
    """A layer's attention after pruning removed it: its residual branch is zero."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """A layer's MLP after pruning removed it: its residual branch is zero."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _layer_config(config: Any, layer_shape: LayerShape) -> Any:
    out = copy.deepcopy(config)
    out.num_attention_heads = layer_shape.n_head or config.num_attention_heads
    out.num_key_value_heads = layer_shape.n_head_kv or config.num_key_value_heads
    out.intermediate_size = layer_shape.ffn or config.intermediate_size
    return out


def _reshape_layers(model: Any, shapes: list[LayerShape]) -> None:
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    for i, (layer, layer_shape) in enumerate(zip(model.model.layers, shapes, strict=True)):
        cfg = _layer_config(model.config, layer_shape)
        if not layer_shape.has_attention:
            layer.self_attn, layer.input_layernorm = RemovedAttention(), nn.Identity()
        else:
            layer.self_attn = LlamaAttention(cfg, layer_idx=i)
        if not layer_shape.has_mlp:
            layer.mlp, layer.post_attention_layernorm = RemovedMLP(), nn.Identity()
        else:
            layer.mlp = LlamaMLP(cfg)


def apply_plan(model: Any, plan: Plan) -> Any:
    """A pruned copy of `model` (the reference is left untouched)."""
    from transformers import LlamaForCausalLM

    shape = ModelShape.from_config(model.config)
    plan.validate(shape)
    uniform = plan.uniform_shape(shape) is not None
    if uniform:
        config = pruned_config(model.config, plan)
    else:
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = len(plan.kept_layers(shape))
        config.head_dim = shape.head_dim
    state = pruned_state_dict(model.state_dict(), model.config, plan)
    # Built on the meta device: random initialisation of weights about to be replaced costs time.
    with torch.device("meta"):
        pruned = LlamaForCausalLM(config)
        if not uniform:
            _reshape_layers(pruned, plan.layer_shapes(shape))
    pruned.to_empty(device="cpu")
    pruned.tie_weights()  # to_empty gives every parameter fresh storage, which unties tied embeddings
    pruned.load_state_dict(state, strict=True)
    # RoPE frequencies are non-persistent buffers (not in the state dict): take the reference's.
    pruned.model.rotary_emb = copy.deepcopy(model.model.rotary_emb)
    return pruned.eval()


def layer_shapes(model: Any) -> list[LayerShape]:
    """Each layer's shape, read from the modules themselves (the truth the exporter writes)."""
    head_dim = model.config.head_dim
    shapes = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        has_attn, has_mlp = not isinstance(attn, RemovedAttention), not isinstance(mlp, RemovedMLP)
        shapes.append(LayerShape(
            n_head=attn.q_proj.out_features // head_dim if has_attn else 0,
            n_head_kv=attn.k_proj.out_features // head_dim if has_attn else 0,
            ffn=mlp.gate_proj.out_features if has_mlp else 0,
        ))
    return shapes

"""The torch side of a pruned model, whole: the family's transformers model with per-layer shapes.

Builds pass over models one layer at a time (`models/streamed.py`); a whole model in memory is for
what needs every layer at once (gradients, the loss at the output) and for tests, which compare
llama.cpp against it. A uniform plan is a plain model of the family (`LlamaForCausalLM`, ...) of a
smaller config. Otherwise
each layer gets its own attention / MLP modules sized to what it keeps, and a removed sublayer
becomes a module that adds nothing to the residual stream, so the torch model computes what
llama.cpp's `deci` graph does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from edgeprune.families import family_of
from edgeprune.models.weights import FINAL_NORM, LM_HEAD, ModuleStore, WeightStore
from edgeprune.prune.apply import pruned_config
from edgeprune.prune.plan import LayerShape, ModelShape, Plan


def materialize(store: WeightStore, plan: Plan | None = None, overrides: dict | None = None,
                dtype: torch.dtype = torch.float32) -> Any:
    """The whole (pruned) model in memory, its layers read from `store` one by one."""
    from edgeprune.models.streamed import DecoderStream  # imports prune.apply: not at module level

    stream = DecoderStream(store, plan, overrides, dtype)
    if stream.plan.uniform_shape(stream.shape) is not None:
        config = pruned_config(store.config, stream.plan)
    else:
        config = copy.deepcopy(store.config)
        config.num_hidden_layers = stream.n_layers
        config.head_dim = stream.shape.head_dim
    with torch.device("meta"):
        model = family_of(config).causal_lm(config)
    model.model.layers = torch.nn.ModuleList(stream.load(i) for i in range(stream.n_layers))
    model.model.embed_tokens.weight = torch.nn.Parameter(store.read("model.embed_tokens.weight").to(dtype))
    model.model.norm.weight = torch.nn.Parameter(store.read(FINAL_NORM).to(dtype))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head.weight = torch.nn.Parameter(store.read(LM_HEAD).to(dtype))
    # RoPE frequencies (and Gemma's embedding scale) are non-persistent buffers computed at construction.
    family_of(config).real_buffers(model)
    return model.eval()


def apply_plan(model: Any, plan: Plan) -> Any:
    """A pruned copy of an in-memory `model` (the model is left untouched)."""
    return materialize(ModuleStore(model), plan, dtype=next(model.parameters()).dtype)


def layer_shapes(model: Any) -> list[LayerShape]:
    """Each layer's shape, read from the modules themselves."""
    from edgeprune.models.streamed import RemovedAttention, RemovedMLP

    head_dim = ModelShape.from_config(model.config).head_dim
    shapes = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        has_attn, has_mlp = not isinstance(attn, RemovedAttention), not isinstance(mlp, RemovedMLP)
        n_head = attn.o_proj.in_features // head_dim if has_attn else 0
        kv_rows = (attn.k_proj.out_features if hasattr(attn, "k_proj") else  # else q, k, v fused (Phi-3)
                   (attn.qkv_proj.out_features - n_head * head_dim) // 2) if has_attn else 0
        shapes.append(LayerShape(n_head=n_head, n_head_kv=kv_rows // head_dim,
                                 ffn=mlp.down_proj.in_features if has_mlp else 0))
    return shapes

"""Our GGUF writer for torch Llama models (architectures `llama` and `deci`), on top of gguf-py.

Only torch -> GGUF layout lives here: tensor names, the Q/K row permutation llama.cpp's RoPE
expects, hyper-parameters, and edgeprune's provenance keys. The tokenizer writes itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from edgeprune import __version__
from edgeprune.errors import EdgepruneError
from edgeprune.export.rope import write_rope
from edgeprune.models.tokenizer import TokenizerSpec
from edgeprune.prune import LayerShape, ModelShape, layer_shapes

LLAMA, DECI = gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.DECI
# FFN width written for a layer whose MLP was removed but whose attention was kept.
PLACEHOLDER_FFN = 1
T = gguf.MODEL_TENSOR


class ProvenanceKeys:
    """edgeprune's own GGUF metadata keys."""

    VERSION = "edgeprune.version"
    SOURCE = "edgeprune.source"
    SOURCE_SHA256 = "edgeprune.source_sha256"
    PLAN = "edgeprune.plan"
    SPARSITY = "edgeprune.sparsity"  # only in sparsified models


@dataclass(frozen=True)
class Provenance:
    source: str
    source_sha256: str
    plan: dict[str, Any]
    sparsity: dict[str, Any] | None = None  # the SparsitySpec the weights were sparsified with


# HF parameter name (inside a layer, or global) -> GGUF tensor kind.
_GLOBAL = {
    "model.embed_tokens.weight": T.TOKEN_EMBD,
    "model.norm.weight": T.OUTPUT_NORM,
    "lm_head.weight": T.OUTPUT,
}
_LAYER = {
    "input_layernorm.weight": T.ATTN_NORM,
    "self_attn.q_proj.weight": T.ATTN_Q,
    "self_attn.k_proj.weight": T.ATTN_K,
    "self_attn.v_proj.weight": T.ATTN_V,
    "self_attn.o_proj.weight": T.ATTN_OUT,
    "post_attention_layernorm.weight": T.FFN_NORM,
    "mlp.gate_proj.weight": T.FFN_GATE,
    "mlp.up_proj.weight": T.FFN_UP,
    "mlp.down_proj.weight": T.FFN_DOWN,
}
DTYPES = {"F32": (np.float32, gguf.LlamaFileType.ALL_F32), "F16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}


def rope_interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores Q/K rows per head in rotate-half order; llama.cpp's RoPE pairs adjacent rows."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return gguf.TENSOR_NAMES[_GLOBAL[hf_name]] + ".weight"
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
        return gguf.TENSOR_NAMES[_LAYER[parts[3]]].format(bid=int(parts[2])) + ".weight"
    raise EdgepruneError(f"The model has a tensor edgeprune cannot place in a llama GGUF: {hf_name}.")


def _write_structure(writer: gguf.GGUFWriter, shape: ModelShape, layers: list[LayerShape]) -> None:
    """Layer counts and widths: scalars for `llama`, per-layer arrays for `deci`."""
    writer.add_block_count(len(layers))
    if _is_uniform(layers):
        writer.add_feed_forward_length(layers[0].ffn)
        writer.add_head_count(layers[0].n_head)
        writer.add_head_count_kv(layers[0].n_head_kv)
    else:
        writer.add_feed_forward_length([s.ffn or (PLACEHOLDER_FFN if s.has_attention else 0) for s in layers])
        writer.add_head_count([s.n_head for s in layers])
        writer.add_head_count_kv([s.n_head_kv for s in layers])
    # Written always: after head pruning head_dim != hidden / heads, and deci requires them.
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)


def _is_uniform(layers: list[LayerShape]) -> bool:
    return len(set(layers)) == 1 and layers[0].has_attention and layers[0].has_mlp


def architecture(layers: list[LayerShape]) -> str:
    """`llama` when every layer has one shape; `deci` (per-layer shapes) otherwise."""
    return gguf.MODEL_ARCH_NAMES[LLAMA if _is_uniform(layers) else DECI]


def _placeholder_mlp(layer: int, hidden: int) -> dict[str, np.ndarray]:
    """llama.cpp's deci graph skips a layer's residual add when its FFN width is 0, losing the
    attention output too; a width-1 FFN with zero weights adds exactly nothing instead."""
    zeros_in = np.zeros((PLACEHOLDER_FFN, hidden), np.float32)
    zeros_out = np.zeros((hidden, PLACEHOLDER_FFN), np.float32)
    names = {T.FFN_NORM: np.ones(hidden, np.float32), T.FFN_GATE: zeros_in, T.FFN_UP: zeros_in, T.FFN_DOWN: zeros_out}
    return {gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight": data for kind, data in names.items()}


def _tensors(model: Any, layers: list[LayerShape], np_dtype: type) -> Iterator[tuple[str, np.ndarray]]:
    config = model.config
    head_dim = ModelShape.from_config(config).head_dim
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd when `output` is absent
        t = tensor.detach().float()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            t = rope_interleave(t, t.shape[0] // head_dim)  # this layer's own head count
        yield gguf_tensor_name(hf_name), t.numpy().astype(np.float32 if t.ndim == 1 else np_dtype)
    for i, s in enumerate(layers):
        if s.has_attention and not s.has_mlp:
            for name, data in _placeholder_mlp(i, config.hidden_size).items():
                yield name, data if data.ndim == 1 else data.astype(np_dtype)


def export_gguf(
    model: Any, tokenizer: TokenizerSpec, path: Path, dtype: str, provenance: Provenance, name: str
) -> None:
    """Write `model` to `path` (atomically) as a GGUF of F32 or F16 weights: arch `llama`, or `deci`
    when its layers differ in shape (see `prune/modules.py`)."""
    np_dtype, file_type = DTYPES[dtype]
    config = model.config
    shape = ModelShape.from_config(config)
    layers = layer_shapes(model)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), architecture(layers))
    try:
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_vocab_size(shape.vocab)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(shape.hidden)
        _write_structure(writer, shape, layers)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        extra_tensors = write_rope(writer, config)
        tokenizer.write(writer)
        writer.add_string(ProvenanceKeys.VERSION, __version__)
        writer.add_string(ProvenanceKeys.SOURCE, provenance.source)
        writer.add_string(ProvenanceKeys.SOURCE_SHA256, provenance.source_sha256)
        writer.add_string(ProvenanceKeys.PLAN, json.dumps(provenance.plan, sort_keys=True))
        if provenance.sparsity is not None:
            writer.add_string(ProvenanceKeys.SPARSITY, json.dumps(provenance.sparsity, sort_keys=True))

        for gguf_name, data in _tensors(model, layers, np_dtype):
            writer.add_tensor(gguf_name, data)
        for gguf_name, data in extra_tensors.items():
            writer.add_tensor(gguf_name, data)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise

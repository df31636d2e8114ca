"""A Llama decoder, pruned or not, as an ONNX graph for ONNX Runtime, written from a `WeightStore`
with a plan's slices applied, one tensor in memory at a time.

Inputs and outputs (the names onnxruntime-genai and optimum use):
- `input_ids` int64 [batch, sequence], `attention_mask` int64 [batch, total_sequence];
- `past_key_values.{i}.key` / `.value` float32 [batch, kv_heads_i, past_sequence, head_dim] for every
  layer i (of the pruned model) that keeps its attention; a layer without attention has no cache;
- `logits` float32 [batch, sequence, vocab], `present.{i}.key` / `.value` [batch, kv_heads_i,
  total_sequence, head_dim].

Attention is com.microsoft's GroupQueryAttention, which applies RoPE itself (HF's rotate-half
layout, so Q/K rows are written as HF stores them) from cos/sin tables of the model's own
frequencies, llama3 and linear scaling included. Each layer's head counts are that node's
attributes and its FFN width the shapes of its weights, so per-layer plans need nothing special.
Weights are fp32 MatMuls, or block-quantized `MatMulNBits` (4 or 8 bits) for the decoder's
linear layers with the output head in 8 bits and the embedding in fp16.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import TensorProto, helper

from edgeprune import __version__
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance
from edgeprune.export.rope import head_dim, llama3_rope_factors, rope_parameters, rope_theta, rope_type
from edgeprune.models.weights import WeightStore
from edgeprune.prune import LayerShape, ModelShape, Plan
from edgeprune.prune.apply import Loader, PrunedTensor, pruned_tensors
from edgeprune.runtimes.onnx import nbits
from edgeprune.runtimes.onnx.graph import MICROSOFT, GraphWriter, save
from edgeprune.runtimes.onnx.io_names import ATTENTION_MASK, INPUT_IDS, LOGITS, past_names, present_names
from edgeprune.runtimes.onnx.weights import OnnxWeights

log = logging.getLogger(__name__)

MAX_CONTEXT = 4096  # rows of the RoPE tables: the longest sequence the graph runs (capped by the model's)


class MetadataKeys:
    """edgeprune's keys in the model's metadata_props."""

    VERSION = "edgeprune.version"
    NAME = "edgeprune.name"
    SOURCE = "edgeprune.source"
    SOURCE_SHA256 = "edgeprune.source_sha256"
    PLAN = "edgeprune.plan"
    SPARSITY = "edgeprune.sparsity"
    RECOVERY = "edgeprune.recovery"
    WEIGHTS = "edgeprune.weights"  # OnnxWeights as JSON
    CONTEXT = "edgeprune.context"


# A linear layer's weight (N, K) -> the packed form MatMulNBits reads (round-to-nearest by default;
# a calibrated quantizer chooses the codes itself).
Quantizer = Callable[[str, np.ndarray, int, int, bool], nbits.Packed]


def _round_to_nearest(name: str, w: np.ndarray, bits: int, block: int, symmetric: bool) -> nbits.Packed:
    return nbits.pack(w, bits, block, symmetric)


def inv_freq(config: Any) -> np.ndarray:
    """RoPE's rotation frequencies per pair of a head's dimensions, scaling applied (float32)."""
    dim = head_dim(config)
    freqs = 1.0 / (rope_theta(config) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    kind = rope_type(config)
    if kind == "default":
        return freqs.astype(np.float32)
    if kind == "linear":
        return (freqs / float(rope_parameters(config)["factor"])).astype(np.float32)
    if kind == "llama3":
        return (freqs / llama3_rope_factors(config)).astype(np.float32)
    raise EdgepruneError(f"The model uses RoPE scaling '{kind}', which edgeprune cannot export to ONNX yet "
                         "(supported: default, linear, llama3).")


class _Writer:
    """One decoder graph being written: tensors read from the pruned model as nodes need them."""

    def __init__(self, g: GraphWriter, tensors: dict[str, PrunedTensor], weights: OnnxWeights,
                 quantizer: Quantizer, eps: float) -> None:
        self.g, self.tensors, self.weights, self.quantizer, self.eps = g, tensors, weights, quantizer, eps

    def read(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        data = t.read().detach()
        if tuple(data.shape) != t.shape:
            raise ValueError(f"{name}: planned shape {t.shape}, read {tuple(data.shape)}")
        return data.to(torch.float32).numpy()

    def norm(self, x: str, name: str) -> str:
        # SimplifiedLayerNormalization is ONNX Runtime's RMSNorm, registered in the default domain.
        return self.g.op("SimplifiedLayerNormalization", [x, self.g.weight(name, self.read(name))], axis=-1,
                         epsilon=self.eps, stash_type=1, name=name)

    def linear(self, x: str, name: str, bits: int | None = None) -> str:
        w = self.read(name)  # (N, K)
        bits = self.weights.bits if bits is None else bits
        if bits is None:
            return self.g.op("MatMul", [x, self.g.weight(name, w.T)], name=name)
        p = self.quantizer(name, w, bits, self.weights.block, self.weights.symmetric)
        del w
        inputs = [x, self.g.weight(f"{name}.q{bits}", p.weight), self.g.weight(f"{name}.scales", p.scales)]
        if p.zero_points is not None:
            inputs.append(self.g.weight(f"{name}.zero_points", p.zero_points))
        return self.g.op("MatMulNBits", inputs, domain=MICROSOFT, name=name, K=p.k, N=p.weight.shape[0],
                         bits=bits, block_size=p.block, accuracy_level=self.weights.accuracy_level)


def _attention(w: _Writer, x: str, i: int, s: LayerShape, hd: int, rope: dict[str, str]) -> tuple[str, list, list]:
    p = f"model.layers.{i}.self_attn"
    q, k, v = (w.linear(x, f"{p}.{n}_proj.weight") for n in "qkv")
    past, present = past_names(i), present_names(i)
    out, *_ = w.g.op("GroupQueryAttention", [q, k, v, *past, rope["seqlens_k"], rope["total"], rope["cos"],
                                             rope["sin"]], outputs=[w.g.fresh(f"{p}/attn"), *present],
                     domain=MICROSOFT, name=f"{p}.attention", num_heads=s.n_head, kv_num_heads=s.n_head_kv,
                     do_rotary=1, rotary_interleaved=0)
    cache = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", s.n_head_kv, size, hd])
             for names, size in ((past, "past_sequence"), (present, "total_sequence")) for n in names]
    return w.linear(out, f"{p}.o_proj.weight"), cache[:2], cache[2:]


def _mlp(w: _Writer, x: str, i: int) -> str:
    p = f"model.layers.{i}.mlp"
    gate = w.linear(x, f"{p}.gate_proj.weight")
    up = w.linear(x, f"{p}.up_proj.weight")
    silu = w.g.op("Mul", [gate, w.g.op("Sigmoid", [gate])])
    return w.linear(w.g.op("Mul", [silu, up]), f"{p}.down_proj.weight")


def _rope_inputs(g: GraphWriter, config: Any, context: int) -> dict[str, str]:
    """GroupQueryAttention's sequence lengths (from the attention mask) and RoPE tables."""
    valid = g.op("ReduceSum", [ATTENTION_MASK, g.const([1])], keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [valid, g.const(1)])], to=TensorProto.INT32)
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", [ATTENTION_MASK]), g.const(1)], axis=0)],
                 to=TensorProto.INT32)
    angles = np.arange(context, dtype=np.float32)[:, None] * inv_freq(config)[None, :]
    return {"seqlens_k": seqlens_k, "total": total, "cos": g.weight("rope.cos", np.cos(angles)),
            "sin": g.weight("rope.sin", np.sin(angles))}


def _head(w: _Writer, x: str, tied: bool, vocab: int) -> str:
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    if w.weights.bits is not None:
        return w.g.op("Identity", [w.linear(x, name, bits=w.weights.head_bits)], outputs=[LOGITS])
    # Gemm reads the (vocab, hidden) matrix as stored, so a tied head shares the embedding's copy.
    g = w.g
    table = name if tied else g.weight(name, w.read(name))
    flat = g.op("Gemm", [g.op("Reshape", [x, g.const([-1, w.tensors[name].shape[1]])]), table], transB=1)
    batch_seq = g.op("Slice", [g.op("Shape", [INPUT_IDS]), g.const([0]), g.const([2])])
    return g.op("Reshape", [flat, g.op("Concat", [batch_seq, g.const([vocab])], axis=0)], outputs=[LOGITS])


def _embedding(w: _Writer) -> str:
    name = "model.embed_tokens.weight"
    table = w.read(name)
    if w.weights.bits is None:
        return w.g.op("Gather", [w.g.weight(name, table), INPUT_IDS], axis=0)
    rows = w.g.op("Gather", [w.g.weight(name, table.astype(np.float16)), INPUT_IDS], axis=0)
    return w.g.op("Cast", [rows], to=TensorProto.FLOAT)


def write_onnx(store: WeightStore, plan: Plan, path: Path, weights: OnnxWeights, provenance: Provenance,
               name: str, overrides: Mapping[str, Loader] | None = None, quantizer: Quantizer | None = None,
               context: int | None = None) -> None:
    """Write `store`'s model with `plan` applied as `path` and its weights as `path`.data, both
    written aside and renamed when complete (the weights first)."""
    config = store.config
    shape = ModelShape.from_config(config)
    if shape.family != "llama":  # this graph is Llama's layer: no biases, no Q/K norms
        raise EdgepruneError(f"edgeprune writes ONNX models of the llama family only so far, not {shape.family}.")
    layers = plan.layer_shapes(shape)
    tensors = {t.name: t for t in pruned_tensors(store, plan, overrides)}
    context = min(context or MAX_CONTEXT, int(config.max_position_embeddings))
    data_path = path.with_name(path.name + ".data")
    tmp_model, tmp_data = (p.with_name(p.name + ".tmp") for p in (path, data_path))
    tied = "lm_head.weight" not in tensors
    try:
        with open(tmp_data, "wb") as data:
            g = GraphWriter(data, data_path.name)
            w = _Writer(g, tensors, weights, quantizer or _round_to_nearest, float(config.rms_norm_eps))
            inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
                      helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_sequence"])]
            outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", "sequence", shape.vocab])]
            h = _embedding(w)
            rope = _rope_inputs(g, config, context)
            for i, s in enumerate(layers):
                if s.has_attention:
                    x = w.norm(h, f"model.layers.{i}.input_layernorm.weight")
                    out, past, present = _attention(w, x, i, s, shape.head_dim, rope)
                    h = g.op("Add", [h, out])
                    inputs += past
                    outputs += present
                if s.has_mlp:
                    h = g.op("Add", [h, _mlp(w, w.norm(h, f"model.layers.{i}.post_attention_layernorm.weight"), i)])
            _head(w, w.norm(h, "model.norm.weight"), tied, shape.vocab)
            metadata = {MetadataKeys.VERSION: __version__, MetadataKeys.NAME: name,
                        MetadataKeys.SOURCE: provenance.source, MetadataKeys.SOURCE_SHA256: provenance.source_sha256,
                        MetadataKeys.PLAN: json.dumps(provenance.plan, sort_keys=True),
                        MetadataKeys.WEIGHTS: json.dumps(asdict(weights), sort_keys=True),
                        MetadataKeys.CONTEXT: str(context)}
            if provenance.sparsity is not None:
                metadata[MetadataKeys.SPARSITY] = json.dumps(provenance.sparsity, sort_keys=True)
            if provenance.recovery is not None:
                metadata[MetadataKeys.RECOVERY] = json.dumps(provenance.recovery, sort_keys=True)
            model = g.model(inputs, outputs, name, metadata)
        save(model, tmp_model)
        os.replace(tmp_data, data_path)
        os.replace(tmp_model, path)
    except BaseException:
        tmp_model.unlink(missing_ok=True)
        tmp_data.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%s, %d layers)", path, weights.describe(), len(layers))

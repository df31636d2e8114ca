"""Our GGUF writer, on top of gguf-py, for every family (`edgeprune.families`).

Only torch -> GGUF layout lives here: tensor names (gguf-py's table), the Q/K row permutation of
families whose llama.cpp graph wants it, hyper-parameters, and edgeprune's provenance keys. The
family picks the architecture (Llama: `llama`, or `deci` for per-layer shapes) and writes its own
extra metadata; the tokenizer writes itself.

One writer streams: the tensor table is written from shapes alone, then each tensor is read from
a `WeightStore` (the plan's slices applied), converted and written before the next is read, so
memory holds one tensor. `export_gguf` is the same writer over an in-memory torch model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from edgeprune import __version__
from edgeprune.export.rope import write_rope
from edgeprune.families import family_of, interleaves_qk
from edgeprune.models.tokenizer import TokenizerSpec
from edgeprune.models.weights import QK_ROWS, ModuleStore, WeightStore
from edgeprune.prune import LayerShape, ModelShape, Plan, layer_shapes
from edgeprune.prune.apply import Loader, PrunedTensor, kept_layer_types, pruned_tensors

log = logging.getLogger(__name__)

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
    RECOVERY = "edgeprune.recovery"  # only in recovered models: how they were fine-tuned


@dataclass(frozen=True)
class Provenance:
    source: str
    source_sha256: str
    plan: dict[str, Any]
    sparsity: dict[str, Any] | None = None  # the SparsitySpec the weights were sparsified with
    recovery: dict[str, Any] | None = None  # the RecoverySettings and training record of recovered weights


Q = gguf.GGMLQuantizationType
# The weights' type in the file: F32 or F16/BF16 for every matrix (vectors stay F32, as in llama.cpp's
# converter), or "auto": BF16 where the source stores bf16, F16 elsewhere, BF16 for a matrix F16 cannot hold.
DTYPES = ("F32", "F16", "BF16", "auto")
F16_MAX = 65504.0
_FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
               Q.BF16: gguf.LlamaFileType.MOSTLY_BF16}
_NUMPY = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.int16}  # BF16: the raw 16 bits


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the GGUF, not read yet: `load()` returns it in llama.cpp's row order."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order (rows first)
    source_dtype: torch.dtype
    load: Callable[[], torch.Tensor]


def rope_interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores Q/K rows per head in rotate-half order; llama.cpp's RoPE pairs adjacent rows."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_structure(writer: gguf.GGUFWriter, shape: ModelShape, layers: list[LayerShape], arch: str,
                     rope_dims: int) -> None:
    """Layer counts and widths: scalars, or per-layer arrays for `deci`."""
    writer.add_block_count(len(layers))
    if arch != gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI]:
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
    writer.add_rope_dimension_count(rope_dims)


def architecture(config: Any, layers: list[LayerShape]) -> str:
    """The architecture a model of `config` pruned to these layers is written as (`Family.gguf_arch`)."""
    return gguf.MODEL_ARCH_NAMES[family_of(config).gguf_arch(layers, ModelShape.from_config(config))]


def _placeholder_mlp(layer: int, hidden: int, dtype: torch.dtype) -> list[PlannedTensor]:
    """llama.cpp's deci graph skips a layer's residual add when its FFN width is 0, losing the
    attention output too; a width-1 FFN with zero weights adds exactly nothing instead."""
    shapes = {T.FFN_NORM: (hidden,), T.FFN_GATE: (PLACEHOLDER_FFN, hidden), T.FFN_UP: (PLACEHOLDER_FFN, hidden),
              T.FFN_DOWN: (hidden, PLACEHOLDER_FFN)}
    return [PlannedTensor(gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight", shape, dtype,
                          partial(torch.ones if kind == T.FFN_NORM else torch.zeros, shape))
            for kind, shape in shapes.items()]


def _gguf_layout(load: Callable[[], torch.Tensor], n_heads: int | None, shift: float = 0.0) -> torch.Tensor:
    t = load().detach()
    if shift:  # in the stored dtype, as llama.cpp's converter adds it
        t = t + shift
    return t if n_heads is None else rope_interleave(t, n_heads)


def _planned(tensors: list[PrunedTensor], layers: list[LayerShape], config: Any, arch: str) -> list[PlannedTensor]:
    """The GGUF's tensors: the pruned model's (Q/K rows interleaved with each layer's own head
    count where `arch` wants it), then the placeholder MLPs of layers that keep only their attention."""
    head_dim = ModelShape.from_config(config).head_dim
    family, interleave = family_of(config), interleaves_qk(arch)
    out = []
    for t in tensors:
        rope = interleave and t.name.endswith(QK_ROWS)
        out.append(PlannedTensor(family.gguf_name(t.name), t.shape, t.source_dtype,
                                 partial(_gguf_layout, t.read, t.shape[0] // head_dim if rope else None,
                                         family.norm_shift(t.name))))
    dtype = out[0].source_dtype
    for i, s in enumerate(layers):
        if s.has_attention and not s.has_mlp:
            out.extend(_placeholder_mlp(i, config.hidden_size, dtype))
    return out


def _declared_type(dtype: str, t: PlannedTensor) -> Q:
    """The type `t` is declared with (an "auto" F16 matrix may still be written BF16: see `_encode`)."""
    if dtype == "F32" or len(t.shape) < 2:
        return Q.F32
    if dtype == "auto":
        return Q.BF16 if t.source_dtype == torch.bfloat16 else Q.F16
    return Q[dtype]


def _encode(t: torch.Tensor, qtype: Q, dtype: str, name: str) -> tuple[np.ndarray, Q]:
    """`t`'s bytes as `qtype`, and the type written; "auto" writes BF16 instead of an F16 that would overflow."""
    if qtype == Q.F16 and t.numel():
        low, high = torch.aminmax(t)
        peak = max(-float(low), float(high))
        if peak > F16_MAX:
            if dtype == "auto":
                log.info("%s exceeds F16's range (|x| up to %.4g): written as BF16", name, peak)
                qtype = Q.BF16
            else:
                log.warning("%s exceeds F16's range (|x| up to %.4g): its F16 copy holds infinities", name, peak)
    if qtype == Q.BF16:
        return np.ascontiguousarray(t.to(torch.bfloat16).view(torch.int16).numpy()), qtype
    return np.ascontiguousarray(t.to(torch.float32 if qtype == Q.F32 else torch.float16).numpy()), qtype


def _type_field_offsets(ti_start: int, tensors: list[PlannedTensor]) -> list[int]:
    """Where each tensor's type (uint32) sits in the file: the GGUF v3 tensor-info table is, per tensor,
    name length (u64), name, dims count (u32), dims (u64 each), type (u32), data offset (u64)."""
    offsets, pos = [], ti_start
    for t in tensors:
        head = 8 + len(t.name.encode()) + 4 + 8 * len(t.shape)
        offsets.append(pos + head)
        pos += head + 4 + 8
    return offsets


def _write(path: Path, config: Any, layers: list[LayerShape], arch: str, tensors: list[PlannedTensor],
           tokenizer: TokenizerSpec, dtype: str, provenance: Provenance, name: str) -> None:
    """The one GGUF writer: metadata and the tensor table first, then each tensor read, converted,
    written and dropped in turn. Written aside, renamed when complete."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    shape = ModelShape.from_config(config)
    family = family_of(config)
    types = [_declared_type(dtype, t) for t in tensors]
    by_bytes: dict[Q, int] = {}
    for t, q in zip(tensors, types, strict=True):
        by_bytes[q] = by_bytes.get(q, 0) + math.prod(t.shape)
    matrices = {q: n for q, n in by_bytes.items() if q != Q.F32} or {Q.F32: 1}
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name)
        writer.add_file_type(_FILE_TYPES[max(matrices, key=matrices.get)])
        writer.add_vocab_size(shape.vocab)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(shape.hidden)
        _write_structure(writer, shape, layers, arch, family.rope_dims(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        extra = write_rope(writer, config, family.rope_kinds) | family.write_hparams(writer, config)
        tokenizer.write(writer)
        writer.add_string(ProvenanceKeys.VERSION, __version__)
        writer.add_string(ProvenanceKeys.SOURCE, provenance.source)
        writer.add_string(ProvenanceKeys.SOURCE_SHA256, provenance.source_sha256)
        writer.add_string(ProvenanceKeys.PLAN, json.dumps(provenance.plan, sort_keys=True))
        if provenance.sparsity is not None:
            writer.add_string(ProvenanceKeys.SPARSITY, json.dumps(provenance.sparsity, sort_keys=True))
        if provenance.recovery is not None:
            writer.add_string(ProvenanceKeys.RECOVERY, json.dumps(provenance.recovery, sort_keys=True))

        tensors = tensors + [PlannedTensor(n, a.shape, torch.float32, partial(torch.from_numpy, a))
                             for n, a in extra.items()]
        types += [Q.F32] * len(extra)
        for t, q in zip(tensors, types, strict=True):
            item = np.dtype(_NUMPY[q])
            writer.add_tensor_info(t.name, t.shape, item, math.prod(t.shape) * item.itemsize, raw_dtype=q)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        ti_start = writer.fout[0].tell()  # one output file: no split
        writer.write_ti_data_to_file()
        promoted = []
        for i, (t, q) in enumerate(zip(tensors, types, strict=True)):
            data = t.load()
            if tuple(data.shape) != t.shape:
                raise ValueError(f"{t.name}: planned shape {t.shape}, read {tuple(data.shape)}")
            array, written = _encode(data, q, dtype, t.name)
            del data
            writer.write_tensor_data(array)
            del array
            if written != q:
                promoted.append(i)
        writer.close()
        if promoted:  # F16 and BF16 have the same size: only the tensor-info type changes
            offsets = _type_field_offsets(ti_start, tensors)
            with open(tmp, "r+b") as f:
                for i in promoted:
                    f.seek(offsets[i])
                    f.write(struct.pack("<I", int(Q.BF16)))
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def write_gguf(store: WeightStore, plan: Plan, tokenizer: TokenizerSpec, path: Path, dtype: str,
               provenance: Provenance, name: str, overrides: Mapping[str, Loader] | None = None) -> None:
    """Write `store`'s model with `plan` applied to `path` (atomically), one tensor in memory at a time:
    the family's architecture for its layers (see `architecture`). `dtype`: one of DTYPES. `overrides`: HF
    names of the pruned model -> loaders of tensors that replace the sliced ones (sparsified weights)."""
    shape = ModelShape.from_config(store.config)
    layers = plan.layer_shapes(shape)
    config = kept_layer_types(store.config, plan.kept_layers(shape))  # Gemma 3 writes their pattern
    arch = architecture(config, layers)
    tensors = _planned(pruned_tensors(store, plan, overrides), layers, config, arch)
    _write(path, config, layers, arch, tensors, tokenizer, dtype, provenance, name)


def export_gguf(
    model: Any, tokenizer: TokenizerSpec, path: Path, dtype: str, provenance: Provenance, name: str
) -> None:
    """Write an in-memory torch model (pruned by `apply_plan` or not) to `path` (atomically): the
    streaming writer over the model's own tensors, with the layer shapes its modules have."""
    layers = layer_shapes(model)
    arch = architecture(model.config, layers)
    tensors = _planned(pruned_tensors(ModuleStore(model), Plan()), layers, model.config, arch)
    _write(path, model.config, layers, arch, tensors, tokenizer, dtype, provenance, name)

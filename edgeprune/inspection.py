"""`edgeprune inspect`: what a GGUF holds — structure, tensor types, bits per weight, provenance."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgeprune.export.gguf_llama import ProvenanceKeys
from edgeprune.gguf_file import bits_per_weight, is_weight, read_gguf

K_BLOCK = 256
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
_GROUP = re.compile(r"^blk\.\d+\.(\w+)\.weight$")
MIB = 1 << 20


@dataclass(frozen=True)
class LayerInfo:
    n_head: int
    n_head_kv: int
    ffn: int
    attention: bool
    mlp: bool

    def describe(self) -> str:
        attn = f"{self.n_head} heads / {self.n_head_kv} KV" if self.attention else "attention skipped"
        mlp = f"FFN {self.ffn}" if self.mlp else "MLP skipped"
        return f"{attn} / {mlp}"


@dataclass(frozen=True)
class Inspection:
    file: str
    size_bytes: int
    architecture: str
    name: str | None
    file_type: str | None
    parameters: int
    bits_per_weight: float
    hidden: int
    head_dim: int
    vocab: int
    context_length: int
    rope: dict[str, Any]
    layers: list[LayerInfo]
    tensor_types: dict[str, int]
    groups: dict[str, dict[str, Any]]
    fallbacks: dict[str, Any]
    tokenizer: dict[str, Any]
    provenance: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return field.contents() if field is not None else default


def _per_layer(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value or 0)] * n


def _is_zero(t: gguf.ReaderTensor) -> bool:
    return not np.any(gguf.quants.dequantize(np.array(t.data), t.tensor_type))


def _layers(reader: gguf.GGUFReader, arch: str) -> list[LayerInfo]:
    n = int(_value(reader, f"{arch}.block_count", 0))
    heads = _per_layer(_value(reader, f"{arch}.attention.head_count"), n)
    kv = _per_layer(_value(reader, f"{arch}.attention.head_count_kv", heads), n)
    ffn = _per_layer(_value(reader, f"{arch}.feed_forward_length"), n)
    tensors = {t.name: t for t in reader.tensors}
    layers = []
    for i in range(n):
        down = tensors.get(f"blk.{i}.ffn_down.weight")
        # Our exporter writes a removed MLP under a kept attention as a tiny all-zero MLP.
        placeholder = down is not None and ffn[i] <= 32 and _is_zero(down)
        mlp = ffn[i] > 0 and not placeholder
        layers.append(LayerInfo(heads[i], kv[i], ffn[i] if mlp else 0, heads[i] > 0, mlp))
    return layers


def _groups(reader: gguf.GGUFReader) -> dict[str, dict[str, Any]]:
    by_group: dict[str, list[gguf.ReaderTensor]] = {}
    for t in reader.tensors:
        if is_weight(t):
            m = _GROUP.match(t.name)
            by_group.setdefault(m.group(1) if m else t.name.removesuffix(".weight"), []).append(t)
    return {
        g: {
            "types": dict(Counter(t.tensor_type.name for t in ts)),
            "bits_per_weight": 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts),
        }
        for g, ts in sorted(by_group.items())
    }


def _fallbacks(reader: gguf.GGUFReader, file_type: str | None) -> dict[str, Any]:
    """Weights a K-quant file could not store as K types because their width is not a multiple of 256."""
    weights = [t for t in reader.tensors if is_weight(t)]
    if not file_type or "_K" not in file_type:
        return {"count": 0, "of": len(weights), "by_type": {}, "widths": []}
    fell = [t for t in weights
            if int(t.shape[0]) % K_BLOCK and t.tensor_type.name not in K_TYPES and t.tensor_type.name != "F32"]
    return {
        "count": len(fell),
        "of": len(weights),
        "by_type": dict(Counter(t.tensor_type.name for t in fell)),
        "widths": sorted({int(t.shape[0]) for t in fell}),
    }


def _tokenizer(reader: gguf.GGUFReader) -> dict[str, Any]:
    k = gguf.Keys.Tokenizer
    tokens = reader.get_field(k.LIST)
    return {
        "model": _value(reader, k.MODEL),
        "pre": _value(reader, k.PRE),
        "vocab": len(tokens.data) if tokens is not None else 0,
        "bos": _value(reader, k.BOS_ID),
        "eos": _value(reader, k.EOS_ID),
        "add_bos": _value(reader, k.ADD_BOS),
        "chat_template": reader.get_field(k.CHAT_TEMPLATE) is not None,
    }


def _provenance(reader: gguf.GGUFReader) -> dict[str, Any] | None:
    if reader.get_field(ProvenanceKeys.VERSION) is None:
        return None
    plan = _value(reader, ProvenanceKeys.PLAN)
    return {
        "version": _value(reader, ProvenanceKeys.VERSION),
        "source": _value(reader, ProvenanceKeys.SOURCE),
        "source_sha256": _value(reader, ProvenanceKeys.SOURCE_SHA256),
        "plan": json.loads(plan) if plan else None,
    }


def inspect_gguf(path: Path) -> Inspection:
    reader = read_gguf(path)
    arch = _value(reader, gguf.Keys.General.ARCHITECTURE, "?")
    file_type = _value(reader, gguf.Keys.General.FILE_TYPE)
    type_name = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_") \
        if file_type is not None else None
    head_count = _per_layer(_value(reader, f"{arch}.attention.head_count"), 1)
    hidden = int(_value(reader, f"{arch}.embedding_length", 0))
    head_dim = int(_value(reader, f"{arch}.attention.key_length", 0) or (hidden // max(head_count[0], 1)))
    scaling = _value(reader, f"{arch}.rope.scaling.type")
    return Inspection(
        file=str(path),
        size_bytes=Path(path).stat().st_size,
        architecture=arch,
        name=_value(reader, gguf.Keys.General.NAME),
        file_type=type_name,
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        bits_per_weight=bits_per_weight(reader),
        hidden=hidden,
        head_dim=head_dim,
        vocab=int(_value(reader, f"{arch}.vocab_size", 0) or _tokenizer(reader)["vocab"]),
        context_length=int(_value(reader, f"{arch}.context_length", 0)),
        rope={"base": _value(reader, f"{arch}.rope.freq_base"), "scaling": scaling,
              "rope_freqs": any(t.name == "rope_freqs.weight" for t in reader.tensors)},
        layers=_layers(reader, arch),
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors)),
        groups=_groups(reader),
        fallbacks=_fallbacks(reader, type_name),
        tokenizer=_tokenizer(reader),
        provenance=_provenance(reader),
    )


def _layer_runs(layers: list[LayerInfo]) -> list[str]:
    """Consecutive identical layers on one line: 'blk 0–29: 9 heads / 3 KV / FFN 1536'."""
    lines, start = [], 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[start]:
            span = f"{start}" if i - 1 == start else f"{start}–{i - 1}"
            lines.append(f"blk {span}: {layers[start].describe()}")
            start = i
    return lines


def _plan_summary(plan: dict[str, Any] | None) -> str:
    if not plan or not (plan.get("drop_layers") or plan.get("heads") or plan.get("ffn")):
        return "unpruned"
    parts = [f"dropped layers {plan['drop_layers']}"] if plan.get("drop_layers") else []
    if plan.get("heads"):
        parts.append(f"heads pruned in {len(plan['heads'])} layers")
    if plan.get("ffn"):
        parts.append(f"FFN pruned in {len(plan['ffn'])} layers")
    return "; ".join(parts)


def render(info: Inspection) -> str:
    types = ", ".join(f"{t} ×{n}" for t, n in sorted(info.tensor_types.items(), key=lambda kv: -kv[1]))
    rope = f"base {info.rope['base']:g}" if info.rope["base"] else "default"
    rope += f", scaling {info.rope['scaling']}" if info.rope["scaling"] else ""
    rope += ", rope_freqs" if info.rope["rope_freqs"] else ""
    lines = [
        f"file       {info.file} ({info.size_bytes / MIB:.1f} MiB)",
        f"model      {info.name or '?'}: arch {info.architecture}, {len(info.layers)} layers, hidden {info.hidden}, "
        f"head_dim {info.head_dim}, vocab {info.vocab}, context {info.context_length}, RoPE {rope}",
        f"weights    {info.file_type or '?'}: {info.bits_per_weight:.2f} bits/weight, {info.parameters:,} parameters",
    ]
    lines += [("layers     " if i == 0 else "           ") + run for i, run in enumerate(_layer_runs(info.layers))]
    lines.append(f"tensors    {types}")
    for i, (group, g) in enumerate(info.groups.items()):
        kinds = ", ".join(f"{t} ×{n}" for t, n in g["types"].items())
        lines.append(f"{'groups' if i == 0 else '':<11}{group:<12} {g['bits_per_weight']:5.2f} bpw  {kinds}")
    fb = info.fallbacks
    if fb["count"]:
        by = ", ".join(f"{t} ×{n}" for t, n in fb["by_type"].items())
        lines.append(f"fallbacks  {fb['count']} of {fb['of']} weight tensors: input width {fb['widths']} not a "
                     f"multiple of {K_BLOCK}, so no K-quant → {by}")
    tok = info.tokenizer
    lines.append(f"tokenizer  {tok['model']} (pre {tok['pre']}), {tok['vocab']} tokens, bos {tok['bos']}, "
                 f"eos {tok['eos']}, chat template: {'yes' if tok['chat_template'] else 'no'}")
    p = info.provenance
    lines.append("edgeprune  not written by edgeprune" if p is None else
                 f"edgeprune  {p['version']} from {p['source']} (sha256 {str(p['source_sha256'])[:12]}…): "
                 f"{_plan_summary(p['plan'])}")
    return "\n".join(lines)

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
from edgeprune.gguf_file import (
    K_BLOCK,
    Hparams,
    bits_per_weight,
    hparams,
    int_value,
    is_weight,
    metadata,
    positive_float,
    read_gguf,
)

K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
K_MIX = re.compile(r"^Q[2-6]_K(_[SML])?$")  # file types whose weights llama.cpp wants in K-quants
# Our exporter writes an MLP removed under kept attention as a width-1 all-zero FFN; only FFNs this
# narrow are dequantized to check for it (a real MLP is never this narrow).
PLACEHOLDER_MAX_FFN = 32
_GROUP = re.compile(r"^blk\.\d+\.(\w+)\.weight$")
MIB = 1 << 20
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
K, ROPE = gguf.Keys.General, gguf.Keys.Rope


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


def _is_zero(t: gguf.ReaderTensor) -> bool:
    return not np.any(gguf.quants.dequantize(np.array(t.data), t.tensor_type))


def _layers(reader: gguf.GGUFReader, hp: Hparams) -> list[LayerInfo]:
    tensors = {t.name: t for t in reader.tensors}
    layers = []
    for i, (heads, kv, ffn) in enumerate(zip(hp.heads, hp.kv_heads, hp.ffn, strict=True)):
        down = tensors.get(f"blk.{i}.ffn_down.weight")
        placeholder = down is not None and 0 < ffn <= PLACEHOLDER_MAX_FFN and _is_zero(down)
        mlp = ffn > 0 and not placeholder
        layers.append(LayerInfo(heads, kv, ffn if mlp else 0, heads > 0, mlp))
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
    """Weights a K-quant file could not store as K types because their input width (ne0) is not a
    multiple of 256: llama.cpp falls back (Q4_K -> Q5_0, Q6_K -> Q8_0, F16 if not a multiple of 32)."""
    weights = [t for t in reader.tensors if is_weight(t)]
    k_mix = bool(file_type and K_MIX.match(file_type))
    fell = [t for t in weights if k_mix and int(t.shape[0]) % K_BLOCK
            and t.tensor_type.name not in K_TYPES and t.tensor_type.name != "F32"]
    widths = sorted({int(t.shape[0]) for t in fell})
    return {
        "count": len(fell),
        "of": len(weights),
        "by_type": dict(Counter(t.tensor_type.name for t in fell)),
        "widths": widths,
        "by_width": [{"width": w, "types": dict(Counter(t.tensor_type.name for t in fell if int(t.shape[0]) == w))}
                     for w in widths],
    }


def _tokenizer(reader: gguf.GGUFReader) -> dict[str, Any]:
    k = gguf.Keys.Tokenizer
    tokens = reader.get_field(k.LIST)
    return {
        "model": metadata(reader, k.MODEL),
        "pre": metadata(reader, k.PRE),
        "vocab": len(tokens.data) if tokens is not None else 0,
        "bos": metadata(reader, k.BOS_ID),
        "eos": metadata(reader, k.EOS_ID),
        "add_bos": metadata(reader, k.ADD_BOS),
        "chat_template": reader.get_field(k.CHAT_TEMPLATE) is not None,
    }


def _parse_plan(raw: Any) -> Any:
    """The plan as data; kept as the raw string if it is not JSON (inspect shows what is there)."""
    try:
        return json.loads(raw) if isinstance(raw, str) and raw else None
    except json.JSONDecodeError:
        return raw


def _provenance(reader: gguf.GGUFReader) -> dict[str, Any] | None:
    if reader.get_field(ProvenanceKeys.VERSION) is None:
        return None
    return {
        "version": metadata(reader, ProvenanceKeys.VERSION),
        "source": metadata(reader, ProvenanceKeys.SOURCE),
        "source_sha256": metadata(reader, ProvenanceKeys.SOURCE_SHA256),
        "plan": _parse_plan(metadata(reader, ProvenanceKeys.PLAN)),
        "sparsity": _parse_plan(metadata(reader, ProvenanceKeys.SPARSITY)),
        "recovery": _parse_plan(metadata(reader, ProvenanceKeys.RECOVERY)),
    }


def _file_type(reader: gguf.GGUFReader) -> str | None:
    value = int_value(reader, K.FILE_TYPE, -1)
    if value < 0:
        return None
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:  # a type newer than this gguf-py
        return f"unknown ({value})"


def inspect_gguf(path: Path) -> Inspection:
    """Everything `edgeprune inspect` shows; bad files raise EdgepruneError (see read_gguf)."""
    reader = read_gguf(path)
    hp = hparams(reader)
    arch = hp.arch
    tokenizer = _tokenizer(reader)
    file_type = _file_type(reader)
    return Inspection(
        file=str(path),
        size_bytes=Path(path).stat().st_size,
        architecture=arch,
        name=metadata(reader, K.NAME),
        file_type=file_type,
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        bits_per_weight=bits_per_weight(reader),
        hidden=hp.hidden,
        head_dim=hp.head_dim,
        vocab=hp.vocab,
        context_length=hp.context_length,
        rope={"base": positive_float(reader, ROPE.FREQ_BASE.format(arch=arch)),
              "scaling": metadata(reader, ROPE.SCALING_TYPE.format(arch=arch)),
              "rope_freqs": any(t.name == ROPE_FREQS for t in reader.tensors)},
        layers=_layers(reader, hp),
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors)),
        groups=_groups(reader),
        fallbacks=_fallbacks(reader, file_type),
        tokenizer=tokenizer,
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


def _count(n: int, what: str) -> str:
    return f"{what} in {n} layer{'s' * (n != 1)}"


def _plan_summary(plan: Any) -> str:
    """One line from the plan's JSON (Plan.to_dict: layers by original index; [] / "" removes a sublayer)."""
    if not isinstance(plan, dict):
        return "plan unreadable" if plan else "no plan recorded"
    drop, heads, ffn = plan.get("drop_layers") or [], plan.get("heads") or {}, plan.get("ffn") or {}
    parts = [f"dropped layers {drop}"] if drop else []
    for n, what in ((sum(bool(h) for h in heads.values()), "heads pruned"),
                    (sum(not h for h in heads.values()), "attention removed"),
                    (sum(bool(c) for c in ffn.values()), "FFN narrowed"),
                    (sum(not c for c in ffn.values()), "MLP removed")):
        parts += [_count(n, what)] if n else []
    return "; ".join(parts) or "unpruned"


def _yes(flag: Any) -> str:
    return "?" if flag is None else ("yes" if flag else "no")


def render(info: Inspection) -> str:
    """The screenful `edgeprune inspect` prints."""
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
        lines.append(f"fallbacks  {fb['count']} of {fb['of']} weight tensors got no K-quant:")
        for w in fb["by_width"]:
            by = ", ".join(f"{t} ×{n}" for t, n in w["types"].items())
            lines.append(f"           width {w['width']} not a multiple of {K_BLOCK} → {by}")
    tok = info.tokenizer
    lines.append(f"tokenizer  {tok['model']} (pre {tok['pre']}), {tok['vocab']} tokens, bos {tok['bos']}, "
                 f"eos {tok['eos']}, add_bos {_yes(tok['add_bos'])}, chat template {_yes(tok['chat_template'])}")
    p = info.provenance
    lines.append("edgeprune  not written by edgeprune" if p is None else
                 f"edgeprune  {p['version']} from {p['source']} (sha256 {str(p['source_sha256'])[:12]}…): "
                 f"{_plan_summary(p['plan'])}")
    if p is not None and isinstance(p.get("sparsity"), dict):
        sp = p["sparsity"]
        pattern = sp.get("nm") or f"{sp.get('sparsity', 0):.0%}"
        lines.append(f"sparsity   {sp.get('method')} {pattern} of each decoder weight row zero before quantization")
    if p is not None and isinstance(p.get("recovery"), dict):
        r = p["recovery"]
        lines.append(f"recovery   {r.get('description')}: {r.get('steps')} steps, {r.get('tokens')} tokens")
    return "\n".join(lines)

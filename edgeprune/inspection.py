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

from edgeprune.errors import EdgepruneError
from edgeprune.export.gguf_llama import ProvenanceKeys
from edgeprune.gguf_file import K_BLOCK, bits_per_weight, is_weight, read_gguf

K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
K_MIX = re.compile(r"^Q[2-6]_K(_[SML])?$")  # file types whose weights llama.cpp wants in K-quants
# Our exporter writes an MLP removed under kept attention as a width-1 all-zero FFN; only FFNs this
# narrow are dequantized to check for it (a real MLP is never this narrow).
PLACEHOLDER_MAX_FFN = 32
_GROUP = re.compile(r"^blk\.\d+\.(\w+)\.weight$")
MIB = 1 << 20
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
K, LLM, ATTN, ROPE = gguf.Keys.General, gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope


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


def _malformed(reader: gguf.GGUFReader, key: str, what: str) -> EdgepruneError:
    return EdgepruneError(f"{reader.data.filename} has malformed metadata: {key} {what}; re-export it.")


def _int(reader: gguf.GGUFReader, key: str, default: int = 0) -> int:
    value = _value(reader, key)
    if value is None:
        return default
    if isinstance(value, (int, float, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise _malformed(reader, key, f"is {value!r:.40}, not a number")


def _per_layer(reader: gguf.GGUFReader, key: str, n: int, default: int = 0) -> list[int]:
    """`llama` stores one value for all layers; `deci` one per layer."""
    value = _value(reader, key)
    if not isinstance(value, list):
        return [_int(reader, key, default)] * n
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise _malformed(reader, key, f"should hold {n} integers (one per layer) but holds {value!r:.60}")
    return value


def _is_zero(t: gguf.ReaderTensor) -> bool:
    return not np.any(gguf.quants.dequantize(np.array(t.data), t.tensor_type))


def _layers(reader: gguf.GGUFReader, arch: str) -> list[LayerInfo]:
    n = _int(reader, LLM.BLOCK_COUNT.format(arch=arch))
    heads = _per_layer(reader, ATTN.HEAD_COUNT.format(arch=arch), n)
    kv_key = ATTN.HEAD_COUNT_KV.format(arch=arch)
    kv = _per_layer(reader, kv_key, n) if reader.get_field(kv_key) else heads  # absent: one KV head per head
    ffn = _per_layer(reader, LLM.FEED_FORWARD_LENGTH.format(arch=arch), n)
    tensors = {t.name: t for t in reader.tensors}
    layers = []
    for i in range(n):
        down = tensors.get(f"blk.{i}.ffn_down.weight")
        placeholder = down is not None and 0 < ffn[i] <= PLACEHOLDER_MAX_FFN and _is_zero(down)
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
        "model": _value(reader, k.MODEL),
        "pre": _value(reader, k.PRE),
        "vocab": len(tokens.data) if tokens is not None else 0,
        "bos": _value(reader, k.BOS_ID),
        "eos": _value(reader, k.EOS_ID),
        "add_bos": _value(reader, k.ADD_BOS),
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
        "version": _value(reader, ProvenanceKeys.VERSION),
        "source": _value(reader, ProvenanceKeys.SOURCE),
        "source_sha256": _value(reader, ProvenanceKeys.SOURCE_SHA256),
        "plan": _parse_plan(_value(reader, ProvenanceKeys.PLAN)),
        "sparsity": _parse_plan(_value(reader, ProvenanceKeys.SPARSITY)),
    }


def _file_type(reader: gguf.GGUFReader) -> str | None:
    value = _int(reader, K.FILE_TYPE, -1)
    if value < 0:
        return None
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:  # a type newer than this gguf-py
        return f"unknown ({value})"


def inspect_gguf(path: Path) -> Inspection:
    """Everything `edgeprune inspect` shows; bad files raise EdgepruneError (see read_gguf)."""
    reader = read_gguf(path)
    arch = str(_value(reader, K.ARCHITECTURE, "?"))
    layers = _layers(reader, arch)
    hidden = _int(reader, LLM.EMBEDDING_LENGTH.format(arch=arch))
    first_heads = next((l.n_head for l in layers if l.attention), 0)
    head_dim = _int(reader, ATTN.KEY_LENGTH.format(arch=arch)) or hidden // max(first_heads, 1)
    tokenizer = _tokenizer(reader)
    file_type = _file_type(reader)
    return Inspection(
        file=str(path),
        size_bytes=Path(path).stat().st_size,
        architecture=arch,
        name=_value(reader, K.NAME),
        file_type=file_type,
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        bits_per_weight=bits_per_weight(reader),
        hidden=hidden,
        head_dim=head_dim,
        vocab=_int(reader, LLM.VOCAB_SIZE.format(arch=arch)) or tokenizer["vocab"],
        context_length=_int(reader, LLM.CONTEXT_LENGTH.format(arch=arch)),
        rope={"base": _value(reader, ROPE.FREQ_BASE.format(arch=arch)),
              "scaling": _value(reader, ROPE.SCALING_TYPE.format(arch=arch)),
              "rope_freqs": any(t.name == ROPE_FREQS for t in reader.tensors)},
        layers=layers,
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
    return "\n".join(lines)

"""What one token costs a model, from its GGUF alone: bytes read and floating-point operations.

Pure accounting, no timing. Decoding one token multiplies the hidden state through every weight
matrix once, so it reads every weight tensor once (a CPU decode is bound by that read); of the
token embeddings it reads one row, unless the model is tied (no `output.weight`), when llama.cpp
multiplies through `token_embd` as the output layer and so reads all of it. Attention also reads
the K and V cache of every earlier position (F16, as deployed). Prefill is bound by compute: two
FLOPs per weight element per token, except the output layer, which llama.cpp applies to the last
prompt token only.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeprune.errors import EdgepruneError
from edgeprune.families import gguf_archs
from edgeprune.gguf_file import hparams, is_weight, read_gguf

TOKEN_EMBD, OUTPUT = "token_embd.weight", "output.weight"
KV_BYTES = 2  # F16 K/V cache, llama.cpp's default (runtimes/llamacpp.load keeps it)
# By name, not by shape: llama.cpp's quantizer writes an N x 1 matrix (our placeholder MLP's gate
# and up) as a vector.
_MATMUL = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
_NOT_MATMUL = re.compile(r"norm|rope_freqs|token_embd")


@dataclass(frozen=True)
class ModelTraffic:
    """Per-token costs of one GGUF. `kv_bytes_per_position`: K+V bytes cached per context
    position over all layers; `attention_flops_per_position`: QK^T and AV FLOPs one query spends
    per cached position over all layers."""

    name: str
    weight_bytes_per_token: int
    flops_per_token: int  # matrix FLOPs of one token, output layer included
    output_flops: int  # the output layer's share of flops_per_token
    kv_bytes_per_position: int
    attention_flops_per_position: int
    parameters: int
    file_bytes: int
    tied: bool
    runtime: str = "llama.cpp"  # what runs the file: each runtime reaches its own share of the roofline

    @classmethod
    def from_gguf(cls, path: Path) -> ModelTraffic:
        path = Path(path)
        reader = read_gguf(path)
        hp = hparams(reader)  # counts checked against the tensors
        if hp.arch not in gguf_archs():
            raise EdgepruneError(f"{path.name} is a GGUF of architecture {hp.arch!r}; the latency model knows "
                                 f"{', '.join(gguf_archs())}.")
        tensors = [TensorCost.of(t) for t in reader.tensors]
        if TOKEN_EMBD not in {t.name for t in tensors}:
            raise EdgepruneError(f"{path.name} has no {TOKEN_EMBD}; it is not a complete model.")
        kv_bytes, attn_flops = attention_costs(hp.heads, hp.kv_heads, hp.head_dim, hp.value_dim)
        return cls.of_tensors(path.name, tensors, kv_bytes, attn_flops, path.stat().st_size)

    @classmethod
    def of_tensors(cls, name: str, tensors: list[TensorCost], kv_bytes_per_position: int,
                   attention_flops_per_position: int, file_bytes: int, runtime: str = "llama.cpp") -> ModelTraffic:
        """The per-token costs of a model made of `tensors` (see the module's docstring)."""
        by_name = {t.name: t for t in tensors}
        tied = OUTPUT not in by_name
        output = by_name[TOKEN_EMBD] if tied else by_name[OUTPUT]
        weight_bytes = flops = 0
        for t in tensors:
            if t.name == TOKEN_EMBD and not tied:
                weight_bytes += t.n_bytes // t.rows  # one embedding row per token
                continue
            weight_bytes += t.n_bytes  # norms and RoPE factors too: read every token, small
            if t is output or t.matmul:
                flops += 2 * t.elements
        return cls(
            name=name,
            weight_bytes_per_token=weight_bytes,
            flops_per_token=flops,
            output_flops=2 * output.elements,
            kv_bytes_per_position=kv_bytes_per_position,
            attention_flops_per_position=attention_flops_per_position,
            parameters=sum(t.elements for t in tensors),
            file_bytes=file_bytes,
            tied=tied,
            runtime=runtime,
        )

    def kv_bytes_per_token(self, position: int) -> int:
        """K+V cache bytes read to decode the token at `position` (0-based): positions 0..position."""
        return self.kv_bytes_per_position * (position + 1)

    def decode_bytes(self, position: int) -> int:
        """Bytes read to decode the token at `position`: every weight once, plus the cache so far."""
        return self.weight_bytes_per_token + self.kv_bytes_per_token(position)

    def prefill_flops(self, prompt_tokens: int) -> int:
        """FLOPs of one prefill: every token through every matrix, the output layer only for the last
        token (llama.cpp computes logits of the last prompt token only), and causal attention."""
        per_token = self.flops_per_token - self.output_flops
        attention = self.attention_flops_per_position * prompt_tokens * (prompt_tokens + 1) // 2
        return prompt_tokens * per_token + self.output_flops + attention

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TensorCost:
    """What one stored tensor weighs: its elements, its bytes as stored, its rows (the last ggml
    dimension: an embedding's vocabulary) and whether decoding multiplies through it."""

    name: str
    elements: int
    n_bytes: int
    rows: int
    matmul: bool

    @classmethod
    def of(cls, t: Any) -> TensorCost:
        """A GGUF reader's tensor."""
        matmul = bool(_MATMUL.match(t.name) or (is_weight(t) and not _NOT_MATMUL.search(t.name)))
        return cls(t.name, int(t.n_elements), int(t.n_bytes), int(t.shape[-1]), matmul)


def attention_costs(heads: list[int], kv_heads: list[int], k_dim: int, v_dim: int) -> tuple[int, int]:
    """(K+V cache bytes, attention FLOPs) per context position, summed over the layers that attend.
    A `deci` layer with head count 0 has no attention, so it neither caches nor reads K/V."""
    kv_bytes = sum(kv * (k_dim + v_dim) * KV_BYTES for h, kv in zip(heads, kv_heads, strict=True) if h > 0)
    flops = sum(2 * h * (k_dim + v_dim) for h in heads)  # q.k over k_dim, then p.v over v_dim, per head
    return kv_bytes, flops

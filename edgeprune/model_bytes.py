"""The byte sizes a memory estimate (`footprint.py`) needs from a model: its shapes as a weight
store holds them, its file size in a llama.cpp type, one batch through a layer in torch, and
llama.cpp's KV cache and compute buffers. Pure arithmetic over shapes: no weight is read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

from edgeprune.gguf_file import K_BLOCK

if TYPE_CHECKING:
    from edgeprune.models.weights import WeightStore

# Stored bits per weight of llama.cpp's types: (the mixture's nominal figure, a 2-D tensor whose input
# width is not a multiple of 256, which K-quants cannot pack and llama.cpp gives a 32-block type:
# Q4_K -> Q5_0, Q6_K -> Q8_0, ...). Measured SmolLM2-135M Q4_K_M: ~6 bits (README).
QUANT_BITS: dict[str, tuple[float, float]] = {
    "F32": (32, 32), "F16": (16, 16), "BF16": (16, 16), "Q8_0": (8.5, 8.5), "Q4_0": (4.5, 4.5), "Q6_K": (6.5625, 8.5),
    "Q5_K_M": (5.69, 6.5), "Q4_K_M": (4.89, 6.0), "Q4_K_S": (4.58, 5.5), "Q3_K_M": (3.91, 4.5),
}

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class StoreShapes:
    """A model's sizes as a weight store holds them (the largest layer where layers differ)."""

    n_layers: int
    hidden: int
    ffn: int
    vocab: int
    n_head: int
    n_kv: int
    head_dim: int
    parameters: int
    layer_stored: int  # bytes of the largest decoder layer, stored dtype
    layer_fp32: int
    layer_all_fp32: bool  # stored in fp32 already: no fp32 copy is made
    linear_inputs: tuple[int, ...]  # input widths of the largest layer's linears
    linear_out_in: tuple[tuple[int, int], ...]
    decoder_linear_params: int
    largest_tensor: int  # elements
    largest_itemsize: int
    embedding: tuple[int, int]  # elements, stored itemsize
    head: tuple[int, int]
    reads_rows: bool  # the store reads embedding rows without reading the whole table
    embedding_packs: bool  # its width fills K blocks
    tensors: tuple[tuple[tuple[int, ...], int], ...]  # (shape, itemsize) of every tensor


def store_shapes(store: WeightStore) -> StoreShapes:
    from edgeprune.models.weights import EMBEDDING, WeightStore

    cfg = store.config
    names = store.names()
    layer_stored: dict[int, int] = {}
    layer_fp32: dict[int, int] = {}
    linears: dict[int, list[tuple[int, int]]] = {}
    tensors = []
    all_fp32 = True
    decoder_linear = 0
    for name in names:
        shape = tuple(int(d) for d in store.shape(name))
        itemsize = store.stored_dtype(name).itemsize
        n = prod(shape)
        tensors.append((shape, itemsize))
        m = _LAYER_KEY.match(name)
        if m is None:
            continue
        i = int(m.group(1))
        layer_stored[i] = layer_stored.get(i, 0) + n * itemsize
        layer_fp32[i] = layer_fp32.get(i, 0) + n * 4
        all_fp32 &= itemsize == 4
        if len(shape) == 2 and m.group(2).endswith("proj.weight"):
            linears.setdefault(i, []).append(shape)
            decoder_linear += n
    biggest = max(layer_stored, key=layer_stored.get) if layer_stored else 0
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    widest = max(tensors, key=lambda t: prod(t[0]))
    emb_shape = store.shape(EMBEDDING)
    head_name = store.head_name()
    ffn = max((s[1] for ls in linears.values() for s in ls), default=cfg.intermediate_size)
    return StoreShapes(
        n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, ffn=max(ffn, cfg.intermediate_size),
        vocab=emb_shape[0], n_head=n_head, n_kv=getattr(cfg, "num_key_value_heads", None) or n_head,
        head_dim=head_dim, parameters=store.parameters,
        layer_stored=layer_stored.get(biggest, 0), layer_fp32=layer_fp32.get(biggest, 0), layer_all_fp32=all_fp32,
        linear_inputs=tuple(s[1] for s in linears.get(biggest, [])),
        linear_out_in=tuple(linears.get(biggest, [])),
        decoder_linear_params=decoder_linear,
        largest_tensor=prod(widest[0]), largest_itemsize=widest[1],
        embedding=(prod(emb_shape), store.stored_dtype(EMBEDDING).itemsize),
        head=(prod(store.shape(head_name)), store.stored_dtype(head_name).itemsize),
        reads_rows=type(store).rows is not WeightStore.rows,
        embedding_packs=emb_shape[-1] % K_BLOCK == 0,
        tensors=tuple(tensors),
    )


def quantized_bytes(tensors: tuple[tuple[tuple[int, ...], int], ...], quant: str) -> int:
    """A GGUF's size in `quant`: 2-D tensors at the type's bits (its 32-block fallback where the input
    width does not pack into 256-wide K blocks), the rest (norms) in F32."""
    nominal, narrow = QUANT_BITS[quant]
    bits = 0.0
    for shape, _ in tensors:
        n = prod(shape)
        if len(shape) >= 2:
            bits += n * (narrow if shape[-1] % K_BLOCK else nominal)
        else:
            bits += n * 32
    return int(bits / 8)


def forward_bytes(s: StoreShapes, tokens: int, windows: int, seq: int) -> int:
    """One batch through one decoder layer: projections, the MLP's three ffn-wide tensors, norms and
    residuals, and the attention scores (materialized by torch's math path)."""
    qkv = (s.n_head + 2 * s.n_kv) * s.head_dim
    return tokens * (3 * s.ffn + 2 * qkv + 4 * s.hidden) * 4 + windows * s.n_head * seq * seq * 4


def kv_bytes(s: StoreShapes, n_ctx: int) -> int:
    """llama.cpp's F16 KV cache for n_ctx tokens."""
    return n_ctx * s.n_layers * 2 * s.n_kv * s.head_dim * 2


def runtime_bytes(s: StoreShapes, n_tokens: int, n_ctx: int, outputs: int) -> int:
    """llama.cpp's compute buffer for a batch of n_tokens (MLP, attention scores over n_ctx, the
    logits computed) and its output buffer for the logits of `outputs` tokens."""
    graph = n_tokens * (3 * s.ffn + 4 * s.hidden) * 4 + s.n_head * n_tokens * n_ctx * 4 + outputs * s.vocab * 4
    return graph + outputs * s.vocab * 4

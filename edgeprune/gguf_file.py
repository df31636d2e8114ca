"""Reading GGUF files safely: every way a file can be bad becomes one sentence, not a traceback."""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.families import gguf_archs

MAGIC = b"GGUF"
# K-quants pack 256 input columns per block; other widths fall back to larger 32-block types.
K_BLOCK = 256
SUPPORTED_VERSIONS = (2, 3)  # what gguf-py's reader handles (gguf.gguf_reader.READER_SUPPORTED_VERSIONS)
MAX_PLAUSIBLE_VERSION = 255  # larger numbers are garbage, not a future format
GGML_MAX_DIMS = 4
LLAMA_MAX_LAYERS = 512  # llama.cpp refuses more (src/llama-hparams.h)
U32_MAX = (1 << 32) - 1  # llama.cpp reads counts and sizes as uint32
_LLM, _ATTN, _TOK = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Tokenizer
_BLK = re.compile(r"^blk\.(\d+)\.")
_REDO = "re-export or re-download it"


class _PastEnd(Exception):
    """A read that needs bytes beyond the end of the file."""

    def __init__(self, end: int, tensor: str | None, key: str | None = None) -> None:
        super().__init__(end, tensor, key)
        self.end, self.tensor, self.key = end, tensor, key


class _Hostile(Exception):
    """A header whose counts or shapes the file cannot hold (the message says which). A count larger
    than the bytes left may also be a truncated file."""

    def __init__(self, message: str, maybe_truncated: bool = False) -> None:
        super().__init__(message)
        self.what = "truncated or corrupt" if maybe_truncated else "corrupt"


# Fewest bytes one entry can take: a key/value pair (key length, value type, one-byte value), a
# tensor info (name length, dimension count, type, offset), an array element of each value type.
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8
_ITEM_BYTES = {int(t): np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()} | {
    int(gguf.GGUFValueType.STRING): 8, int(gguf.GGUFValueType.ARRAY): 4 + 8}


class _BoundedReader(gguf.GGUFReader):
    """GGUFReader slices its memmap without checking the end and trusts every count and shape, so a
    short or hostile file surfaces as a numpy error or a loop over a count the header made up;
    checking each count against the bytes left tells truncation and corruption apart, up front.
    (Hooks private methods: if gguf-py renames them, read_gguf's generic checks still apply.)"""

    _tensor: str | None = None
    _key: str | None = None  # the metadata key being read (a string read at depth 0 is a key or a tensor name)
    _depth = 0

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise _PastEnd(end, self._tensor, self._key)
        return super()._get(offset, dtype, count, override_order)

    def _check_count(self, offs: int, count: int, least: int, what: str) -> None:
        if int(offs) + int(count) * least > len(self.data):
            raise _Hostile(f"its header claims {int(count)} {what}, more than its {len(self.data)} bytes can hold",
                           maybe_truncated=True)

    def _build_fields(self, offs: int, count: int) -> int:
        self._check_count(offs, count, _MIN_KV_BYTES, "metadata keys")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[gguf.ReaderField]]:
        self._check_count(offs, count, _MIN_TENSOR_INFO_BYTES, "tensors")
        self._key = None
        return super()._build_tensor_info(offs, count)

    def _get_str(self, offset: int) -> Any:
        length, data = super()._get_str(offset)
        if self._depth == 0:
            self._key = bytes(data).decode("utf-8", "replace")
        return length, data

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
        if int(raw_type) == gguf.GGUFValueType.ARRAY:  # gguf-py loops over the claimed length
            item_type, n = int(self._get(orig_offs, np.uint32)[0]), int(self._get(orig_offs + 4, np.uint64)[0])
            if orig_offs + 12 + n * _ITEM_BYTES.get(item_type, 1) > len(self.data):
                raise _Hostile(f"{self._key} claims {n} array elements, more than its {len(self.data)} bytes can "
                               "hold", maybe_truncated=True)
            if self.byte_order == "I" and n:
                if item_type == gguf.GGUFValueType.STRING:
                    return self._string_array(orig_offs, n)
                if (nptype := self.gguf_scalar_to_np.get(gguf.GGUFValueType(item_type))) is not None:
                    return self._scalar_array(orig_offs, item_type, n, nptype)
        self._depth += 1
        try:
            return super()._get_field_parts(orig_offs, raw_type)
        finally:
            self._depth -= 1

    # gguf-py reads an array element by element, each a slice of its memmap: 1.4-1.6 s per open of a
    # 49k-token GGUF (its strings, scores and types). The same parts, each element a slice of one
    # plain ndarray over the mapping: 0.1 s.
    def _head(self, offs: int) -> list[Any]:
        return [self._get(offs, np.uint32), self._get(offs + 4, np.uint64)]

    def _plain(self) -> np.ndarray:
        if not hasattr(self, "_bytes"):
            self._bytes = self.data.view(np.ndarray)
        return self._bytes

    def _scalar_array(self, offs: int, item_type: int, n: int, nptype: Any) -> Any:
        self._get(offs + 12, nptype, n)  # the bounds check
        values = self._plain()[offs + 12:].view(np.uint8)[:n * np.dtype(nptype).itemsize].view(nptype)
        parts = self._head(offs) + [values[i:i + 1] for i in range(n)]
        types = [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(item_type)]
        return 12 + values.nbytes, parts, list(range(2, 2 + n)), types

    def _string_array(self, orig_offs: int, n: int) -> Any:
        data, size = self._plain(), len(self.data)
        parts, idxs, offs = self._head(orig_offs), [], orig_offs + 12
        for _ in range(n):
            if offs + 8 > size:
                raise _PastEnd(offs + 8, None, self._key)
            end = offs + 8 + struct.unpack_from("=Q", data, offs)[0]
            if end > size:
                raise _PastEnd(end, None, self._key)
            parts += (data[offs:offs + 8].view(np.uint64), data[offs + 8:end])
            idxs.append(len(parts) - 1)
            offs = end
        return offs - orig_offs, parts, idxs, [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        for field in fields:  # tensor data is read lazily: check each extent up front
            name, dims, raw_type, offset = (field.parts[i] for i in (1, 3, 4, 5))
            self._tensor = bytes(name).decode("utf-8", "replace")
            shape = [int(d) for d in dims]
            if len(shape) > GGML_MAX_DIMS:
                raise _Hostile(f"tensor {self._tensor} has {len(shape)} dimensions (GGUF allows {GGML_MAX_DIMS})")
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
            except (ValueError, KeyError):
                raise _Hostile(f"tensor {self._tensor} has unknown type {int(raw_type[0])}") from None
            if shape and shape[0] % block:
                raise _Hostile(f"tensor {self._tensor}'s first dimension {shape[0]} is not a multiple of its "
                               f"type's block size {block}")
            n = 1
            for d in shape:  # Python ints: the shape of a hostile header overflows numpy's
                n *= d
            end = int(start_offs) + int(offset[0]) + n * type_size // block
            if end > len(self.data):
                raise _PastEnd(end, self._tensor)
        self._tensor = None
        super()._build_tensors(start_offs, fields)


def _version(head: bytes) -> int:
    v = int.from_bytes(head[4:8], "little")
    return v if v & 0xFFFF else int.from_bytes(head[4:8], "big")  # a big-endian GGUF


def _check_start(path: Path) -> None:
    if not path.exists():
        raise EdgepruneError(f"{path} does not exist; check the path of the .gguf file.")
    if not path.is_file():
        raise EdgepruneError(f"{path} is not a file; give the path of a .gguf file.")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise EdgepruneError(f"{path} cannot be read ({e.strerror}); check its permissions.") from None
    if head[:4] != MAGIC:
        raise EdgepruneError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model file.")
    if len(head) < 8:
        raise EdgepruneError(f"{path} is truncated: it ends inside the GGUF header; {_REDO}.")
    version = _version(head)
    if version > MAX_PLAUSIBLE_VERSION:
        raise EdgepruneError(f"{path} is corrupt (its GGUF version field reads {version}); {_REDO}.")
    if version not in SUPPORTED_VERSIONS:
        raise EdgepruneError(
            f"{path} is GGUF version {version}, which edgeprune cannot read (versions 2 and 3); "
            "re-convert it with a current llama.cpp."
        )


def read_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF, checking that it is one and that every tensor's data lies inside the file."""
    path = Path(path)
    _check_start(path)
    size = path.stat().st_size
    try:
        reader = _BoundedReader(str(path))
    except _PastEnd as e:
        at = f" (at {e.key})" if e.key else ""
        where = f"tensor {e.tensor}'s data ends at byte {e.end}" if e.tensor else \
            f"its metadata{at} needs byte {e.end}"
        what = "truncated" if e.tensor else "truncated or corrupt"
        raise EdgepruneError(f"{path} is {what}: {where} but the file has {size} bytes; {_REDO}.") from None
    except _Hostile as e:
        raise EdgepruneError(f"{path} is {e.what}: {e}; {_REDO}.") from None
    except Exception as e:  # gguf-py raises ValueError, KeyError, UnicodeError, numpy errors alike
        detail = (str(e).splitlines() or [""])[0][:80]
        raise EdgepruneError(f"{path} is corrupt ({type(e).__name__}: {detail}); {_REDO}.") from None
    for t in reader.tensors:  # in case the reader's layout ever escapes the hooks above
        if t.data_offset + int(t.n_bytes) > size:
            raise EdgepruneError(
                f"{path} is truncated: tensor {t.name}'s data ends at byte {t.data_offset + int(t.n_bytes)} "
                f"but the file has {size} bytes; {_REDO}."
            )
    return reader


def metadata(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return field.contents() if field is not None else default


def malformed(reader: gguf.GGUFReader, key: str, what: str) -> EdgepruneError:
    return EdgepruneError(f"{reader.data.filename} has malformed metadata: {key} {what}; re-export it.")


def _count(reader: gguf.GGUFReader, key: str, value: Any, high: int) -> int:
    # bool is an int to Python; float (inf, nan, 4.0) and str are never a count to llama.cpp
    if isinstance(value, bool) or not isinstance(value, int):
        raise malformed(reader, key, f"is {value!r:.40}, not an integer")
    if not 0 <= value <= high:
        raise malformed(reader, key, f"is {value}, outside 0..{high}")
    return value


def int_value(reader: gguf.GGUFReader, key: str, default: int = 0, high: int = U32_MAX) -> int:
    """A count or size from the metadata: a non-negative integer no larger than `high`."""
    value = metadata(reader, key)
    return default if value is None else _count(reader, key, value, high)


def positive_float(reader: gguf.GGUFReader, key: str) -> float | None:
    value = metadata(reader, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise malformed(reader, key, f"is {value!r:.40}, not a finite positive number")
    return float(value)


def per_layer(reader: gguf.GGUFReader, key: str, n: int, default: int = 0) -> list[int]:
    """`llama` stores one value for all layers; `deci` one per layer."""
    value = metadata(reader, key)
    if not isinstance(value, list):
        return [int_value(reader, key, default)] * n
    if len(value) != n:
        raise malformed(reader, key, f"should hold {n} integers (one per layer) but holds {value!r:.60}")
    return [_count(reader, key, v, U32_MAX) for v in value]


@dataclass(frozen=True)
class Hparams:
    """The shape a llama-family GGUF's metadata declares, checked: counts are integers in range, and
    for `llama`/`deci` files they agree with the tensors (so nothing sized from them can be larger
    than the file implies)."""

    arch: str
    hidden: int
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    head_dim: int  # key length: explicit, else hidden / the first attending layer's heads
    value_dim: int
    context_length: int
    vocab: int  # vocab_size, else the token list's length

    @property
    def n_layers(self) -> int:
        return len(self.heads)


def hparams(reader: gguf.GGUFReader) -> Hparams:
    arch = metadata(reader, gguf.Keys.General.ARCHITECTURE, "?")
    if not isinstance(arch, str):
        raise malformed(reader, gguf.Keys.General.ARCHITECTURE, f"is {arch!r:.40}, not a name")
    n = int_value(reader, _LLM.BLOCK_COUNT.format(arch=arch), high=LLAMA_MAX_LAYERS)
    heads = per_layer(reader, _ATTN.HEAD_COUNT.format(arch=arch), n)
    kv_key = _ATTN.HEAD_COUNT_KV.format(arch=arch)
    kv = per_layer(reader, kv_key, n) if reader.get_field(kv_key) else heads  # absent: one KV head per head
    ffn = per_layer(reader, _LLM.FEED_FORWARD_LENGTH.format(arch=arch), n)
    hidden = int_value(reader, _LLM.EMBEDDING_LENGTH.format(arch=arch))
    first_heads = next((h for h in heads if h), 0)
    head_dim = int_value(reader, _ATTN.KEY_LENGTH.format(arch=arch)) or hidden // max(first_heads, 1)
    tokens = reader.get_field(_TOK.LIST)
    vocab = int_value(reader, _LLM.VOCAB_SIZE.format(arch=arch)) or (len(tokens.data) if tokens else 0)
    for key in (gguf.Keys.Rope.FREQ_BASE.format(arch=arch), _ATTN.LAYERNORM_RMS_EPS.format(arch=arch)):
        positive_float(reader, key)
    hp = Hparams(arch, hidden, heads, kv, ffn, head_dim,
                 int_value(reader, _ATTN.VALUE_LENGTH.format(arch=arch)) or head_dim,
                 int_value(reader, _LLM.CONTEXT_LENGTH.format(arch=arch)), vocab)
    if arch in gguf_archs():
        _check_against_tensors(reader, hp)
    return hp


def _check_against_tensors(reader: gguf.GGUFReader, hp: Hparams) -> None:
    """What each tensor's size must be, given the metadata; a disagreement names the keys at fault."""
    a = hp.arch
    heads_key, kv_key = _ATTN.HEAD_COUNT.format(arch=a), _ATTN.HEAD_COUNT_KV.format(arch=a)
    width = f"{_LLM.EMBEDDING_LENGTH.format(arch=a)} {hp.hidden}"
    dim = f"{width}, head dim {hp.head_dim}"
    ffn_key, blocks_key = _LLM.FEED_FORWARD_LENGTH.format(arch=a), _LLM.BLOCK_COUNT.format(arch=a)
    for i, (h, kv) in enumerate(zip(hp.heads, hp.kv_heads, strict=True)):
        if h and (kv > h or (kv and h % kv)):
            raise malformed(reader, kv_key, f"gives layer {i} {kv} KV heads for {h} query heads (it must divide them)")
    expected: dict[str, tuple[int, str]] = {}
    if hp.vocab:  # a file without a tokenizer says nothing about its vocabulary
        expected["token_embd.weight"] = (hp.hidden * hp.vocab, f"{width} and a vocabulary of {hp.vocab}")
    names = {t.name for t in reader.tensors}
    for i, (h, kv, ffn) in enumerate(zip(hp.heads, hp.kv_heads, hp.ffn, strict=True)):
        # Without ffn_gate, ffn_up holds gate and up rows (Phi-3's fused gate_up).
        up = 1 if f"blk.{i}.ffn_gate.weight" in names or f"blk.{i}.ffn_up.weight" not in names else 2
        expected |= {
            f"blk.{i}.attn_q.weight": (hp.hidden * h * hp.head_dim, f"{heads_key} {h}, {dim}"),
            f"blk.{i}.attn_k.weight": (hp.hidden * kv * hp.head_dim, f"{kv_key} {kv}, {dim}"),
            f"blk.{i}.attn_qkv.weight": (hp.hidden * (h + 2 * kv) * hp.head_dim,
                                         f"{heads_key} {h}, {kv_key} {kv}, {dim}"),
            f"blk.{i}.ffn_up.weight": (up * hp.hidden * ffn, f"{ffn_key} {ffn} and {width}"),
        }
    for t in reader.tensors:
        m = _BLK.match(t.name)
        if m and int(m.group(1)) >= hp.n_layers:
            raise malformed(reader, blocks_key, f"is {hp.n_layers}, but the file holds tensor {t.name}")
        if t.name in expected and int(t.n_elements) != expected[t.name][0]:
            raise EdgepruneError(
                f"{reader.data.filename} has malformed metadata: {t.name} has shape {[int(d) for d in t.shape]}, "
                f"which does not fit {expected[t.name][1]}; re-export it.")


def is_weight(t: gguf.ReaderTensor) -> bool:
    """Matrices, as opposed to norms and RoPE factors (which stay F32 in every file)."""
    return len(t.shape) >= 2 and int(np.prod(t.shape)) > 0


def bits_per_weight(reader: gguf.GGUFReader) -> float:
    """Stored bits per weight over all weight matrices (what the quantization type really gave)."""
    weights = [t for t in reader.tensors if is_weight(t)]
    return 8 * sum(int(t.n_bytes) for t in weights) / max(1, sum(int(t.n_elements) for t in weights))


def decoder_zero_share(reader: gguf.GGUFReader) -> float:
    """Share of the decoder layers' matrix weights that are exactly zero once dequantized: what a
    sparse model keeps of its zeros through quantization (formats with a per-block minimum, such
    as Q4_K, generally do not reproduce an exact zero)."""
    zeros = total = 0
    for t in reader.tensors:
        if not (t.name.startswith("blk.") and is_weight(t)):
            continue
        data = t.data
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        zeros += int(np.count_nonzero(data == 0))
        total += int(data.size)
    return zeros / total if total else 0.0

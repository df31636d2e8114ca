"""Reading GGUF files safely: every way a file can be bad becomes one sentence, not a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgeprune.errors import EdgepruneError

MAGIC = b"GGUF"
# K-quants pack 256 input columns per block; other widths fall back to larger 32-block types.
K_BLOCK = 256
SUPPORTED_VERSIONS = (2, 3)  # what gguf-py's reader handles (gguf.gguf_reader.READER_SUPPORTED_VERSIONS)
MAX_PLAUSIBLE_VERSION = 255  # larger numbers are garbage, not a future format
_REDO = "re-export or re-download it"


class _PastEnd(Exception):
    """A read that needs bytes beyond the end of the file."""

    def __init__(self, end: int, tensor: str | None) -> None:
        super().__init__(end, tensor)
        self.end, self.tensor = end, tensor


class _BoundedReader(gguf.GGUFReader):
    """GGUFReader slices its memmap without checking the end, so a short file surfaces as a numpy
    reshape/view error; checking every read tells truncation apart from corruption.
    (Hooks private methods: if gguf-py renames them, read_gguf's generic checks still apply.)"""

    _tensor: str | None = None

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise _PastEnd(end, self._tensor)
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        for field in fields:  # tensor data is read lazily: check each extent up front
            name, dims, raw_type, offset = (field.parts[i] for i in (1, 3, 4, 5))
            self._tensor = bytes(name).decode("utf-8", "replace")
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
            end = int(start_offs) + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) * type_size // block
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
        where = f"tensor {e.tensor}'s data ends at byte {e.end}" if e.tensor else \
            f"its metadata needs byte {e.end}"
        what = "truncated" if e.tensor else "truncated or corrupt"
        raise EdgepruneError(f"{path} is {what}: {where} but the file has {size} bytes; {_REDO}.") from None
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

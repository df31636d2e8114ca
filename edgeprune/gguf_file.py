"""Reading GGUF files safely: every way a file can be bad becomes one sentence, not a traceback."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from edgeprune.errors import EdgepruneError

MAGIC = b"GGUF"


def read_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF, checking that it is one and that every tensor's data lies inside the file."""
    path = Path(path)
    if not path.exists():
        raise EdgepruneError(f"{path} does not exist.")
    if not path.is_file():
        raise EdgepruneError(f"{path} is not a file; give the path of a .gguf file.")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise EdgepruneError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model file.")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError, IndexError, struct and numpy errors alike
        raise EdgepruneError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {str(e)[:80]}); re-export or re-download it."
        ) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size:
            raise EdgepruneError(
                f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + int(t.n_bytes)} "
                f"but the file has {size}; re-export or re-download it."
            )
    return reader


def is_weight(t: gguf.ReaderTensor) -> bool:
    """Matrices, as opposed to norms and RoPE factors (which stay F32 in every file)."""
    return len(t.shape) >= 2 and int(np.prod(t.shape)) > 0


def bits_per_weight(reader: gguf.GGUFReader) -> float:
    """Stored bits per weight over all weight matrices (what the quantization type really gave)."""
    weights = [t for t in reader.tensors if is_weight(t)]
    return 8 * sum(int(t.n_bytes) for t in weights) / max(1, sum(int(t.n_elements) for t in weights))

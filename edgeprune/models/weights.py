"""A checkpoint's tensors, read one at a time from where they are stored.

Every pass over a model reads its weights through a `WeightStore`: HF tensor names and HF layout
(rotate-half Q/K rows), each tensor read on demand in its stored dtype (a quantized GGUF tensor is
dequantized to fp32 on read, one tensor at a time). Nothing here holds the model: a store is a
table of contents plus open, memory-mapped files.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprune.errors import EdgepruneError

log = logging.getLogger(__name__)

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
# Q and K rows (and biases), which llama.cpp's "norm" RoPE wants in another order (`interleaves_qk`).
QK_ROWS = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")
# GGUF tensors that are RoPE settings, not weights.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# Buffers some older checkpoints carry; transformers recomputes them.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class WeightStore(ABC):
    """Tensors by HF name, read on demand. `config` is the model's transformers config."""

    config: Any

    @abstractmethod
    def names(self) -> list[str]:
        """Every tensor's HF name, in checkpoint order (a tied lm_head is absent)."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in HF layout, without reading it."""

    @abstractmethod
    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype `read` returns: the stored one (fp32 for a quantized GGUF tensor)."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, owned by the caller (no mapping outlives the call)."""

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """Decoder layer `index`'s tensors, names relative to the layer (`self_attn.q_proj.weight`)."""
        prefix = f"model.layers.{index}."
        return {n[len(prefix):]: self.read(n) for n in self.names() if n.startswith(prefix)}

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of a 2-D tensor (the embedding lookup); stores that can read rows override it."""
        return self.read(name).index_select(0, index)

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of a 2-D tensor in the stored dtype (the output head, a block at a time);
        stores that can read part of a tensor override it."""
        return self.read(name)[start:stop].clone()

    def head_name(self) -> str:
        """The output projection's tensor: the embedding when tied."""
        return EMBEDDING if self.tied else LM_HEAD

    @property
    def tied(self) -> bool:
        return LM_HEAD not in self.names()

    @cached_property
    def parameters(self) -> int:
        """Parameter count, a tied embedding counted once (as transformers' num_parameters does)."""
        return sum(int(np.prod(self.shape(n))) for n in self.names())


class SafetensorsStore(WeightStore):
    """An HF checkpoint directory (sharded or not): each read opens the shard, maps it, copies one tensor out."""

    def __init__(self, files: list[Path], config: Any) -> None:
        from safetensors import SafetensorError, safe_open

        from edgeprune.families import family_of

        self.config = config
        family = family_of(config)
        self._file_of: dict[str, Path] = {}
        self._stored: dict[str, str] = {}  # our name -> the checkpoint's (see Family.checkpoint_name)
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for stored in f.keys():
                        name = family.checkpoint_name(stored)
                        if name is None or IGNORED.search(name):
                            continue
                        piece = f.get_slice(stored)
                        dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                        if dtype is None:
                            raise EdgepruneError(f"{path}: tensor {name} is stored as {piece.get_dtype()}, which "
                                                 "edgeprune cannot read; convert the checkpoint to bf16, fp16 or fp32.")
                        self._file_of[name], self._shape[name] = path, tuple(piece.get_shape())
                        self._stored[name] = stored
                        self._dtype[name] = dtype
            except (SafetensorError, OSError) as e:
                raise EdgepruneError(f"Cannot read the weights file {path}: {e}".rstrip(".") + ".") from None
        if getattr(config, "tie_word_embeddings", False):
            for table in (self._file_of, self._stored, self._shape, self._dtype):
                table.pop(LM_HEAD, None)  # tied: transformers ignores a stored copy, and so do we

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._dtype[name]

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as f:
            return f.get_tensor(self._stored[name])

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        # Read only the rows asked for: an 8B model's embedding is 1 GiB, a batch needs a few thousand rows.
        unique, inverse = torch.unique(index, return_inverse=True)
        with safe_open(str(self._file_of[name]), framework="pt") as f:
            piece = f.get_slice(self._stored[name])
            rows = torch.stack([piece[int(r) : int(r) + 1][0] for r in unique])
        return rows[inverse]

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as f:
            return f.get_slice(self._stored[name])[start:stop]


def reverse_rope_interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (adjacent RoPE pairs) back to HF's rotate-half order, per head."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFStore(WeightStore):
    """A GGUF of a family edgeprune reads, memory-mapped by gguf-py; each read dequantizes one tensor
    to fp32, puts Q/K rows back in HF order and undoes the converter's norm shift (what transformers'
    GGUF loader does, tensor by tensor)."""

    def __init__(self, path: Path, config: Any, reader: Any = None) -> None:
        import gguf

        from edgeprune.families import family_of, interleaves_qk
        from edgeprune.gguf_file import metadata, read_gguf

        self.config, self.path = config, path
        self.family = family_of(config)
        self.reader = reader if reader is not None else read_gguf(path)
        self._interleaved = interleaves_qk(metadata(self.reader, gguf.Keys.General.ARCHITECTURE, None))
        hf_names = list(self.family.tensor_shapes(config)) + [LM_HEAD] * config.tie_word_embeddings
        by_gguf = {self.family.gguf_name(n): n for n in hf_names}
        self._tensor: dict[str, Any] = {}
        for t in self.reader.tensors:
            if t.name in by_gguf:
                self._tensor[by_gguf[t.name]] = t
            elif t.name not in ROPE_TENSORS:  # the config's RoPE scaling, read into it (`gguf_config`)
                raise EdgepruneError(f"{path} holds a tensor edgeprune cannot place in a {self.family.name} model "
                                     f"({t.name}).")
        missing = [n for n in hf_names if n not in self._tensor and n != LM_HEAD]
        if missing:
            raise EdgepruneError(f"{path} lacks tensors a {self.family.name} model needs ({', '.join(missing[:3])}); "
                                 f"the file is incomplete or not a {self.family.name} GGUF.")
        self._quant = gguf.GGMLQuantizationType

    def names(self) -> list[str]:
        return list(self._tensor)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor[name].shape))

    def stored_dtype(self, name: str) -> torch.dtype:
        return torch.float16 if self._tensor[name].tensor_type == self._quant.F16 else torch.float32

    def read(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._tensor[name]
        if t.tensor_type == self._quant.F16:
            data = np.array(t.data, dtype=np.float16).reshape(self.shape(name))
        else:
            data = dequantize(t.data, t.tensor_type).reshape(self.shape(name))
        if self._interleaved and name.endswith(QK_ROWS):
            heads = self.config.num_attention_heads if "q_proj" in name else self.config.num_key_value_heads
            data = reverse_rope_interleave(data, heads)
        shift = self.family.norm_shift(name)
        return _owned(data - np.asarray(shift, dtype=data.dtype) if shift else data)

    def _row_data(self, name: str, rows: Any) -> torch.Tensor:
        """Rows of a tensor whose rows are stored in HF order (not Q/K), dequantized alone: gguf-py
        maps a 2-D tensor as [rows, bytes per row], so a row's blocks never span two rows."""
        from gguf.quants import dequantize

        if self._interleaved and name.endswith(QK_ROWS):
            raise ValueError(f"{name}: its rows are permuted in the GGUF; read it whole")
        t = self._tensor[name]
        part = t.data[rows]
        if t.tensor_type == self._quant.F16:
            return _owned(np.array(part, dtype=np.float16))
        return _owned(dequantize(part, t.tensor_type).reshape(-1, self.shape(name)[1]))

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        # An 8B model's embedding dequantizes to 2 GiB of fp32; a batch needs a few thousand rows.
        unique, inverse = torch.unique(index, return_inverse=True)
        return self._row_data(name, unique.numpy())[inverse]

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._row_data(name, slice(start, stop))


def _owned(data: np.ndarray) -> torch.Tensor:
    """A tensor the caller owns: an F32 GGUF tensor is a view of the read-only mapping."""
    data = np.ascontiguousarray(data)
    return torch.from_numpy(data if data.flags.writeable else data.copy())


class ModuleStore(WeightStore):
    """A transformers model already in memory, read as a store (tests, and models trained in this
    process). Reads are copies, as from a file: what a pass does to them never reaches the model."""

    def __init__(self, model: Any) -> None:
        self.config = model.config
        state = model.state_dict()
        if getattr(self.config, "tie_word_embeddings", False):
            state.pop(LM_HEAD, None)
        self._state = {k: v for k, v in state.items() if not IGNORED.search(k)}

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype

    def read(self, name: str) -> torch.Tensor:
        return self._state[name].detach().clone()

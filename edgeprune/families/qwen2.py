"""Qwen2 / Qwen2.5: Llama's layer plus biases on the q, k and v projections, NeoX-style RoPE.

llama.cpp's `qwen2` graph gives every layer one head count and FFN width, and sizes q and the output
projection by the hidden width (src/models/qwen2.cpp), so it holds depth and FFN pruning only. Fewer
heads, or layers of different shapes, are written as `deci`, whose graph is Qwen2's layer with
per-layer shapes and optional q/k/v biases; it rotates adjacent pairs, so Q/K rows and their biases
are permuted per head as for Llama. Biases are sliced with their rows (`prune/apply.py`).
"""

from __future__ import annotations

import logging
from typing import Any

import gguf

from edgeprune.families.base import Family

log = logging.getLogger(__name__)


def warn_sliding_window(config: Any, where: str, arch: str) -> None:
    """llama.cpp's graph attends over the whole context where the config slides a window on some layers."""
    types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in types:
        log.warning("%s slides a %d-token attention window on %d of its layers, but llama.cpp's %s graph attends "
                    "over the whole context: outputs agree with the original model only for contexts up to %d "
                    "tokens.", where, window, types.count("sliding_attention"), arch, window)


class Qwen2(Family):
    name = "qwen2"
    model_types = ("qwen2",)
    hf_module, hf_prefix = "qwen2", "Qwen2"
    arch, per_layer_arch = gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.DECI

    def holds(self, n_head: int, shape: Any) -> bool:
        return n_head * shape.head_dim == shape.hidden

    def normalize_config(self, config: Any, where: str) -> Any:
        warn_sliding_window(config, where, "qwen2")
        return config

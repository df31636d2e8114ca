"""Qwen3: Llama's layer plus an RMS norm over each query and key head (one weight per head
dimension, shared by the heads, so head pruning leaves it whole), an explicit head_dim, NeoX RoPE.

llama.cpp's `qwen3` graph takes one shape for all layers (sized by head_dim, so uniform head pruning
fits), and `deci` has no Q/K norms: pruned Qwen3 models keep one shape for every layer.
"""

from __future__ import annotations

from typing import Any

import gguf

from edgeprune.families.base import Family
from edgeprune.families.qwen2 import warn_sliding_window


class Qwen3(Family):
    name = "qwen3"
    model_types = ("qwen3",)
    hf_module, hf_prefix = "qwen3", "Qwen3"
    arch = gguf.MODEL_ARCH.QWEN3

    def normalize_config(self, config: Any, where: str) -> Any:
        warn_sliding_window(config, where, "qwen3")
        return config

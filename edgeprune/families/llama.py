"""Llama, and Mistral read as Llama (same tensors and names; Mistral's sliding window is dropped).

llama.cpp's `llama` graph takes one shape for all layers; its `deci` graph (Nemotron's) reads
per-layer head counts and FFN widths, and a head count of 0 skips a layer's attention.
"""

from __future__ import annotations

import logging
from typing import Any

import gguf

from edgeprune.families.base import Family

log = logging.getLogger(__name__)


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral")
    hf_module, hf_prefix = "llama", "Llama"
    arch, per_layer_arch = gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.DECI

    def normalize_config(self, config: Any, where: str) -> Any:
        """Mistral (v0.1-v0.3, Nemo-style explicit head_dim) is Llama's graph plus a sliding window."""
        if config.model_type == "llama":
            return config
        fields = config.to_dict()
        window = fields.pop("sliding_window", None)
        for key in ("model_type", "architectures", "transformers_version"):
            fields.pop(key, None)
        llama = self.config_class()(**fields)
        llama.architectures = ["LlamaForCausalLM"]
        if window is not None and window < config.max_position_embeddings:
            log.warning(
                "%s uses a %d-token sliding attention window, but llama.cpp's llama architecture attends over "
                "the whole context: outputs agree with the original model only for contexts up to %d tokens.",
                where, window, window,
            )
        return llama

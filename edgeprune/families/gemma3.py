"""Gemma 3 (text): Llama's layer with four norms (before and after attention, before and after the
MLP), RMS norms over each query and key head, norms that scale by 1 + weight, embeddings scaled by
sqrt(hidden), a GELU MLP, and two kinds of layer (`config.layer_types`): sliding-window attention
with a local RoPE base, and global attention with the global base.

llama.cpp's `gemma3` graph takes one shape for all layers and has no per-layer alternative: pruned
Gemma 3 models keep one shape for every layer. Its converter stores each norm as 1 + weight; it
writes no layer pattern, so llama.cpp assumes five sliding layers then one global. A pruned model's
pattern is the kept layers', which that rule does not give: it is always written, one bool per
layer (True: sliding).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import gguf

from edgeprune.errors import EdgepruneError
from edgeprune.families.base import Family

log = logging.getLogger(__name__)

VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
SLIDING, GLOBAL = "sliding_attention", "full_attention"
# llama.cpp's pattern for a file that states none: every sixth layer global (src/models/gemma3.cpp).
DEFAULT_PATTERN = 6


class Gemma3(Family):
    name = "gemma3"
    # "gemma3": the multimodal checkpoints (4B and up), whose language model is a gemma3_text one.
    model_types = ("gemma3_text", "gemma3")
    hf_module, hf_prefix = "gemma3", "Gemma3"
    arch = gguf.MODEL_ARCH.GEMMA3

    def config_class(self) -> type:
        from transformers import Gemma3TextConfig  # Gemma3Config is the multimodal model's

        return Gemma3TextConfig

    def normalize_config(self, config: Any, where: str) -> Any:
        """The language model's config (a multimodal checkpoint's text_config); refuse what llama.cpp's
        gemma3 graph computes differently."""
        if config.model_type == "gemma3":
            log.info("%s is multimodal: edgeprune prunes and ships its language model, without the vision tower.",
                     where)
            config = config.text_config
        head_dim = int(config.head_dim)
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise EdgepruneError(f"{where} soft-caps attention logits, which llama.cpp's gemma3 graph does not.")
        if getattr(config, "use_bidirectional_attention", False):
            raise EdgepruneError(f"{where} attends bidirectionally (an embedding model), which llama.cpp's gemma3 "
                                 "graph does not.")
        # llama.cpp scales queries by 1/sqrt(head_dim), except for 62-layer models (27B): by layer count,
        # which a depth-pruned 27B no longer has.
        if config.query_pre_attn_scalar != head_dim:
            raise EdgepruneError(f"{where} scales queries by 1/sqrt({config.query_pre_attn_scalar}), not "
                                 f"1/sqrt(head_dim {head_dim}); edgeprune cannot export it to llama.cpp yet.")
        return config

    def checkpoint_name(self, stored: str) -> str | None:
        """A multimodal checkpoint keeps the language model under `language_model.` (transformers 4:
        `language_model.model.layers.0...`; 5: `model.language_model.layers.0...`), as llama.cpp's
        converter reads it; its vision tower and projector are left out."""
        if stored.startswith(VISION_PREFIXES):
            return None
        return stored.replace("language_model.", "", 1)

    def embedding_scale(self, config: Any) -> float:
        return math.sqrt(config.hidden_size)

    def real_buffers(self, model: Any) -> None:
        import torch

        super().real_buffers(model)
        embed = model.model.embed_tokens
        embed.embed_scale = torch.tensor(embed.scalar_embed_scale)

    def norm_shift(self, hf_name: str) -> float:
        return 1.0 if hf_name.endswith("norm.weight") else 0.0

    def write_hparams(self, writer: gguf.GGUFWriter, config: Any) -> dict[str, Any]:
        from edgeprune.export.rope import rope_theta  # edgeprune.export imports the families

        writer.add_sliding_window(int(config.sliding_window))
        writer.add_rope_freq_base_swa(rope_theta(config, SLIDING))
        writer.add_sliding_window_pattern([t == SLIDING for t in config.layer_types])
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        return {}

    def config_from_gguf(self, reader: Any, hp: Any, fields: dict[str, Any], where: str) -> Any:
        from edgeprune.gguf_file import metadata

        arch, n = hp.arch, fields["num_hidden_layers"]
        pattern = metadata(reader, gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch), DEFAULT_PATTERN)
        sliding = ([bool(s) for s in pattern] if isinstance(pattern, list)
                   else [i % pattern < pattern - 1 for i in range(n)])
        local = {"rope_type": "default",
                 "rope_theta": float(metadata(reader, gguf.Keys.Rope.FREQ_BASE_SWA.format(arch=arch), 10000.0))}
        return self.config_class()(
            **fields | {"rope_parameters": {GLOBAL: fields["rope_parameters"], SLIDING: local}},
            layer_types=[SLIDING if s else GLOBAL for s in sliding], query_pre_attn_scalar=hp.head_dim,
            sliding_window=int(metadata(reader, gguf.Keys.Attention.SLIDING_WINDOW.format(arch=arch), 0)) or None,
            final_logit_softcapping=metadata(reader, gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=arch), None),
            architectures=["Gemma3ForCausalLM"])

"""Phi-3 / Phi-3.5-mini / Phi-4-mini: Llama's layer with q, k and v fused in one `qkv_proj` and gate
and up in one `gate_up_proj` (gate rows first), NeoX RoPE over a `partial_rotary_factor` share of
each head (0.75 in Phi-4-mini), and "longrope" scaling in the long-context models.

llama.cpp's `phi3` graph keeps both fusions (as its converter writes them), gives every layer one
shape and sizes q and the attention output by the hidden width: a Phi-3 model keeps all its query
heads, and prunes layers and FFN channels alike in every layer. (`deci` would take split q/k/v and
per-layer shapes, but rotates the whole head: not Phi-4-mini's partial RoPE.)
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.families.base import Family

ROPE_LONG = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
ROPE_SHORT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"


def _rope(config: Any) -> dict[str, Any]:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def original_context(config: Any) -> int:
    """The context the model was pre-trained at (longrope stretches it to max_position_embeddings)."""
    return int(_rope(config).get("original_max_position_embeddings")
               or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)


class Phi3(Family):
    name = "phi3"
    model_types = ("phi3",)
    hf_module, hf_prefix = "phi3", "Phi3"
    arch = gguf.MODEL_ARCH.PHI3
    fused_projections = True
    head_pruning = False
    rope_kinds = ("longrope",)

    def holds(self, n_head: int, shape: Any) -> bool:
        return n_head * shape.head_dim == shape.hidden

    def rope_dims(self, config: Any) -> int:
        """As llama.cpp's converter counts them: the rotated share of the hidden width, per head."""
        partial = float(_rope(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        return int(partial * config.hidden_size) // config.num_attention_heads

    def config_from_gguf(self, reader: Any, hp: Any, fields: dict[str, Any], where: str) -> Any:
        from edgeprune.gguf_file import metadata

        arch = hp.arch
        rope = dict(fields.pop("rope_parameters"))
        dims = metadata(reader, gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch), hp.head_dim)
        rope["partial_rotary_factor"] = dims * hp.heads[0] / hp.hidden
        original = metadata(reader, gguf.Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch), None)
        factors = {t.name: [float(x) for x in np.asarray(t.data, dtype=np.float32)] for t in reader.tensors
                   if t.name in (ROPE_LONG, ROPE_SHORT)}
        if factors:
            rope |= {"rope_type": "longrope", "long_factor": factors[ROPE_LONG], "short_factor": factors[ROPE_SHORT],
                     "original_max_position_embeddings": original}
        window = metadata(reader, gguf.Keys.Attention.SLIDING_WINDOW.format(arch=arch), 0) or None
        return self.config_class()(**fields, rope_parameters=rope, original_max_position_embeddings=original,
                                   sliding_window=window, architectures=["Phi3ForCausalLM"])

    def write_hparams(self, writer: gguf.GGUFWriter, config: Any) -> dict[str, np.ndarray]:
        writer.add_rope_scaling_orig_ctx_len(original_context(config))
        # 0 for none: llama.cpp's phi3 reads but disables a sliding window anyway.
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
        params = _rope(config)
        if str(params.get("rope_type", "default")) != "longrope":
            return {}
        long, short = params.get("long_factor"), params.get("short_factor")
        half = self.rope_dims(config) // 2
        if not long or not short or len(long) != half or len(short) != half:
            raise EdgepruneError(f"The model's longrope scaling needs long_factor and short_factor lists of {half} "
                                 "values each (half its rotated head dimension); its config.json is incomplete.")
        scale = config.max_position_embeddings / original_context(config)
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(original_context(config))) if scale > 1.0 else 1.0)
        return {ROPE_LONG: np.asarray(long, dtype=np.float32), ROPE_SHORT: np.asarray(short, dtype=np.float32)}

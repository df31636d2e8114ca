"""RoPE hyper-parameters of a Llama config, as llama.cpp's GGUF metadata (and tensors) spell them.

Supported: plain RoPE, "linear" (position interpolation: a scaling factor in the metadata) and
"llama3" (Llama 3.1/3.2: per-frequency divisors in a `rope_freqs.weight` tensor, which llama.cpp's
llama graph divides each rotation frequency by). Other schemes are refused rather than exported
with silently different attention.
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np

from edgeprune.errors import EdgepruneError

ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
# llama.cpp's converter falls back to these when a llama3 config omits a field (Llama 3.1's values).
LLAMA3_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def rope_parameters(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in `rope_parameters`; older configs in `rope_scaling`. A
    config whose layer types differ (Gemma 3) keeps one set per type: `layer_type`'s, the global
    layers' by default (llama.cpp's freq_base; the sliding layers' is freq_base_swa)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    nested = params.get(layer_type)
    return dict(nested) if isinstance(nested, dict) else params


def rope_theta(config: Any, layer_type: str = "full_attention") -> float:
    return float(rope_parameters(config, layer_type).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_type(config: Any) -> str:
    params = rope_parameters(config)
    return str(params.get("rope_type", params.get("type", "default"))).lower()


def head_dim(config: Any) -> int:
    """Configs may set head_dim explicitly (it need not be hidden / heads)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Llama 3.1's frequency divisors: 1 for short wavelengths, `factor` for long ones, a smooth
    blend in between. Computed in float32 like llama.cpp's converter, so files agree bit for bit."""
    import torch

    params = {**LLAMA3_DEFAULTS, **rope_parameters(config)}
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    dim = head_dim(config)
    freqs = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / freqs
    factors = torch.full_like(freqs, factor)
    short = wavelen < old_context / high
    long = wavelen > old_context / low
    band = ~short & ~long
    if band.any():  # empty when low == high (Llama 4), where `smooth` would divide by zero
        smooth = (old_context / wavelen[band] - low) / (high - low)
        factors[band] = 1 / ((1 - smooth) / factor + smooth)
    factors[short] = 1.0
    return factors.numpy().astype(np.float32)


def write_rope(writer: gguf.GGUFWriter, config: Any, family_kinds: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Write the RoPE metadata; return extra tensors the runtime needs (GGUF name -> array). Scalings
    in `family_kinds` the model's family writes itself (`Family.write_hparams`)."""
    writer.add_rope_freq_base(rope_theta(config))
    kind = rope_type(config)
    if kind == "default" or kind in family_kinds:
        return {}
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_parameters(config)["factor"]))
        return {}
    if kind == "llama3":
        return {ROPE_FREQS: llama3_rope_factors(config)}
    raise EdgepruneError(
        f"The model uses RoPE scaling '{kind}', which edgeprune cannot export to GGUF yet "
        f"(supported: default, linear, llama3{''.join(', ' + k for k in family_kinds)})."
    )

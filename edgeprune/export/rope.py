"""RoPE hyper-parameters of a Llama config, as llama.cpp's GGUF metadata (and tensors) spell them."""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from edgeprune.errors import EdgepruneError


def rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in `rope_parameters`; older configs in `rope_scaling`."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def write_rope(writer: gguf.GGUFWriter, config: Any) -> dict[str, np.ndarray]:
    """Write the RoPE metadata; return extra tensors the runtime needs (GGUF name -> array)."""
    params = rope_parameters(config)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind != "default":
        raise EdgepruneError(f"The model uses RoPE scaling '{kind}', which edgeprune cannot export yet.")
    return {}

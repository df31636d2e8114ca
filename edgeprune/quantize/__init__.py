"""Quantize GGUF files with llama.cpp: types, importance matrix, per-tensor recipes."""

from typing import Any

from edgeprune.quantize.llamacpp import QUANT_FTYPES, quantize
from edgeprune.quantize.recipes import RECIPES, EffectiveBits, QuantSpec, Recipe, effective_bits, tensor_shapes

__all__ = ["QUANT_FTYPES", "RECIPES", "EffectiveBits", "QuantSpec", "Recipe", "collect_imatrix", "effective_bits",
           "quantize", "tensor_shapes"]


def __getattr__(name: str) -> Any:
    # The imatrix runs torch; llama.cpp's quantizer child imports this package and must not pay
    # torch's ~250 MiB (it counts against a build's memory).
    if name == "collect_imatrix":
        from edgeprune.quantize.imatrix import collect_imatrix

        return collect_imatrix
    raise AttributeError(name)

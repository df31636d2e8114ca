"""Quantize GGUF files with llama.cpp: types, importance matrix, per-tensor recipes."""

from edgeprune.quantize.imatrix import collect_imatrix
from edgeprune.quantize.llamacpp import QUANT_FTYPES, quantize
from edgeprune.quantize.recipes import RECIPES, EffectiveBits, QuantSpec, Recipe, effective_bits, tensor_shapes

__all__ = ["QUANT_FTYPES", "RECIPES", "EffectiveBits", "QuantSpec", "Recipe", "collect_imatrix", "effective_bits",
           "quantize", "tensor_shapes"]

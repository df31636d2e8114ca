"""Quantize GGUF files with llama.cpp: types, importance matrix, per-tensor recipes."""

from edgeprune.quantize.imatrix import collect_imatrix
from edgeprune.quantize.llamacpp import QUANT_FTYPES, quantize
from edgeprune.quantize.recipes import RECIPES, QuantSpec, Recipe, tensor_shapes

__all__ = ["QUANT_FTYPES", "RECIPES", "QuantSpec", "Recipe", "collect_imatrix", "quantize", "tensor_shapes"]

"""Quantize GGUF files with llama.cpp."""

from edgeprune.quantize.llamacpp import QUANT_FTYPES, quantize

__all__ = ["QUANT_FTYPES", "quantize"]

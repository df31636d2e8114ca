"""Per-tensor quantization recipes: where llama.cpp's mixture cannot apply, what to use instead.

K-quants pack 256 input columns per block. A tensor whose input width is not a multiple of 256
(every attention and up/gate projection of a 576-wide model) silently falls back to a larger
32-block type (Q4_K -> Q5_0, Q6_K -> Q8_0), so "Q4_K_M" of SmolLM2-135M is ~6 bits per weight.
A recipe names the type such tensors get instead, and the type of the output matrix (the
`token_embd` of a tied model), which every generated token multiplies through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgeprune.gguf_file import K_BLOCK, bits_per_weight, read_gguf
from edgeprune.quantize.llamacpp import Override

OUTPUT, TOKEN_EMBD = "output.weight", "token_embd.weight"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    narrow: str | None = None  # type for tensors K-quants cannot pack; None: llama.cpp's fallback
    output: str | None = None  # type for the output matrix; None: llama.cpp's choice
    keep: str | None = None  # regex of narrow tensors left to llama.cpp's mixture and fallback

    def rules(self) -> dict[str, str | None]:
        """What decides the tensor types (the name and description do not): a cache key's part."""
        return {"narrow": self.narrow, "output": self.output, "keep": self.keep}

    def overrides(self, tensors: dict[str, tuple[int, ...]], qtype: str | None = None) -> list[Override]:
        """Exact-name overrides for a model's tensors (GGUF name -> shape, input width first).

        A manual override replaces llama.cpp's whole mixture for that tensor (its shape fallback
        still applies after it). `narrow` is only meant for K-quant mixtures: with `qtype` given,
        types whose blocks fit any width (Q8_0, F16, ...) get no narrow overrides.
        """
        out_name = OUTPUT if OUTPUT in tensors else TOKEN_EMBD
        result: list[Override] = []
        if self.output is not None:
            result.append((f"^{_escape(out_name)}$", self.output))
        if self.narrow is not None and (qtype is None or is_k_mixture(qtype)):
            for name, shape in sorted(tensors.items()):
                if name in (out_name, TOKEN_EMBD) or (self.keep and re.search(self.keep, name)):
                    continue
                if len(shape) >= 2 and shape[0] % K_BLOCK:
                    result.append((f"^{_escape(name)}$", self.narrow))
        return result


def is_k_mixture(qtype: str) -> bool:
    """Q6_K, Q5_K_M, Q4_K_M, ...: the types whose 256-wide blocks need the shape fallback."""
    return "_K" in qtype


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("default", "llama.cpp's own mixture and shape fallbacks"),
        Recipe("q4_0-narrow", "Q4_0 (4.5 bits) where K-quants cannot pack the width", narrow="Q4_0"),
        Recipe("iq4_nl-narrow", "IQ4_NL (4.5 bits, non-linear levels) where K-quants cannot pack the width",
               narrow="IQ4_NL"),
        # attn_v is small and the mixture gives half the layers more bits (Q6_K -> Q8_0 fallback).
        Recipe("iq4_nl-narrow-keep-v", "IQ4_NL where K-quants cannot pack the width, except attn_v "
               "(llama.cpp's choice)", narrow="IQ4_NL", keep=r"\.attn_v\."),
        Recipe("q4_0-narrow-q5_0-output", "Q4_0 where K-quants cannot pack the width; output matrix Q5_0",
               narrow="Q4_0", output="Q5_0"),
        Recipe("iq4_nl-narrow-q5_0-output", "IQ4_NL where K-quants cannot pack the width; output matrix Q5_0",
               narrow="IQ4_NL", output="Q5_0"),
        Recipe("iq4_nl-narrow-keep-v-q5_0-output", "IQ4_NL where K-quants cannot pack the width, except "
               "attn_v; output matrix Q5_0", narrow="IQ4_NL", output="Q5_0", keep=r"\.attn_v\."),
    )
}


@dataclass(frozen=True)
class QuantSpec:
    """How a candidate is quantized: llama.cpp type, per-tensor recipe, importance matrix or not."""

    quant: str = "Q4_K_M"
    recipe: str = "default"
    imatrix: bool = True

    def describe(self) -> str:
        parts = [self.quant] + ([self.recipe] if self.recipe != "default" else [])
        return " ".join(parts) + (" +imatrix" if self.imatrix else "")


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape (ggml order: input width first) of a file."""
    return {t.name: tuple(int(x) for x in t.shape) for t in read_gguf(path).tensors}


@dataclass(frozen=True)
class EffectiveBits:
    """Stored bits per element: over the weight matrices, and over every tensor (norms included)."""

    weights: float
    overall: float


def effective_bits(path: Path) -> EffectiveBits:
    """What a quantization really gave (fallbacks included): tensor bytes x 8 / elements."""
    reader = read_gguf(path)
    overall = 8 * sum(int(t.n_bytes) for t in reader.tensors) / max(1, sum(int(t.n_elements) for t in reader.tensors))
    return EffectiveBits(weights=bits_per_weight(reader), overall=overall)

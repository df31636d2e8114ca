"""How ONNX candidates store their weights, by the name a profile or `--quant` gives. Kept free of
onnx and onnxruntime: configuration validates these names without loading either."""

from __future__ import annotations

from dataclasses import dataclass

from edgeprune.errors import EdgepruneError


@dataclass(frozen=True)
class OnnxWeights:
    """How the decoder's linear layers are stored: fp32, or MatMulNBits of `bits` in blocks of
    `block` along the input. `accuracy_level`: MatMulNBits' compute type (0: as the weights are
    dequantized, in fp32; 4: activations quantized to int8, faster on CPU)."""

    bits: int | None = None
    block: int = 32
    symmetric: bool = False
    accuracy_level: int = 0
    head_bits: int = 8  # the output head's bits when the decoder's are set

    def describe(self) -> str:
        if self.bits is None:
            return "fp32"
        sym = " symmetric" if self.symmetric else ""
        acc = ", int8 compute" if self.accuracy_level == 4 else ""
        return f"int{self.bits} blocks of {self.block}{sym}{acc}, head int{self.head_bits}"


# accuracy_level 4 (int8 activations) for every quantized type: 3-12x faster decode than fp32
# compute on this host (AVX2), for KLD 0.373 -> 0.378 at int4 and 0.0013 -> 0.0044 at int8 on the
# embedded model (benchmarks/onnx_quality.py); onnxruntime-genai's builder defaults to it on CPU.
WEIGHTS = {
    "F32": OnnxWeights(),
    "INT8": OnnxWeights(bits=8, accuracy_level=4),
    "INT4": OnnxWeights(bits=4, block=32, accuracy_level=4),
    "INT4_B128": OnnxWeights(bits=4, block=128, accuracy_level=4),
}
DEFAULT = "INT4"


def onnx_weights(quant: str) -> OnnxWeights:
    if quant not in WEIGHTS:
        raise EdgepruneError(f"ONNX Runtime candidates are quantized as one of {', '.join(WEIGHTS)}, not {quant}.")
    return WEIGHTS[quant]

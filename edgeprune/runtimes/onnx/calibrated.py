"""Calibration-aware block quantization for the ONNX writer: GPTQ layer by layer over a sequential
pass, as llm-compressor runs it. When the writer asks for a weight of decoder layer i, the pass
runs layer i on the calibration activations to gather its linear layers' Hessians, GPTQ packs
each weight, the layer computes from then on with the weights as packed, and its outputs (the
quantization error of every layer above included) are what layer i + 1 is calibrated on.

Working memory: one decoder layer, one Hessian per distinct input (q/k/v share theirs, as do
gate/up), and the calibration activations (spilled to disk past their budget).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from edgeprune.models.streamed import DecoderStream, LayerStep, SequentialPass
from edgeprune.runtimes.onnx import nbits
from edgeprune.runtimes.onnx.gptq import gptq
from edgeprune.sparse.sparsegpt import HessianAccumulator

log = logging.getLogger(__name__)

# A linear layer -> the one whose input it shares (and so its Hessian).
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


def _layer_and_module(name: str) -> tuple[int, str] | None:
    """"model.layers.3.mlp.up_proj.weight" -> (3, "mlp.up_proj"); None outside the decoder."""
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or parts[-1] != "weight":
        return None
    return int(parts[2]), ".".join(parts[3:-1])


class SequentialGptq:
    """A `Quantizer` for `write_onnx`: GPTQ for the decoder's weights, round-to-nearest elsewhere
    (the output head). Weights must be asked for in layer order, as the writer does."""

    def __init__(self, stream: DecoderStream, windows: torch.Tensor, batch_size: int = 4) -> None:
        self._pass = iter(SequentialPass(stream, windows, batch_size, label="GPTQ"))
        self._step: LayerStep | None = None
        self._hessians: dict[str, torch.Tensor] = {}
        self.tokens = int(windows.numel())
        self.seconds = 0.0

    def __call__(self, name: str, w: np.ndarray, bits: int, block: int, symmetric: bool) -> nbits.Packed:
        where = _layer_and_module(name)
        if where is None:
            return nbits.pack(w, bits, block, symmetric)
        t0 = time.perf_counter()
        layer, module = where
        while self._step is None or self._step.index < layer:
            self._next()
        if self._step.index != layer:
            raise ValueError(f"{name}: layer {layer} was asked for after layer {self._step.index}")
        linear = self._step.layer.get_submodule(module)
        if tuple(linear.weight.shape) != w.shape:
            raise ValueError(f"{name}: the writer's weight is {w.shape}, the calibrated layer's "
                             f"{tuple(linear.weight.shape)}")
        packed = gptq(w, self._hessians[SHARED_INPUT.get(module, module)], bits, block, symmetric)
        with torch.no_grad():  # what the next layers are calibrated on: this layer as quantized
            linear.weight.copy_(torch.from_numpy(nbits.unpack(packed)))
        self.seconds += time.perf_counter() - t0
        return packed

    def _next(self) -> None:
        if self._step is not None:
            self._step.advance()
        self._hessians.clear()
        step = next(self._pass)
        owners = {name: mod for name, mod in step.layer.named_modules()
                  if isinstance(mod, nn.Linear) and name not in SHARED_INPUT}
        stats = {name: HessianAccumulator(mod.in_features) for name, mod in owners.items()}
        handles = [mod.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0]))
                   for name, mod in owners.items()]
        try:
            step.run()
        finally:
            for h in handles:
                h.remove()
        self._hessians = {name: s.h for name, s in stats.items()}
        self._step = step

    def close(self) -> None:
        """End the pass (its spilled activations go)."""
        self._hessians.clear()
        self._pass.close()

"""ONNX as ONNX Runtime's model format: a graph written from the source weights with the plan
applied, its decoder weights block-quantized (GPTQ on the calibration windows when the candidate
is calibrated, round-to-nearest otherwise), the weights in `model.onnx.data` beside it."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.models.streamed import DecoderStream
from edgeprune.runtimes.artifacts import ModelFormat, Realization
from edgeprune.runtimes.onnx import session
from edgeprune.runtimes.onnx.calibrated import SequentialGptq
from edgeprune.runtimes.onnx.graph import relocate
from edgeprune.runtimes.onnx.llama import write_onnx
from edgeprune.runtimes.onnx.weights import onnx_weights

log = logging.getLogger(__name__)

class Onnx(ModelFormat):
    name = "onnx"
    suffix = ".onnx"
    code_modules = (__name__,)  # with everything it imports (hashing.code_hash)

    def files(self, model: Path) -> list[Path]:
        return [model, model.with_name(model.name + ".data")]

    def copy(self, model: Path, dst: Path) -> None:
        relocate(model, dst)

    def realize(self, job: Realization, out: Path) -> None:
        weights = onnx_weights(job.quant.quant)
        if job.quant.recipe != "default":
            raise EdgepruneError(f"Recipe {job.quant.recipe} names llama.cpp's tensor types; ONNX candidates take "
                                 "the default recipe.")
        quantizer = None
        if weights.bits is not None and job.calib is not None:
            quantizer = SequentialGptq(DecoderStream(job.weights, job.plan, job.overrides), job.calib)
        try:
            write_onnx(job.weights, job.plan, out, weights, job.provenance, job.name, job.overrides, quantizer)
        finally:
            if quantizer is not None:
                quantizer.close()
                log.info("GPTQ on %d calibration tokens in %.1f s", quantizer.tokens, quantizer.seconds)

    def sequence_logits(self, model: Path, windows: np.ndarray, threads: int,
                        settings: Mapping[str, Any] | None = None) -> Iterator[np.ndarray]:
        return session.sequence_logits(model, windows, threads)  # its searched settings (threads) change none

    def greedy(self, model: Path, prompt: list[int], max_tokens: int, threads: int, stop: frozenset[int]) -> list[int]:
        return session.greedy(model, prompt, max_tokens, threads, stop)


ONNX = Onnx()

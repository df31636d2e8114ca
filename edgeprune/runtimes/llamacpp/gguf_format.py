"""GGUF as llama.cpp's model format: written tensor by tensor in 16 bits from the source weights,
an importance matrix collected on the pruned model, then quantized by llama.cpp."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.export import write_gguf
from edgeprune.gguf_file import read_gguf
from edgeprune.models.streamed import DecoderStream
from edgeprune.quantize import RECIPES, collect_imatrix, quantize, tensor_shapes
from edgeprune.runtimes import llamacpp
from edgeprune.runtimes.artifacts import ModelFormat, Realization


class Gguf(ModelFormat):
    name = "gguf"
    suffix = ".gguf"
    code_modules = (__name__,)
    vocabulary_inside = True

    def check(self, model: Path) -> None:
        read_gguf(model)  # a GGUF's header and tensor extents, each fault in one sentence

    def realize(self, job: Realization, out: Path) -> None:
        intermediate = out.with_name(out.stem + "-16bit.gguf")
        write_gguf(job.weights, job.plan, job.tokenizer, intermediate, "auto", job.provenance, name=job.name,
                   overrides=job.overrides)
        imatrix = None
        if job.quant.imatrix:
            imatrix = collect_imatrix(DecoderStream(job.weights, job.plan, job.overrides), job.calib)
        recipe = RECIPES[job.quant.recipe].overrides(tensor_shapes(intermediate), job.quant.quant)
        quantize(intermediate, out, job.quant.quant, job.threads, imatrix, recipe)
        intermediate.unlink()

    def sequence_logits(self, model: Path, windows: np.ndarray, threads: int,
                        settings: Mapping[str, Any] | None = None) -> Iterator[np.ndarray]:
        return llamacpp.sequence_logits(model, windows, threads, doing="measuring the quality of", settings=settings)

    def greedy(self, model: Path, prompt: list[int], max_tokens: int, threads: int, stop: frozenset[int]) -> list[int]:
        answer = llamacpp.greedy_answer(model, prompt, max_tokens, threads)  # ends at the GGUF's own EOG tokens
        return answer[:next((i for i, t in enumerate(answer) if t in stop), len(answer))]


GGUF = Gguf()

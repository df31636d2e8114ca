"""How a runtime's model files are made and read: all that a cached stage knows of a runtime.

Stage keys hash the code an artifact came from (`hashing.code_hash`, which follows imports). A
stage imports this module, never a runtime's: it adds its format's `identity` (name and the hash
of the code that writes and reads the files) to its own. So editing a device, or adding another
runtime, rebuilds nothing that runtime did not make.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance
from edgeprune.hashing import code_hash, sha256_json
from edgeprune.models.streamed import Overrides
from edgeprune.models.tokenizer import TokenizerSpec
from edgeprune.models.weights import WeightStore
from edgeprune.prune import Plan
from edgeprune.quantize import QuantSpec


@dataclass(frozen=True)
class Realization:
    """One candidate as a runtime is asked to write it: the source weights with a plan (and any
    sparse weights) applied, quantized as `quant` says."""

    weights: WeightStore
    plan: Plan
    tokenizer: TokenizerSpec
    provenance: Provenance
    name: str
    quant: QuantSpec
    calib: torch.Tensor | None  # calibration windows, for a calibrated quantization
    overrides: Overrides
    threads: int


class ModelFormat(ABC):
    name: ClassVar[str]
    suffix: ClassVar[str]
    code_modules: ClassVar[tuple[str, ...]]  # the code that writes and reads its files
    vocabulary_inside: ClassVar[bool] = False  # the model file holds its tokenizer (llama.cpp's GGUF does)

    @property
    def model_file(self) -> str:
        return "model" + self.suffix

    def files(self, model: Path) -> list[Path]:
        """Every file the model is made of (a format may keep weights beside the model file)."""
        return [model]

    def check(self, model: Path) -> None:
        """One sentence when a file of the model is missing or broken (before a runner meets it)."""
        files = self.files(model)
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            whole = f": the model is {' and '.join(f.name for f in files)}, side by side" if len(files) > 1 else ""
            raise EdgepruneError(f"{missing} does not exist{whole}.")

    def copy(self, model: Path, dst: Path) -> None:
        """Copy the model to `dst` (a file name of this format), with every file it is made of."""
        shutil.copyfile(model, dst)

    def size_bytes(self, model: Path) -> int:
        return sum(f.stat().st_size for f in self.files(model))

    def identity(self) -> dict[str, Any]:
        return {"format": self.name, "code": sha256_json({m: code_hash(m) for m in self.code_modules})}

    @abstractmethod
    def realize(self, job: Realization, out: Path) -> None:
        """Write the candidate as `out`."""

    @abstractmethod
    def sequence_logits(self, model: Path, windows: np.ndarray, threads: int,
                        settings: Mapping[str, Any] | None = None) -> Iterator[np.ndarray]:
        """The model's logits at every position of every window, one [len, vocab] array at a time;
        `settings`: runtime settings to run with (those that change logits are used, `Runtime.lossy_settings`)."""

    @abstractmethod
    def greedy(self, model: Path, prompt: list[int], max_tokens: int, threads: int, stop: frozenset[int]) -> list[int]:
        """Greedy tokens after `prompt`, up to `max_tokens`, ending before a token in `stop`."""

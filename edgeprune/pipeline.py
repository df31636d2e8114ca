"""The cached stages of a build: calibration text, importance, candidate models, quality."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprune.analysis import Importance
from edgeprune.analysis.methods import LAYER_IMPORTANCE, UNIT_IMPORTANCE
from edgeprune.config import CalibrationSettings, SearchSettings, SparsitySpec
from edgeprune.data import HFDataset, TextSplits, from_file, from_hf, self_generated
from edgeprune.evaluate import QualityTally, reference_log_probs, reference_perplexity
from edgeprune.events import STAGE, event
from edgeprune.export import Provenance
from edgeprune.footprint import QUICK_QUANT
from edgeprune.models import Reference
from edgeprune.models.streamed import DecoderStream, Overrides
from edgeprune.progress import progress
from edgeprune.prune import Plan
from edgeprune.prune.apply import pruned_tensors
from edgeprune.quantize import RECIPES, QuantSpec
from edgeprune.runtimes.artifacts import ModelFormat, Realization
from edgeprune.runtimes.llamacpp.gguf_format import GGUF
from edgeprune.sparse.methods import needs_calibration
from edgeprune.sparse.sequential import linear_weights, sparsify_stream
from edgeprune.stages import Stage, StageOutput, StageRunner
from edgeprune.structured import STRUCTURED_METHODS, structured_importance

log = logging.getLogger(__name__)

# Where a stage that replaces weights of the pruned model (sparse, recovered) writes them: one
# safetensors file per layer, tensors by HF name in the pruned model.
WEIGHTS_DIR = "weights"
LOGPROBS_FILE = "logprobs.npy"


class SelfCalibration(Stage):
    """Calibration and held-out windows sampled through llama.cpp from a GGUF of the reference: the
    source GGUF itself when the model is one, else a quick copy (`quick_copy`), built only when the
    windows are not cached already. Set `model` to the GGUF before running."""

    name = "self-calibration"

    def __init__(self, reference: Reference, settings: CalibrationSettings, threads: int) -> None:
        self.reference, self.settings, self.threads = reference, settings, threads
        self.generator = quick_copy(reference, threads)  # None: the source GGUF
        self.model: Path | None = None if self.generator is not None else reference.source.path

    def identity(self) -> dict[str, Any]:
        # Not the thread count: 1 and 2 threads sampled the same windows (tests/test_self_generation.py).
        # A quick copy by its stage key, which fixes its bytes: no need to build it to know them.
        generator = "reference source" if self.generator is None else self.generator.key()
        return {"reference": self.reference.sha256, "settings": self.settings.model_dump(), "generator": generator}

    def run(self, out_dir: Path) -> dict[str, Any]:
        if self.model is None:
            raise ValueError("SelfCalibration runs with its `model` set (calibration_splits sets it)")
        splits = self_generated(self.model, self.reference.tokenizer, self.settings, self.threads)
        np.save(out_dir / "calib.npy", splits.calib.numpy(), allow_pickle=False)
        np.save(out_dir / "heldout.npy", splits.heldout.numpy(), allow_pickle=False)
        return {"source": splits.source, "sha256": splits.sha256, "generation": splits.generation}

    @staticmethod
    def load(out_dir: Path, result: dict[str, Any]) -> TextSplits:
        return TextSplits(
            calib=torch.from_numpy(np.load(out_dir / "calib.npy", allow_pickle=False)),
            heldout=torch.from_numpy(np.load(out_dir / "heldout.npy", allow_pickle=False)),
            source=result["source"],
            sha256=result["sha256"],
            generation=result.get("generation"),
        )


def quick_copy(reference: Reference, threads: int) -> CandidateModel | None:
    """The stage that makes the GGUF self-calibration samples from, or None when the source is a
    GGUF itself: a quick copy of the reference (exported tensor by tensor, QUICK_QUANT without an
    imatrix: fast to quantize, and close enough for writing text)."""
    if reference.source.kind in ("embedded", "gguf"):
        return None
    return CandidateModel(reference, Plan(), QuantSpec(QUICK_QUANT, imatrix=False), None, threads, fmt=GGUF)


def generation_model(reference: Reference, runner: StageRunner, threads: int) -> Path:
    """The GGUF self-calibration samples from (built and cached when it is a quick copy)."""
    stage = quick_copy(reference, threads)
    return reference.source.path if stage is None else stage.file(runner.run(stage))


def calibration_splits(reference: Reference, settings: CalibrationSettings, calib: Path | HFDataset | None,
                       runner: StageRunner, threads: int | None = None, keep_quick_copy: bool = True) -> TextSplits:
    """Calibration + held-out windows: from the user's file or dataset, or self-generated (cached).
    `keep_quick_copy`: False removes the quick copy from the cache once the windows are sampled
    (a build short of disk; a later build with other calibration settings makes it again)."""
    if isinstance(calib, HFDataset):
        splits = from_hf(calib, reference.tokenizer, settings)
        event(log, STAGE, "calibration text: %s", splits.source, name="calibration")
        return splits
    if calib is not None:
        return from_file(calib, reference.tokenizer, settings)
    threads = threads or max(1, os.cpu_count() or 1)
    event(log, STAGE, "calibration text: self-generated through llama.cpp (cached after the first run)",
          name="calibration")
    stage = SelfCalibration(reference, settings, threads)
    out = runner.cached(stage)
    if out is None:
        quick = runner.run(stage.generator) if stage.generator is not None else None
        if quick is not None:
            stage.model = stage.generator.file(quick)
        out = runner.run(stage)
        if quick is not None and not keep_quick_copy:
            runner.discard(quick)
    return SelfCalibration.load(out.dir, out.result)


def importance_of(reference: Reference, splits: TextSplits, settings: SearchSettings,
                  runner: StageRunner) -> Importance:
    """The scores the search ranks by: layers and attention sublayers by the profile's depth method,
    heads and FFN channels by its width method (one cached pass)."""
    event(log, STAGE, "importance analysis (%s, %s)", settings.depth_method, settings.width_method,
          name="importance")
    depth = STRUCTURED_METHODS[settings.depth_method]
    width = STRUCTURED_METHODS[settings.width_method]
    layer, attention = (LAYER_IMPORTANCE[depth.importance](g) for g in ("layer", "attention"))
    unit = UNIT_IMPORTANCE[width.importance]()
    scores = structured_importance(reference, splits, [layer, attention], [unit], runner)
    return Importance.from_structured(scores, layer.key, attention.key, unit.name)


class ReferenceLogProbs(Stage):
    """The reference's log-probabilities on the held-out windows, computed one layer at a time and
    kept on disk ([windows, tokens, vocab] float32, memory-mapped when read)."""

    name = "reference-logprobs"

    def __init__(self, reference: Reference, splits: TextSplits) -> None:
        self.reference, self.splits = reference, splits

    def identity(self) -> dict[str, Any]:
        return {"reference": self.reference.sha256, "heldout": self.splits.sha256}

    def run(self, out_dir: Path) -> dict[str, Any]:
        windows = self.splits.heldout
        vocab = self.reference.weights.shape(self.reference.weights.head_name())[0]
        out = np.lib.format.open_memmap(out_dir / LOGPROBS_FILE, mode="w+", dtype=np.float32,
                                        shape=(*windows.shape, vocab))
        reference_log_probs(self.reference.weights, windows, out)
        out.flush()
        del out
        return {"perplexity": reference_perplexity(self.load(out_dir), windows)}

    @staticmethod
    def load(out_dir: Path) -> np.ndarray:
        return np.load(out_dir / LOGPROBS_FILE, mmap_mode="r")


def reference_logprobs(reference: Reference, splits: TextSplits, runner: StageRunner) -> tuple[np.ndarray, float]:
    """The held-out log-probabilities (memory-mapped from the stage cache) and the reference's perplexity."""
    out = runner.run(ReferenceLogProbs(reference, splits))
    return ReferenceLogProbs.load(out.dir), out.result["perplexity"]


class SparseWeights(Stage):
    """The reference with a plan applied, then sparsified (Wanda, SparseGPT, magnitude) with
    sequential calibration, one layer at a time. Only the decoder's linear weights change: only
    they are stored, one file per layer."""

    name = "sparse-weights"

    def __init__(self, reference: Reference, plan: Plan, spec: SparsitySpec, calib: TextSplits | None) -> None:
        self.reference, self.plan, self.spec, self.calib = reference, plan, spec, calib

    def identity(self) -> dict[str, Any]:
        return {"reference": self.reference.sha256, "plan": self.plan.to_dict(), "sparsity": self.spec.model_dump(),
                "calibration": self.calib.sha256 if needs_calibration(self.spec.method) else None}

    def run(self, out_dir: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        (out_dir / WEIGHTS_DIR).mkdir()

        def save(i: int, layer: torch.nn.Module) -> None:
            save_file(linear_weights(i, layer), out_dir / WEIGHTS_DIR / f"layer-{i}.safetensors")

        stream = DecoderStream(self.reference.weights, self.plan)
        report = sparsify_stream(stream, self.calib.calib if self.calib else None, self.spec.method,
                                 self.spec.settings(), save)
        return report.to_dict() | {"spec": self.spec.model_dump()}


def replaced_overrides(replaced: StageOutput | None) -> Overrides:
    """Loaders of the tensors a SparseWeights or RecoveredWeights stage wrote, by name in the pruned
    model (each read when needed)."""
    if replaced is None:
        return {}
    from safetensors import safe_open

    def loader(path: Path, name: str):
        def load() -> torch.Tensor:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        return load

    out: dict[str, Any] = {}
    for path in sorted((replaced.dir / WEIGHTS_DIR).glob("layer-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: loader(path, name) for name in f.keys()})
    return out


class CandidateModel(Stage):
    """Apply a plan to the reference and write it as a runtime's model file (`fmt`), quantized.

    For GGUF: exported in 16 bits tensor by tensor, then quantized by llama.cpp, with an importance
    matrix collected on the pruned model itself, one layer at a time, from calibration windows only
    (pruning changes what later layers see). `replaced`: the output of a SparseWeights or
    RecoveredWeights stage whose weights replace the plain pruned ones.
    """

    name = "candidate-model"

    def __init__(self, reference: Reference, plan: Plan, quant: QuantSpec, calib: TextSplits | None,
                 threads: int, replaced: StageOutput | None = None, fmt: ModelFormat = GGUF) -> None:
        if quant.imatrix and calib is None:
            raise ValueError("an importance matrix needs calibration windows")
        self.reference, self.plan, self.quant, self.calib, self.threads = reference, plan, quant, calib, threads
        self.replaced, self.format = replaced, fmt

    def identity(self) -> dict[str, Any]:
        return {"reference": self.reference.sha256, "plan": self.plan.to_dict(), "quant": self.quant.quant,
                "recipe": RECIPES[self.quant.recipe].rules(),  # its contents: a recipe's name can be redefined
                "imatrix": self.calib.sha256 if self.quant.imatrix else None,
                "replaced_weights": self.replaced.key if self.replaced is not None else None,
                "format": self.format.identity()}

    def file(self, out: StageOutput) -> Path:
        """The model file in this stage's outputs."""
        return out.dir / self.format.model_file

    def run(self, out_dir: Path) -> dict[str, Any]:
        weights = self.reference.weights
        replaced = self.replaced.result if self.replaced else {}
        provenance = Provenance(self.reference.source.model_id, self.reference.sha256, self.plan.to_dict(),
                                replaced.get("spec"), replaced.get("recovery"))
        job = Realization(weights, self.plan, self.reference.tokenizer_spec, provenance, self.reference.source.model_id,
                          self.quant, self.calib.calib if self.quant.imatrix else None,
                          replaced_overrides(self.replaced), self.threads)
        model = out_dir / self.format.model_file
        self.format.realize(job, model)
        parameters = sum(math.prod(t.shape) for t in pruned_tensors(weights, self.plan))  # tied counted once
        return {"size_bytes": self.format.size_bytes(model), "parameters": parameters}


class CandidateQuality(Stage):
    """The candidate's logits in its own runtime on held-out windows against the reference's."""

    name = "quality"

    def __init__(self, model: Path, model_key: str, splits: TextSplits, ref_logps: np.ndarray,
                 threads: int, fmt: ModelFormat = GGUF, settings: dict[str, Any] | None = None) -> None:
        self.model, self.model_key, self.splits = model, model_key, splits
        self.ref_logps, self.threads, self.format = ref_logps, threads, fmt
        self.settings = settings or {}  # runtime settings, when one changes the logits (`Runtime.lossy_settings`)

    def identity(self) -> dict[str, Any]:
        out = {"model": self.model_key, "heldout": self.splits.sha256, "format": self.format.identity()}
        return out | ({"settings": self.settings} if self.settings else {})

    def run(self, out_dir: Path) -> dict[str, Any]:
        tally = QualityTally()
        windows = self.splits.heldout
        logits = self.format.sequence_logits(self.model, windows.numpy(), self.threads, self.settings)
        pairs = zip(self.ref_logps, logits, windows, strict=True)
        for ref_logp, cand, tokens in progress(pairs, "quality", total=len(windows)):
            tally.add(ref_logp, cand, tokens)
        return tally.result().to_dict()

"""The cached stages of a build: calibration text, importance, candidate models, quality."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprune.analysis import Importance, compute_importance
from edgeprune.config import CalibrationSettings
from edgeprune.data import TextSplits, generation_key, self_generated
from edgeprune.evaluate import QualityTally
from edgeprune.export import Provenance, export_gguf
from edgeprune.models import Reference
from edgeprune.progress import progress
from edgeprune.prune import Plan, apply_plan
from edgeprune.quantize import quantize
from edgeprune.runtimes import llamacpp
from edgeprune.stages import Stage

MODEL_FILE = "model.gguf"


class SelfCalibration(Stage):
    """Calibration and held-out windows sampled from the reference itself."""

    name = "self-calibration"

    def __init__(self, reference: Reference, settings: CalibrationSettings) -> None:
        self.reference, self.settings = reference, settings

    def identity(self) -> dict[str, Any]:
        return generation_key(self.reference.sha256, self.settings)

    def run(self, out_dir: Path) -> dict[str, Any]:
        splits = self_generated(self.reference.model, self.reference.tokenizer, self.settings)
        np.save(out_dir / "calib.npy", splits.calib.numpy(), allow_pickle=False)
        np.save(out_dir / "heldout.npy", splits.heldout.numpy(), allow_pickle=False)
        return {"source": splits.source, "sha256": splits.sha256}

    @staticmethod
    def load(out_dir: Path, result: dict[str, Any]) -> TextSplits:
        return TextSplits(
            calib=torch.from_numpy(np.load(out_dir / "calib.npy", allow_pickle=False)),
            heldout=torch.from_numpy(np.load(out_dir / "heldout.npy", allow_pickle=False)),
            source=result["source"],
            sha256=result["sha256"],
        )


class ImportanceAnalysis(Stage):
    name = "importance"

    def __init__(self, reference: Reference, splits: TextSplits) -> None:
        self.reference, self.splits = reference, splits

    def identity(self) -> dict[str, Any]:
        return {"reference": self.reference.sha256, "calibration": self.splits.sha256}

    def run(self, out_dir: Path) -> dict[str, Any]:
        return compute_importance(self.reference.model, self.splits.calib).to_dict()

    @staticmethod
    def load(result: dict[str, Any]) -> Importance:
        return Importance.from_dict(result)


class CandidateModel(Stage):
    """Apply a plan to the reference, export an F32 GGUF, quantize it; keep only the quantized file."""

    name = "candidate-model"

    def __init__(self, reference: Reference, plan: Plan, quant: str, threads: int) -> None:
        self.reference, self.plan, self.quant, self.threads = reference, plan, quant, threads

    def identity(self) -> dict[str, Any]:
        return {"reference": self.reference.sha256, "plan": self.plan.to_dict(), "quant": self.quant}

    def run(self, out_dir: Path) -> dict[str, Any]:
        pruned = apply_plan(self.reference.model, self.plan)
        f32 = out_dir / "model-f32.gguf"
        provenance = Provenance(self.reference.source.model_id, self.reference.sha256, self.plan.to_dict())
        export_gguf(pruned, self.reference.tokenizer_spec, f32, "F32", provenance, name=self.reference.source.model_id)
        parameters = pruned.num_parameters()  # shared (tied) tensors counted once
        del pruned
        quantize(f32, out_dir / MODEL_FILE, self.quant, self.threads)
        f32.unlink()
        return {"size_bytes": os.path.getsize(out_dir / MODEL_FILE), "parameters": parameters}


class CandidateQuality(Stage):
    """The candidate's llama.cpp logits on held-out windows against the reference's."""

    name = "quality"

    def __init__(self, model: Path, model_key: str, splits: TextSplits, ref_logps: list[torch.Tensor],
                 threads: int) -> None:
        self.model, self.model_key, self.splits = model, model_key, splits
        self.ref_logps, self.threads = ref_logps, threads

    def identity(self) -> dict[str, Any]:
        return {"model": self.model_key, "heldout": self.splits.sha256}

    def run(self, out_dir: Path) -> dict[str, Any]:
        tally = QualityTally()
        windows = self.splits.heldout
        logits = llamacpp.sequence_logits(self.model, windows.numpy(), self.threads)
        pairs = zip(self.ref_logps, logits, windows, strict=True)
        for ref_logp, cand, tokens in progress(pairs, "quality", total=len(windows)):
            tally.add(ref_logp, cand, tokens)
        return tally.result().to_dict()

"""The cached stages of recovery: its training text, the teacher's targets on it, the recovered weights.

`RecoveredWeights` writes what `SparseWeights` writes (the pruned model's decoder tensors that
change, one file per layer), so `CandidateModel` exports, quantizes (imatrix from the recovered
model itself) and measures a recovered candidate as any other.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprune.config import CalibrationSettings, RecoverySettings
from edgeprune.data import HFDataset, TextSplits, chat_windows, generation_record, user_windows
from edgeprune.hashing import sha256_file, sha256_json
from edgeprune.models import Reference
from edgeprune.models.streamed import DecoderStream, SequentialPass
from edgeprune.pipeline import WEIGHTS_DIR, quick_copy
from edgeprune.progress import progress
from edgeprune.prune import Plan
from edgeprune.recover.distill import TopK
from edgeprune.recover.student import student
from edgeprune.recover.trainer import Recovery, TrainingData
from edgeprune.stages import Stage, StageOutput

log = logging.getLogger(__name__)

TRAIN_FILE = "train.npy"
TEACHER_LOGP = "teacher-logp.npy"
TEACHER_INDEX = "teacher-index.npy"
MAX_USER_WINDOWS = 4096
# Settings that decide which candidates a build recovers, not how one is recovered.
_BUILD_ONLY = {"enabled", "candidates"}


class TrainingText(Stage):
    """Token windows to distil on: the calibration windows, chat answers self-generated for other
    prompts than the calibration and held-out ones (through llama.cpp, as calibration is), and the
    user's `--train` text. A window equal to a held-out window is dropped: quality is measured on
    text recovery never saw. Set `model` to the generating GGUF before running when `generator` is set."""

    name = "training-text"

    def __init__(self, reference: Reference, splits: TextSplits, calibration: CalibrationSettings,
                 settings: RecoverySettings, train: Path | HFDataset | None, threads: int) -> None:
        self.reference, self.splits, self.calibration = reference, splits, calibration
        self.settings, self.train, self.threads = settings, train, threads
        self.generator = quick_copy(reference, threads) if settings.extra_samples else None
        self.model: Path | None = reference.source.path if self.generator is None else None

    def identity(self) -> dict[str, Any]:
        if self.train is None:
            train = None
        elif isinstance(self.train, HFDataset):
            train = self.train.model_dump()
        else:
            train = sha256_file(self.train)
        generator = None if not self.settings.extra_samples else (
            "reference source" if self.generator is None else self.generator.key())
        return {"reference": self.reference.sha256, "splits": self.splits.sha256, "seq_len": self.calibration.seq_len,
                "seed": self.calibration.seed, "extra_samples": self.settings.extra_samples, "train": train,
                "generator": generator}

    def run(self, out_dir: Path) -> dict[str, Any]:
        tokenizer, seq_len = self.reference.tokenizer, self.splits.calib.shape[1]
        parts = {"calibration": self.splits.calib}
        result: dict[str, Any] = {}
        if self.settings.extra_samples:
            if self.model is None:
                raise ValueError("TrainingText runs with its `model` set (training_text sets it)")
            first = self.calibration.samples + self.calibration.heldout_samples  # prompts no window has used
            rows, gen = chat_windows(self.model, tokenizer, range(first, first + self.settings.extra_samples),
                                     seq_len, self.calibration.seed, self.threads)
            parts["self-generated"] = rows
            result["generation"] = generation_record(self.model, gen)
        if self.train is not None:
            parts["user"], result["user_text"] = user_windows(self.train, tokenizer, seq_len, MAX_USER_WINDOWS)
        heldout = {tuple(w) for w in self.splits.heldout.tolist()}
        windows = torch.cat(list(parts.values()))
        keep = [i for i, w in enumerate(windows.tolist()) if tuple(w) not in heldout]
        windows = windows[keep]
        np.save(out_dir / TRAIN_FILE, windows.numpy(), allow_pickle=False)
        dropped = sum(len(v) for v in parts.values()) - len(keep)
        return result | {"windows": {k: len(v) for k, v in parts.items()}, "dropped_heldout": dropped,
                         "tokens": int(windows.numel()), "sha256": sha256_json(windows.tolist())}

    @staticmethod
    def load(out: StageOutput) -> torch.Tensor:
        return torch.from_numpy(np.load(out.dir / TRAIN_FILE, allow_pickle=False))


def training_text(stage: TrainingText, runner: Any) -> StageOutput:
    """Run the stage, building the GGUF it samples from first when that is a quick copy."""
    out = runner.cached(stage)
    if out is not None:
        return out
    if stage.generator is not None:
        stage.model = stage.generator.file(runner.run(stage.generator))
    return runner.run(stage)


class TeacherTargets(Stage):
    """The reference's top-k log-probabilities (at the distillation temperature) on the training
    windows, computed one layer at a time; the head is read in row blocks (`distill.TopK`)."""

    name = "teacher-targets"

    def __init__(self, reference: Reference, text: StageOutput, settings: RecoverySettings) -> None:
        self.reference, self.text, self.settings = reference, text, settings

    def identity(self) -> dict[str, Any]:
        return {"reference": self.reference.sha256, "text": self.text.key, "temperature": self.settings.temperature,
                "top_k": self.settings.top_k}

    @torch.no_grad()
    def run(self, out_dir: Path) -> dict[str, Any]:
        windows = TrainingText.load(self.text)
        stream = DecoderStream(self.reference.weights)
        passes = SequentialPass(stream, windows, batch_size=4, label="teacher targets")
        hidden = passes.run()
        norm = stream.final_norm()
        normed = [norm(hidden[b]).reshape(-1, hidden[b].shape[-1]) for b in range(len(hidden))]
        passes.close()
        cap = getattr(stream.config, "final_logit_softcapping", None)
        tops = [TopK(self.settings.top_k) for _ in normed]
        for start, block in progress(stream.head_blocks(), "teacher head"):
            for h, top in zip(normed, tops, strict=True):
                logits = h @ block.T
                if cap:
                    logits = cap * torch.tanh(logits / cap)
                top.add(logits / self.settings.temperature, start)
        k = self.settings.top_k
        logp = np.lib.format.open_memmap(out_dir / TEACHER_LOGP, mode="w+", dtype=np.float32, shape=(*windows.shape, k))
        index = np.lib.format.open_memmap(out_dir / TEACHER_INDEX, mode="w+", dtype=np.int32, shape=(*windows.shape, k))
        row = 0
        for top in tops:
            values, ids = top.log_probs()
            n = values.shape[0] // windows.shape[1]
            logp[row : row + n] = values.reshape(n, windows.shape[1], -1).numpy()
            index[row : row + n] = ids.reshape(n, windows.shape[1], -1).numpy()
            row += n
        top_mass = float(np.exp(logp).sum(-1).mean())
        logp.flush()
        index.flush()
        del logp, index
        return {"top_k": k, "temperature": self.settings.temperature, "positions": int(windows.numel()),
                "mean_top_k_mass": round(top_mass, 4)}

    @staticmethod
    def data(text: StageOutput, teacher: StageOutput) -> TrainingData:
        return TrainingData(TrainingText.load(text), np.load(teacher.dir / TEACHER_LOGP, mmap_mode="r"),
                            np.load(teacher.dir / TEACHER_INDEX, mmap_mode="r"))


class RecoveredWeights(Stage):
    """A pruned model distilled toward the reference and merged: its changed decoder tensors, one
    file per layer. A killed run resumes from `<checkpoint_root>/<key>` (kept apart from the stage's
    temporary directory, which a killed build loses)."""

    name = "recovered-weights"

    def __init__(self, reference: Reference, plan: Plan, settings: RecoverySettings, text: StageOutput,
                 teacher: StageOutput, threads: int, checkpoint_root: Path) -> None:
        self.reference, self.plan, self.settings = reference, plan, settings
        self.text, self.teacher, self.threads, self.checkpoint_root = text, teacher, threads, checkpoint_root

    def identity(self) -> dict[str, Any]:
        return {"reference": self.reference.sha256, "plan": self.plan.to_dict(),
                "settings": self.settings.model_dump(exclude=_BUILD_ONLY), "text": self.text.key,
                "teacher": self.teacher.key, "peft": metadata.version("peft")}

    def checkpoints(self) -> Path:
        return self.checkpoint_root / self.key()

    def run(self, out_dir: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        model = student(self.reference.weights, self.plan, self.settings.method)
        recovery = Recovery(model, TeacherTargets.data(self.text, self.teacher), self.settings, self.threads,
                            self.checkpoints())
        (out_dir / WEIGHTS_DIR).mkdir()
        # Merged tensors arrive in layer order: each layer's file written once its last tensor is in.
        for i, layer in itertools.groupby(recovery.run(), key=lambda item: int(item[0].split(".")[2])):
            save_file(dict(layer), out_dir / WEIGHTS_DIR / f"layer-{i}.safetensors")
        shutil.rmtree(self.checkpoints(), ignore_errors=True)
        record = recovery.log.summary() | {"method": self.settings.method, "description": self.settings.describe(),
                                           "threads": self.threads}
        log.info("recovery: %d steps, %d tokens in %.0f s; KD loss %.3f -> %.3f", record["steps"], record["tokens"],
                 record["seconds"], record["first_loss"] or float("nan"), record["last_loss"] or float("nan"))
        return {"recovery": record, "losses": recovery.log.losses}

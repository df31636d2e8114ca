"""Recovery fine-tuning: a pruned model distilled back toward the reference (logit distillation over
stored teacher targets, LoRA or full), merged into plain weights that replace the pruned ones."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeprune.config import CalibrationSettings, RecoverySettings
from edgeprune.data import HFDataset, TextSplits
from edgeprune.events import STAGE, event
from edgeprune.models import Reference
from edgeprune.prune import Plan
from edgeprune.recover.stages import RecoveredWeights, TeacherTargets, TrainingText, training_text
from edgeprune.stages import Stage, StageOutput, StageRunner

__all__ = ["RecoveredWeights", "RecoveryJob", "TeacherTargets", "TrainingText", "recover_plan"]

CHECKPOINTS = "recovery-checkpoints"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryJob:
    """What recovering a candidate needs beyond its plan: picklable, for any executor."""
    settings: RecoverySettings
    calibration: CalibrationSettings  # which prompts calibration used (training text takes others)
    train: Path | HFDataset | None = None  # the user's --train text


def recover_plan(reference: Reference, plan: Plan, splits: TextSplits, job: RecoveryJob, runner: StageRunner,
                 threads: int, collect: Callable[[Stage], StageOutput] | None = None) -> StageOutput:
    """The plan's recovered weights (a RecoveredWeights output), each step cached: the training text
    and the teacher's targets are shared by every plan a build recovers. `collect`: read each
    stage's outputs from the cache (made by another process) instead of running it."""
    settings = job.settings
    text_stage = TrainingText(reference, splits, job.calibration, settings, job.train, threads)
    text = collect(text_stage) if collect else training_text(text_stage, runner)
    get = collect or runner.run
    teacher = get(TeacherTargets(reference, text, settings))
    if collect is None:
        event(log, STAGE, "recovery: %s on %d tokens", settings.describe(), text.result["tokens"], name="recovery")
    return get(RecoveredWeights(reference, plan, settings, text, teacher, threads, runner.cache_root / CHECKPOINTS))

"""One candidate's build as a job any executor runs: the plan made into its runtime's quantized
model file (`CandidateModel`, after `SparseWeights` for a sparse state), then its quality
(`CandidateQuality`), both through the stage cache.

The stage cache is where a job's outputs live, whoever runs it: an executor on other machines must
share the cache directory with the build (an NFS mount on every node). A job returns no file, only
where and how long it ran; the build reads the outputs from the cache, so a finished build is
never lost with the worker that made it, and a job run twice (a retried task) finds its outputs
made and returns at once.

Jobs and `ContextSpec` pickle small (a plan, a quant spec, the paths): a worker opens the reference
and the held-out log-probabilities itself, once per process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.config import SparsitySpec
from edgeprune.data import TextSplits
from edgeprune.models import ModelSource, Reference, load_reference
from edgeprune.pipeline import CandidateModel, CandidateQuality, SparseWeights
from edgeprune.prune import Plan
from edgeprune.quantize import QuantSpec
from edgeprune.recover import RecoveryJob, recover_plan
from edgeprune.runtimes.registry import get_runtime
from edgeprune.stages import Stage, StageOutput, StageRunner


@dataclass(frozen=True)
class CandidateJob:
    cid: str
    runtime: str  # whose format and quantization the file gets
    plan: Plan
    quant: QuantSpec
    sparsity: SparsitySpec | None = None  # sparsified after the plan (a sparse state of an opt-in target)
    recovery: RecoveryJob | None = None  # distilled toward the reference after the plan (never with sparsity)


@dataclass(frozen=True)
class Built:
    """What running a job reports: its outputs are in the stage cache."""
    cid: str
    where: str  # the machine (and worker) that ran it
    seconds: float
    made: bool  # False: the cache held its outputs already (a rerun, or a retried task)


@dataclass(frozen=True)
class ContextSpec:
    """What a worker needs to open a build's context: picklable, paths valid on every node."""
    source: ModelSource
    trust_remote_code: bool
    cache_dir: Path
    stage_root: Path
    splits: TextSplits
    ref_logps: Path  # the reference's held-out log-probabilities (.npy, memory-mapped)

    def open(self) -> BuildContext:
        key = (self.source, self.cache_dir, self.stage_root, self.splits.sha256, self.ref_logps)
        if key not in _OPENED:  # a worker process serves many jobs of one build
            reference = load_reference(self.source, self.cache_dir, self.trust_remote_code)
            _OPENED.clear()
            _OPENED[key] = BuildContext(reference, StageRunner(self.stage_root), self.splits,
                                        np.load(self.ref_logps, mmap_mode="r"), self)
        return _OPENED[key]


_OPENED: dict[tuple, BuildContext] = {}


@dataclass
class BuildContext:
    """A build's reference, stage cache, text windows and reference log-probs, as opened in one process."""
    reference: Reference
    runner: StageRunner
    splits: TextSplits
    ref_logps: np.ndarray  # memory-mapped from the stage cache
    spec: ContextSpec

    @classmethod
    def here(cls, reference: Reference, runner: StageRunner, splits: TextSplits, ref_logps: np.ndarray,
             cache_dir: Path, trust_remote_code: bool = False) -> BuildContext:
        """The build's own context; `ref_logps` memory-mapped from its file (a worker maps the same)."""
        spec = ContextSpec(reference.source, trust_remote_code, cache_dir, runner.cache_root, splits,
                           Path(ref_logps.filename))
        return cls(reference, runner, splits, ref_logps, spec)

    def stages(self, job: CandidateJob, threads: int, replaced: StageOutput | None) -> CandidateModel:
        fmt = get_runtime(job.runtime).format
        return CandidateModel(self.reference, job.plan, job.quant, self.splits, threads, replaced, fmt)

    def replaced(self, job: CandidateJob, threads: int,
                 collect: Callable[[Stage], StageOutput] | None = None) -> StageOutput | None:
        """The weights that replace the plain pruned ones (sparse or recovered), or None: made, or
        with `collect`, read from the cache where another process made them."""
        if job.recovery is not None:
            return recover_plan(self.reference, job.plan, self.splits, job.recovery, self.runner, threads, collect)
        if job.sparsity is None:
            return None
        return (collect or self.runner.run)(SparseWeights(self.reference, job.plan, job.sparsity, self.splits))

    def quality_stage(self, stage: CandidateModel, model: StageOutput, threads: int,
                      settings: dict[str, Any] | None = None) -> CandidateQuality:
        return CandidateQuality(stage.file(model), model.key, self.splits, self.ref_logps, threads, stage.format,
                                settings)

    def run(self, job: CandidateJob, threads: int, where: str) -> Built:
        """Build the job's file and measure its quality, each stage unless the cache has it."""
        t0 = time.perf_counter()
        replaced = self.replaced(job, threads)
        stage = self.stages(job, threads, replaced)
        model = self.runner.run(stage)
        quality = self.runner.run(self.quality_stage(stage, model, threads))
        made = not (model.cached and quality.cached and (replaced is None or replaced.cached))
        return Built(job.cid, where, time.perf_counter() - t0, made)


def this_machine() -> str:
    return f"{os.uname().nodename} (pid {os.getpid()})"

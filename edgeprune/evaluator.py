"""What the search works with on a real model: a plan made into a runtime's quantized model file,
its quality against the reference (both as jobs an executor runs: here, or on a Ray cluster), its
benchmark on the device(s), and the estimates the pareto strategy makes before building (a plan's
traffic on paper, its torch proxy KLD)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprune.config import SearchSettings, SparsitySpec
from edgeprune.data import TextSplits
from edgeprune.errors import EdgepruneError
from edgeprune.evaluate import Quality, kl_divergence, reference_log_probs
from edgeprune.executors import BuildContext, Built, CandidateJob, Executor, InProcess
from edgeprune.fleet import Fleet
from edgeprune.journal import BenchmarkJournal
from edgeprune.latency import ModelTraffic
from edgeprune.latency.planned import TrafficPlanner
from edgeprune.measure import BenchmarkRecord, Workload
from edgeprune.models import Reference
from edgeprune.models.streamed import DecoderStream
from edgeprune.pipeline import CandidateModel
from edgeprune.prune import ModelShape, Plan
from edgeprune.quantize import RECIPES, QuantSpec
from edgeprune.recover import RecoveryJob
from edgeprune.runtimes.base import Runner, Runtime
from edgeprune.search import Candidate, State
from edgeprune.stages import Stage, StageOutput, StageRunner

log = logging.getLogger(__name__)

PROXY_WINDOWS = 2  # held-out windows the pareto strategy's torch proxy reads per plan


@dataclass
class CandidateEvaluator:
    """Plan -> a runtime's quantized model file -> quality vs the reference -> benchmark on the device."""

    context: BuildContext  # the reference, the stage cache, the text windows, the reference's log-probs
    fleet: Fleet  # the target's device(s): how each times each runtime's files
    workload: Workload
    settings: SearchSettings
    threads: int
    sparsity: SparsitySpec | None = None  # the target's opt-in; applied to states marked sparse
    evicts: bool = False  # delete released candidates' files: the disk cannot hold them all
    journal: BenchmarkJournal | None = None  # benchmarks taken, replayed by a rerun of a killed build
    executor: Executor = field(default_factory=InProcess)  # where candidates are built
    _planner: tuple[Path, TrafficPlanner] | None = None  # for the baseline file it was read from
    _built: dict[str, tuple[CandidateModel, StageOutput]] = field(default_factory=dict)  # by candidate id
    _held: dict[str, set[str]] = field(default_factory=dict)  # cache key -> ids of candidates using its file

    @property
    def reference(self) -> Reference:
        return self.context.reference

    @property
    def runner(self) -> StageRunner:
        return self.context.runner

    @property
    def splits(self) -> TextSplits:
        return self.context.splits

    @property
    def ref_logps(self) -> np.ndarray:
        return self.context.ref_logps

    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_config(self.reference.config)

    @property
    def timers(self) -> dict[str, Runner]:
        """By runtime name: how the first device still in the fleet times that runtime's files."""
        return self.fleet.primary

    @property
    def parallel(self) -> int:
        """How many candidates can be timed at once: one per device."""
        return self.fleet.size

    def runtime(self, name: str) -> Runtime:
        runtime = self.timers[name].runtime
        if runtime is None:
            raise ValueError("the evaluator times with runners made by runtimes (Runtime.runner)")
        return runtime

    def traffic(self, model: Path) -> ModelTraffic:
        """Per-token costs of a candidate's file, read by the runtime of its format."""
        (runtime,) = (self.runtime(n) for n in self.timers if self.runtime(n).format.suffix == Path(model).suffix)
        return runtime.traffic(model)

    def build(self, state: State, plan: Plan, cid: str) -> Candidate:
        return self.build_all([(state, plan, cid)])[0]

    def build_all(self, requests: list[tuple[State, Plan, str]]) -> list[Candidate]:
        """Build candidates (file, then quality) through the executor, as many at once as it runs;
        in the requests' order."""
        return self._run({cid: (state, plan, self._job(state, plan, cid)) for state, plan, cid in requests})

    def build_recovered(self, twins: list[Candidate], recovery: RecoveryJob) -> list[Candidate]:
        """Recovered copies of built candidates (`<id>r`): the same plan and quantization, the weights
        distilled toward the reference. Same shapes and tensor types, so each is timed as its twin was
        (its benchmark, verdict and prediction copied); only its quality is measured anew."""
        jobs = {f"{c.id}r": (c.state, c.plan, replace(self._job(c.state, c.plan, f"{c.id}r"), recovery=recovery))
                for c in twins}
        copies = self._run(jobs)
        for twin, copy in zip(twins, copies, strict=True):
            copy.bench, copy.verdict, copy.confirmed, copy.prediction = twin.bench, twin.verdict, twin.confirmed, \
                twin.prediction
            copy.predicted_speedup, copy.recovered_from = twin.predicted_speedup, twin.id
        return copies

    def _run(self, jobs: dict[str, tuple[State, Plan, CandidateJob]]) -> list[Candidate]:
        built: dict[str, Candidate] = {}
        remote = not isinstance(self.executor, InProcess)
        t0 = time.perf_counter()
        for report in self.executor.run(self.context, [job for _, _, job in jobs.values()], self.threads):
            built[report.cid] = self._collect(*jobs[report.cid], report, remote)
        if remote:  # the stages' own timings stayed with the workers
            self.runner.timings["remote builds"] = self.runner.timings.get("remote builds", 0.0) + \
                time.perf_counter() - t0
        return [built[cid] for cid in jobs]

    def _job(self, state: State, plan: Plan, cid: str) -> CandidateJob:
        quant = QuantSpec(self.runtime(state.runtime).search_quant(self.settings), state.recipe, self.settings.imatrix)
        return CandidateJob(cid, state.runtime, plan, quant, self.sparsity if state.sparse is not None else None)

    def _collect(self, state: State, plan: Plan, job: CandidateJob, report: Built, remote: bool) -> Candidate:
        """The candidate a finished job made, read from the stage cache."""
        if remote and report.made:
            log.info("%s built by %s in %.0f s", job.cid, report.where, report.seconds)
        ctx = self.context
        replaced = ctx.replaced(job, self.threads, lambda stage: self._found(stage, report))
        stage = ctx.stages(job, self.threads, replaced)
        model = self._found(stage, report)
        self._built[job.cid] = (stage, model)
        self._held.setdefault(model.key, set()).add(job.cid)
        quality = self._found(ctx.quality_stage(stage, model, self.threads), report)
        return Candidate(
            id=job.cid,
            state=state,
            plan=plan,
            model=stage.file(model),
            size_bytes=model.result["size_bytes"],
            parameters=model.result["parameters"],
            quality=Quality(**quality.result),
            built_on=report.where if remote else None,
            recovery=replaced.result["recovery"] if job.recovery is not None else None,
        )

    def _found(self, stage: Stage, report: Built) -> StageOutput:
        out = self.runner.cached(stage)
        if out is None:
            raise EdgepruneError(
                f"{report.cid} was built by {report.where}, but its {stage.name} outputs are not in "
                f"{self.runner.cache_root} as this machine sees it: the build and every node of the cluster must "
                "share the cache directory (--cache-dir on a shared mount) and run the same edgeprune and tools.")
        return out

    def quality_with(self, candidate: Candidate, settings: dict[str, Any]) -> Quality:
        """The candidate's quality when run with runtime `settings` that change its logits."""
        stage, model = self._built[candidate.id]
        return Quality(**self.runner.run(self.context.quality_stage(stage, model, self.threads, settings)).result)

    def benchmark(self, candidate: Candidate, baseline: Candidate | None) -> BenchmarkRecord:
        return self.benchmark_all([candidate], baseline)[0]

    def planned_traffic(self, baseline: Candidate, state: State, plan: Plan) -> ModelTraffic:
        """A state's per-token costs on paper, from the baseline's GGUF (latency/planned.py)."""
        if Path(baseline.model).suffix != ".gguf":
            raise NotImplementedError("plans are costed from a GGUF baseline")
        if self._planner is None or self._planner[0] != baseline.model:
            quant = self.runtime(baseline.state.runtime).search_quant(self.settings)
            self._planner = (baseline.model, TrafficPlanner(baseline.model, self.shape, quant))
        return self._planner[1].traffic(plan, RECIPES[state.recipe], state.describe(), runtime=state.runtime)

    def proxy_kld(self, plan: Plan) -> float:
        """The plan's unquantized KLD to the reference on the first PROXY_WINDOWS held-out windows, in torch."""
        windows = self.splits.heldout[:PROXY_WINDOWS]
        logps = reference_log_probs(DecoderStream(self.reference.weights, plan), windows, label="proxy KLD")
        ref = torch.from_numpy(np.array(self.ref_logps[: len(windows)]))  # a copy: the cache is read-only
        vocab = ref.shape[-1]
        return float(kl_divergence(ref.reshape(-1, vocab), torch.from_numpy(logps).reshape(-1, vocab)).mean())

    def benchmark_all(self, candidates: list[Candidate], baseline: Candidate | None) -> list[BenchmarkRecord]:
        """Each candidate timed on one device of the fleet, alongside `baseline` on that device (or
        replayed from the journal of a killed run of this build)."""
        def time_one(timers: dict[str, Runner], candidate: Candidate) -> BenchmarkRecord:
            return timers[candidate.state.runtime].benchmark(candidate.model, self.workload,
                                                             baseline.model if baseline else None)

        def key(candidate: Candidate) -> str:
            pair = self._built[baseline.id][1].key if baseline is not None else None
            return f"{candidate.state.runtime} {self._built[candidate.id][1].key} {pair}"

        records: dict[str, BenchmarkRecord] = {}
        for candidate in candidates:
            replayed = self.journal.replay(key(candidate)) if self.journal is not None else None
            if replayed is not None:
                log.info("%s: timing replayed from the journal of a killed run of this build", candidate.id)
                records[candidate.id] = replayed
        todo = [c for c in candidates if c.id not in records]
        t0 = time.perf_counter()
        for candidate, record in zip(todo, self.fleet.map(time_one, todo) if todo else [], strict=True):
            records[candidate.id] = record
            if self.journal is not None:
                self.journal.record(key(candidate), record)
        self.runner.timings["benchmark"] = self.runner.timings.get("benchmark", 0.0) + time.perf_counter() - t0
        return [records[c.id] for c in candidates]

    def release(self, candidate: Candidate) -> None:
        _, model = self._built[candidate.id]
        holders = self._held[model.key]
        holders.discard(candidate.id)
        if self.evicts and not holders:  # two steps can make the same file (the same plan and recipe)
            self.runner.discard(model)
            log.info("%s: model file removed from the cache (rebuilt if needed again)", candidate.id)

    def restore(self, candidate: Candidate) -> None:
        stage, model = self._built[candidate.id]
        self.runner.run(stage)  # rebuilt if removed; the same key, so the same path
        self._held[model.key].add(candidate.id)

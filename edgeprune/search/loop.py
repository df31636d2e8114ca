"""The search loop every strategy shares, and what it works with: candidates, the evaluator that
builds and times them, the outcome.

Every candidate is timed alternating with the unpruned baseline, so speed-ups are ratios of runs
taken side by side; before a candidate is selected, its verdict is confirmed by a second such
measurement, pooled with the first: one noisy run never decides. With a predictor
(search/predict.py), a built candidate whose predicted latency misses the budget by more than the
errors measured on its kinds of step is not timed.

A candidate's model file is released once judged, unless it is the baseline (timed beside every
candidate) or the best within budget (confirmed, then shipped). An evaluator short of disk (`evicts`)
deletes released files and restores one if it is needed again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgeprune.config import SLO
from edgeprune.evaluate import Quality
from edgeprune.events import CANDIDATE, SEARCH, event
from edgeprune.latency import ModelTraffic, Prediction
from edgeprune.measure import BenchmarkRecord
from edgeprune.prune import Plan
from edgeprune.search.budget import MEETS, Budget
from edgeprune.search.predict import SearchPredictor
from edgeprune.search.space import SearchSpace, State

log = logging.getLogger(__name__)

NOT_MEASURED = "predicted out of budget, not timed"


@dataclass
class Candidate:
    id: str
    state: State
    plan: Plan
    model: Any  # path of the quantized GGUF
    size_bytes: int
    parameters: int
    quality: Quality
    bench: BenchmarkRecord | None = None  # None: not timed (predicted out of budget)
    verdict: str = ""
    confirmed: bool = False
    prediction: Prediction | None = None  # on the device, before timing (with a calibrated predictor)
    predicted_speedup: float | None = None  # over the baseline, from the same prediction
    predicted_kld: float | None = None  # before it was built (the pareto strategy's quality model)
    built_on: str | None = None  # the machine that built it, when not the build's own (a Ray cluster's node)
    recovered_from: str | None = None  # the candidate it is a recovered copy of (same structure, timed as it)
    recovery: dict[str, Any] | None = None  # how it was recovered: the training record

    @property
    def meets(self) -> bool:
        return self.verdict == MEETS

    @property
    def measured(self) -> bool:
        return self.bench is not None


class Evaluator(Protocol):
    evicts: bool  # deletes released model files (and so wants each candidate timed as soon as built)
    parallel: int  # candidates it can time at once (the devices of a fleet)

    def build_all(self, requests: list[tuple[State, Plan, str]]) -> list[Candidate]:
        """Build candidates (state, plan, id) and measure their quality (not their speed), as many at
        once as the executor runs; in the requests' order."""

    def benchmark(self, candidate: Candidate, baseline: Candidate | None) -> BenchmarkRecord:
        """Time a built candidate (alongside `baseline`, if given)."""

    def benchmark_all(self, candidates: list[Candidate], baseline: Candidate | None) -> list[BenchmarkRecord]:
        """Time candidates, as many at once as `parallel`, each alongside `baseline` on its device."""

    def release(self, candidate: Candidate) -> None:
        """The search no longer needs the candidate's model file (its figures stay)."""

    def restore(self, candidate: Candidate) -> None:
        """The search needs a released candidate's model file again."""

    def planned_traffic(self, baseline: Candidate, state: State, plan: Plan) -> ModelTraffic:
        """A state's per-token costs before it is built, from the baseline's file and the plan."""

    def proxy_kld(self, plan: Plan) -> float:
        """A cheap quality estimate of a plan: its unquantized KLD to the reference on a small slice."""


@dataclass
class SearchOutcome:
    candidates: list[Candidate]
    budget: Budget
    selected: Candidate | None  # best quality within budget, confirmed
    closest: Candidate  # nearest to meeting the budget, for the failure message
    stop_reason: str
    skipped: list[dict[str, str]]  # states never built: predicted out of budget from their neighbours
    strategy: str = "greedy"
    reachable: float | None = None  # without a pick: the best speed-up predicted within the search limits
    details: dict[str, Any] = field(default_factory=dict)  # what the strategy's models ended with

    @property
    def limits_to_raise(self) -> str | None:
        """The profile's `[search]` settings that ended a search without a pick (None: it was not a limit)."""
        return LIMITS.get(self.stop_reason)


# Why a search ends without a pick, and the `[search]` settings that would let it go further.
CANDIDATE_LIMIT = "candidate limit reached"
DEPTH_LIMIT = "candidate limit reached, and the depth path past it reached the depth limit"
SPACE_LIMIT = "search limits reached (max layers / heads removed)"
NOTHING_PREDICTED = "nothing left within the search limits is predicted to meet the budget"
TIMED_LIMIT = "device benchmark limit reached"
LIMITS = {
    CANDIDATE_LIMIT: "max_candidates",
    DEPTH_LIMIT: "max_layer_fraction (the depth limit), or max_candidates",
    SPACE_LIMIT: "max_layer_fraction, max_head_fraction, max_ffn_fraction or max_attention_fraction",
    NOTHING_PREDICTED: "max_layer_fraction, max_head_fraction, max_ffn_fraction or max_attention_fraction",
    TIMED_LIMIT: "max_timed",
}


class SearchLoop:
    """What every strategy shares: the baseline timed first, candidates built and timed (or judged
    from their prediction) with progress events, files released once judged, a pick confirmed by a
    second measurement. A strategy subclasses it with a `name` (its registration) and a `run`."""

    name: str

    def __init_subclass__(cls, name: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name
        STRATEGIES[name] = cls

    def __init__(self, space: SearchSpace, evaluate: Evaluator, slo: SLO, max_candidates: int,
                 predictor: SearchPredictor | None) -> None:
        self.space, self.evaluate, self.max_candidates = space, evaluate, max_candidates
        self.max_timed = space.settings.max_timed
        self.predictor = predictor
        self.seen: dict[State, Candidate] = {}
        self.released: set[str] = set()
        self.skipped: list[dict[str, str]] = []
        self.budget = Budget.from_slo(slo)
        self.started = time.perf_counter()
        self.baseline: Candidate | None = None  # timed alone, then beside every other candidate
        baseline = self.build(space.baseline())
        self.time(baseline)
        self.baseline = baseline

    def build(self, state: State) -> Candidate:
        return self.build_all([state])[0]

    def build_all(self, states: list[State]) -> list[Candidate]:
        """The candidates of `states`, building those not built yet (all at once where the evaluator's
        executor can)."""
        requests = []
        for state in dict.fromkeys(s for s in states if s not in self.seen):
            cid = f"c{len(self.seen) + len(requests):02d}"
            event(log, CANDIDATE, "%s %s: building, then its quality", cid, state.describe(), id=cid,
                  step=state.describe(), phase="building")
            requests.append((state, self.space.plan(state), cid))
        if requests:
            for (state, _, _), cand in zip(requests, self.evaluate.build_all(requests), strict=True):
                self.seen[state] = cand
        return [self.seen[s] for s in states]

    def time(self, cand: Candidate) -> None:
        """Time a built candidate alongside the baseline, unless its prediction clearly misses."""
        if not self.skipped_by_prediction(cand):
            self.judge(cand, self.evaluate.benchmark(cand, self.baseline))

    def time_all(self, cands: list[Candidate]) -> None:
        """Time candidates in order; on a fleet, as many at once as it has devices, the predictions
        (and what the latency model learns) brought up to date between batches."""
        width = max(1, self.evaluate.parallel)
        queue = list(cands)
        while queue:
            batch = []
            while queue and len(batch) < width:
                cand = queue.pop(0)
                if not self.skipped_by_prediction(cand):
                    batch.append(cand)
            if batch:
                for cand, bench in zip(batch, self.evaluate.benchmark_all(batch, self.baseline), strict=True):
                    self.judge(cand, bench)

    def skipped_by_prediction(self, cand: Candidate) -> bool:
        """Predict the candidate's speed; judge it without timing if the prediction clearly misses
        (or if it was judged already)."""
        if cand.verdict:
            return True
        # Sparse candidates are always timed: the roofline models dense kernels, and a target that
        # opts in to sparsity says its runtime is not one.
        p = self.predictor
        if p is None or self.baseline is None or cand.state.sparse is not None:
            return False
        traffic, baseline = p.traffic_of(cand.model), p.traffic_of(self.baseline.model)
        cand.prediction, cand.predicted_speedup = p.predict(traffic), p.speedup(traffic, baseline)
        reason = p.skip_reason(cand.prediction, self.budget, baseline, self.space.kinds(cand.state))
        if not reason:
            return False
        cand.verdict = f"{NOT_MEASURED} ({reason})"
        event(log, CANDIDATE, "%s %-26s KLD %.3f  not timed: %s", cand.id, cand.state.describe(),
              cand.quality.mean_kld, reason, **self._fields(cand, "skipped"))
        self.progress()
        return True

    def judge(self, cand: Candidate, bench: BenchmarkRecord) -> None:
        """A timed candidate's verdict; the latency model learns from it."""
        cand.bench = bench
        cand.verdict = self.budget.verdict(bench)
        p = self.predictor
        if p is not None:
            if cand.predicted_speedup is not None and bench.baseline_runs:
                p.learn_error(self.space.kinds(cand.state), cand.predicted_speedup, bench.speedup)
            p.observe(cand.model, bench)
        event(log, CANDIDATE, "%s %-26s p50 %.3f s  p90 %.3f s  %.2fx  KLD %.3f  %s", cand.id,
              cand.state.describe(), bench.latency_p50, bench.latency_p90, bench.speedup,
              cand.quality.mean_kld, cand.verdict, **self._fields(cand, "timed"), device=bench.device)
        self.progress()

    @staticmethod
    def _fields(cand: Candidate, phase: str) -> dict[str, Any]:
        return {"id": cand.id, "step": cand.state.describe(), "phase": phase, "verdict": cand.verdict,
                "kld": cand.quality.mean_kld, "speedup": cand.bench.speedup if cand.measured else None,
                "latency_p90_s": cand.bench.latency_p90 if cand.measured else None,
                "predicted_speedup": cand.predicted_speedup}

    def progress(self) -> None:
        """Where the search stands: candidates built and timed, the best so far, and how long the
        rest can take at most (the mean time per candidate so far, times what the limit leaves)."""
        built = len(self.seen)
        timed = sum(c.measured for c in self.seen.values())
        elapsed = time.perf_counter() - self.started
        left = self.left()
        eta = elapsed / built * left
        best = self.best_within()
        timed_ones = [c for c in self.seen.values() if c.measured and c is not self.baseline]
        closest = min(timed_ones, key=lambda c: self.budget.shortfall(c.bench)) if timed_ones else None
        where = (f"best within budget {best.id} (KLD {best.quality.mean_kld:.3f}, {best.bench.speedup:.2f}x)" if best
                 else f"none within budget yet (closest {closest.id}, {closest.bench.speedup:.2f}x)" if closest
                 else "none within budget yet")
        event(log, SEARCH, "search: %d built (limit %d%s), %d timed; %s; %.1f min so far, at most ~%.0f min more",
              built, self.max_candidates, self.phase_note(), timed, where, elapsed / 60, eta / 60, built=built,
              limit=self.max_candidates, timed=timed, best=best.id if best else None,
              closest=closest.id if closest else None, elapsed_s=round(elapsed, 1), eta_s=round(eta, 1),
              strategy=self.name, **self.phase_fields())

    def release_unneeded(self) -> None:
        """Release every judged candidate's file but the baseline's and the best's."""
        keep = (self.baseline, self.best_within())
        for cand in self.seen.values():
            if not cand.verdict or cand.id in self.released or any(cand is k for k in keep):
                continue
            if self.predictor is not None:
                self.predictor.traffic_of(cand.model)  # read (and memoised) while the file is there
            self.evaluate.release(cand)
            self.released.add(cand.id)

    def measure(self, state: State) -> Candidate:
        cand = self.build(state)
        self.time(cand)
        self.release_unneeded()
        return cand

    def best_within(self) -> Candidate | None:
        within = [c for c in self.seen.values() if c.meets]
        return min(within, key=lambda c: (c.quality.mean_kld, c.bench.latency_p90)) if within else None

    def confirm(self, cand: Candidate) -> None:
        """Measure the candidate (alongside the baseline) once more, pool both runs, judge again."""
        if cand.id in self.released:  # it was the best before another, which its confirmation then failed
            self.evaluate.restore(cand)
            self.released.discard(cand.id)
        pair = None if cand is self.baseline else self.baseline
        cand.bench = cand.bench.pooled(self.evaluate.benchmark(cand, pair))
        cand.confirmed = True
        cand.verdict = self.budget.verdict(cand.bench)
        log.info("confirming %s: p90 %.3f s, %.2fx: %s", cand.id, cand.bench.latency_p90, cand.bench.speedup,
                 cand.verdict)
        self.release_unneeded()

    # -- hooks a strategy may override ---------------------------------------------------------
    def left(self) -> int:
        """Candidates the search may still build (for the ETA)."""
        return max(self.max_candidates - len(self.seen), 0)

    def phase_note(self) -> str:
        return ""

    def phase_fields(self) -> dict[str, Any]:
        return {}

    def run(self) -> SearchOutcome:
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        return {}

    def predicted_speedup(self, state: State, traffic: ModelTraffic) -> float:
        """The latency model's speed-up for a state, times the under-prediction measured on its kinds."""
        p = self.predictor
        speedup = p.speedup(traffic, p.traffic_of(self.baseline.model))
        for kind in self.space.kinds(state):
            speedup *= p.under_prediction.get(kind, 1.0)
        return speedup

    def outcome(self, stop: str) -> SearchOutcome:
        """The search's result; without a pick, with the best speed-up predicted within its limits."""
        timed = [c for c in self.seen.values() if c.measured]
        closest = min(timed, key=lambda c: (self.budget.shortfall(c.bench), c.quality.mean_kld))
        selected = self.best_within()
        reachable = None if selected is not None else self.reachable()
        return SearchOutcome(list(self.seen.values()), self.budget, selected, closest, stop, self.skipped,
                             self.name, reachable, self.details())

    def reachable(self) -> float | None:
        """The best speed-up over the unpruned model the latency model predicts for any plan within
        the search limits (the most-pruned state of each runtime and recipe), or None without a
        calibrated predictor or an evaluator that can estimate a plan's traffic."""
        p = self.predictor
        if p is None or self.baseline is None or not p.observations:
            return None
        try:
            return max(self.predicted_speedup(s, self.evaluate.planned_traffic(self.baseline, s, self.space.plan(s)))
                       for s in self.space.corners())
        except NotImplementedError:
            return None


STRATEGIES: dict[str, type[SearchLoop]] = {}


def run_search(strategy: str, space: SearchSpace, evaluate: Evaluator, slo: SLO, max_candidates: int,
               predictor: SearchPredictor | None = None) -> SearchOutcome:
    """Search with the named strategy (a registered SearchLoop subclass)."""
    return STRATEGIES[strategy](space, evaluate, slo, max_candidates, predictor).run()


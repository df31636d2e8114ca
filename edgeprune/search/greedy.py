"""Greedy search, as the case study does it by hand, but choosing each step by measurement.

Start from the unpruned model. While nothing meets the budget, build and measure the neighbours
of the current candidate (a few more layers removed; the next smaller head structure; the next
narrower FFN; the next per-tensor quantization recipe; the target's sparse method, if it opts in)
and move to the one that loses the least quality (measured KLD) per byte of weights removed; each
round also realises the current structure in every other allowed runtime (its own format and
quantization), so the structures on the path are measured in each. Bytes, not the
measured speed-up, rank the steps: CPU decoding reads every weight once per token, so bytes track
speed without the 10-20% noise of a shared machine, which would otherwise pick steps at random
when two of them save about as much. When a round lands within budget, also try the depths a
depth step skipped, and follow the most efficient step one layer at a time while its quality is
still better than the best candidate within budget (a bound: going deeper only loses quality).
When the candidate limit is reached with nothing within budget, the path's last candidate loses
more layers: the deepest the limits allow first, then, if that meets the budget, a bisection for
the shallowest depth that does. The limit counts the exploring; a budget that depth can meet is met.
Every candidate is timed alternating with the unpruned baseline,
so speed-ups are ratios of runs taken side by side; before a candidate is selected, its verdict is
confirmed by a second such measurement, pooled with the first: one noisy run never decides.

With a predictor (search/predict.py), a built candidate whose predicted latency misses the budget
by more than the errors measured on its kinds of step is not timed, the candidates of a round are
timed fastest-predicted first, and the depths a refinement would try are predicted from their
neighbours before anything is built.

A candidate's model file is released once judged, unless it is the baseline (timed beside every
candidate) or the best within budget (confirmed, then shipped). An evaluator short of disk (`evicts`)
deletes released files, restores one if it is needed again, and gets each candidate timed as soon
as it is built, so that it holds three files at once (baseline, best, the one being measured), not
a whole round's.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

from edgeprune.config import SLO
from edgeprune.evaluate import Quality
from edgeprune.events import CANDIDATE, SEARCH, event
from edgeprune.latency import Prediction
from edgeprune.measure import BenchmarkRecord
from edgeprune.prune import Plan
from edgeprune.search.budget import MEETS, Budget
from edgeprune.search.predict import SearchPredictor, interpolated
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

    @property
    def meets(self) -> bool:
        return self.verdict == MEETS

    @property
    def measured(self) -> bool:
        return self.bench is not None


class Evaluator(Protocol):
    evicts: bool  # deletes released model files (and so wants each candidate timed as soon as built)
    parallel: int  # candidates it can time at once (the devices of a fleet)

    def build(self, state: State, plan: Plan, cid: str) -> Candidate:
        """Build a candidate and measure its quality (not its speed)."""

    def benchmark(self, candidate: Candidate, baseline: Candidate | None) -> BenchmarkRecord:
        """Time a built candidate (alongside `baseline`, if given)."""

    def benchmark_all(self, candidates: list[Candidate], baseline: Candidate | None) -> list[BenchmarkRecord]:
        """Time candidates, as many at once as `parallel`, each alongside `baseline` on its device."""

    def release(self, candidate: Candidate) -> None:
        """The search no longer needs the candidate's model file (its figures stay)."""

    def restore(self, candidate: Candidate) -> None:
        """The search needs a released candidate's model file again."""


@dataclass
class SearchOutcome:
    candidates: list[Candidate]
    budget: Budget
    selected: Candidate | None  # best quality within budget, confirmed
    closest: Candidate  # nearest to meeting the budget, for the failure message
    stop_reason: str
    skipped: list[dict[str, str]]  # states never built: predicted out of budget from their neighbours

    @property
    def limits_to_raise(self) -> str | None:
        """The profile's `[search]` settings that ended a search without a pick (None: it was not a limit)."""
        return LIMITS.get(self.stop_reason)


# Why a search ends without a pick, and the `[search]` settings that would let it go further.
CANDIDATE_LIMIT = "candidate limit reached"
DEPTH_LIMIT = "candidate limit reached, and the depth path past it reached the depth limit"
SPACE_LIMIT = "search limits reached (max layers / heads removed)"
LIMITS = {
    CANDIDATE_LIMIT: "max_candidates",
    DEPTH_LIMIT: "max_layer_fraction (the depth limit), or max_candidates",
    SPACE_LIMIT: "max_layer_fraction, max_head_fraction, max_ffn_fraction or max_attention_fraction",
}


def _efficiency(base: Candidate, step: Candidate) -> float:
    """Quality lost per byte removed (lower is better); steps that remove nothing rank last."""
    saved = base.size_bytes - step.size_bytes
    lost = max(step.quality.mean_kld - base.quality.mean_kld, 0.0)
    return lost / saved if saved > 0 else float("inf")


class _Search:
    def __init__(self, space: SearchSpace, evaluate: Evaluator, slo: SLO, max_candidates: int,
                 predictor: SearchPredictor | None) -> None:
        self.space, self.evaluate, self.max_candidates = space, evaluate, max_candidates
        self.predictor = predictor
        self.seen: dict[State, Candidate] = {}
        self.released: set[str] = set()
        self.skipped: list[dict[str, str]] = []
        self.budget = Budget.from_slo(slo)
        self.started = time.perf_counter()
        self.followed = False  # the depth path past the candidate limit
        self.baseline: Candidate | None = None  # timed alone, then beside every other candidate
        baseline = self.build(space.baseline())
        self.time(baseline)
        self.baseline = baseline

    def build(self, state: State) -> Candidate:
        if state not in self.seen:
            cid = f"c{len(self.seen):02d}"
            event(log, CANDIDATE, "%s %s: building, then its quality", cid, state.describe(), id=cid,
                  step=state.describe(), phase="building")
            self.seen[state] = self.evaluate.build(state, self.space.plan(state), cid)
        return self.seen[state]

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
        if self.followed:  # past the limit, only the depth path: a bisection of its depths
            left = max(1, math.ceil(math.log2(max(self.space.max_layers, 2))))
        else:
            left = max(self.max_candidates - built, 0)
        eta = elapsed / built * left
        best = self.best_within()
        timed_ones = [c for c in self.seen.values() if c.measured and c is not self.baseline]
        closest = min(timed_ones, key=lambda c: self.budget.shortfall(c.bench)) if timed_ones else None
        where = (f"best within budget {best.id} (KLD {best.quality.mean_kld:.3f}, {best.bench.speedup:.2f}x)" if best
                 else f"none within budget yet (closest {closest.id}, {closest.bench.speedup:.2f}x)" if closest
                 else "none within budget yet")
        event(log, SEARCH, "search: %d built (limit %d%s), %d timed; %s; %.1f min so far, at most ~%.0f min more",
              built, self.max_candidates, ", passed: following the depth path" if self.followed else "", timed,
              where, elapsed / 60, eta / 60, built=built, limit=self.max_candidates, timed=timed,
              best=best.id if best else None, closest=closest.id if closest else None, elapsed_s=round(elapsed, 1),
              eta_s=round(eta, 1), depth_path=self.followed)

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

    def measure_round(self, states: list[State]) -> list[Candidate]:
        """Build every state, then time them fastest-predicted first (built order without a predictor,
        or for an evaluator that keeps few files: each timed as soon as it is built)."""
        if self.evaluate.evicts:
            return [self.measure(s) for s in states]
        cands = [self.build(s) for s in states]
        order = cands
        if self.predictor is not None and len(self.predictor.observations) > 0:
            order = sorted(cands, key=lambda c: self.predictor.predict(self.predictor.traffic_of(c.model)).latency_s)
        self.time_all(order)
        self.release_unneeded()
        return cands

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

    def refine_depth(self, base: Candidate, measured: list[Candidate], limited: bool = True) -> None:
        """A depth step of several layers may overshoot: try the skipped depths, shallowest first."""
        for cand in measured:
            if not cand.meets or cand.state.layers_dropped - base.state.layers_dropped <= 1:
                continue
            for n in range(base.state.layers_dropped + 1, cand.state.layers_dropped):
                if limited and len(self.seen) >= self.max_candidates:
                    return
                state = replace(cand.state, layers_dropped=n)
                reason = self.predicted_out(state, base, cand)
                if reason:
                    self.skipped.append({"step": state.describe(), "reason": reason})
                    log.info("%-26s not built: %s", state.describe(), reason)
                    continue
                if self.measure(state).meets:
                    break

    def predicted_out(self, state: State, shallow: Candidate, deep: Candidate) -> str | None:
        """Why a depth between two built candidates (differing only in depth) would miss the budget."""
        if self.predictor is None or state in self.seen:
            return None
        p, (a, b) = self.predictor, (shallow.state.layers_dropped, deep.state.layers_dropped)
        traffic = interpolated(p.traffic_of(shallow.model), p.traffic_of(deep.model),
                               (state.layers_dropped - a) / (b - a), state.describe())
        return p.skip_reason(p.predict(traffic), self.budget, p.traffic_of(self.baseline.model),
                             self.space.kinds(state))

    def follow_efficient_path(self, cand: Candidate) -> None:
        """Remove one more layer at a time from `cand` while it could still beat the best."""
        while not cand.meets and len(self.seen) < self.max_candidates:
            best = self.best_within()
            nxt = self.space.deeper(cand.state, step=1)
            if best is None or nxt is None or nxt in self.seen or cand.quality.mean_kld >= best.quality.mean_kld:
                return
            cand = self.measure(nxt)

    def follow_depth(self, cand: Candidate) -> None:
        """At the candidate limit with nothing within budget: the path's last candidate goes on
        losing layers (the budget or the depth limit ends a path, not the count). The deepest the
        limits allow is tried first, and if it meets the budget, the depths between are bisected for
        the shallowest that meets (speed grows with depth removed); those predicted to miss are not built."""
        deepest = self.space.deeper(cand.state, step=self.space.max_layers)
        if deepest is None:
            return
        shallow, deep = cand, self.measure(deepest)
        missing = shallow.state.layers_dropped  # the deepest depth known (measured or predicted) to miss
        while deep.meets and deep.state.layers_dropped - missing > 1:
            state = replace(cand.state, layers_dropped=(missing + deep.state.layers_dropped) // 2)
            reason = self.predicted_out(state, shallow, deep)
            if reason:
                self.skipped.append({"step": state.describe(), "reason": reason})
                log.info("%-26s not built: %s", state.describe(), reason)
                missing = state.layers_dropped
                continue
            mid = self.measure(state)
            if mid.meets:
                deep = mid
            else:
                shallow, missing = mid, state.layers_dropped

    def run(self) -> SearchOutcome:
        current = self.baseline
        while True:
            best = self.best_within()
            if best is not None and not best.confirmed:
                self.confirm(best)
                continue
            if best is not None:
                unpruned = best is self.baseline
                stop = ("the unpruned model meets the budget" if unpruned
                        else "found a candidate within budget on the depth path past the candidate limit"
                        if self.followed
                        else "found a candidate within budget")
                break
            space, state = self.space, current.state
            # Sparse first: a target that opts in wants it measured, and it never wins on bytes saved.
            steps = [space.sparsified(state), space.deeper(state), space.without_attention(state),
                     *space.narrower(state), space.thinner(state), space.requantized(state),
                     *space.in_other_runtimes(state)]
            steps = [s for s in steps if s]
            steps = [s for s in steps if s not in self.seen][: max(0, self.max_candidates - len(self.seen))]
            full = len(self.seen) >= self.max_candidates
            if not steps and full and not self.followed:
                self.followed = True
                self.follow_depth(current)
                continue
            if not steps:
                stop = DEPTH_LIMIT if self.followed else CANDIDATE_LIMIT if full else SPACE_LIMIT
                break
            measured = self.measure_round(steps)
            base = current
            current = min(measured, key=lambda c: (_efficiency(base, c), -(c.bench.speedup if c.measured else 0.0)))
            if any(c.meets for c in measured):
                self.refine_depth(base, measured)
                self.follow_efficient_path(current)

        timed = [c for c in self.seen.values() if c.measured]
        closest = min(timed, key=lambda c: (self.budget.shortfall(c.bench), c.quality.mean_kld))
        return SearchOutcome(list(self.seen.values()), self.budget, self.best_within(), closest, stop, self.skipped)


def greedy_search(space: SearchSpace, evaluate: Evaluator, slo: SLO, max_candidates: int,
                  predictor: SearchPredictor | None = None) -> SearchOutcome:
    return _Search(space, evaluate, slo, max_candidates, predictor).run()

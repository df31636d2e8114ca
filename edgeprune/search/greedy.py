"""Greedy search, as the case study does it by hand, but choosing each step by measurement.

Start from the unpruned model. While nothing meets the budget, build and measure the neighbours
of the current candidate (a few more layers removed; the next smaller head structure; the next
narrower FFN; the next per-tensor quantization recipe; the target's sparse method, if it opts in)
and move to the one that loses the least quality (measured KLD) per byte of weights removed. Bytes, not the
measured speed-up, rank the steps: CPU decoding reads every weight once per token, so bytes track
speed without the 10-20% noise of a shared machine, which would otherwise pick steps at random
when two of them save about as much. When a round lands within budget, also try the depths a
depth step skipped, and follow the most efficient step one layer at a time while its quality is
still better than the best candidate within budget (a bound: going deeper only loses quality).
Every candidate is timed alternating with the unpruned baseline,
so speed-ups are ratios of runs taken side by side; before a candidate is selected, its verdict is
confirmed by a second such measurement, pooled with the first: one noisy run never decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Protocol

from edgeprune.config import SLO
from edgeprune.evaluate import Quality
from edgeprune.measure import BenchmarkRecord
from edgeprune.prune import Plan
from edgeprune.search.budget import MEETS, Budget
from edgeprune.search.space import SearchSpace, State

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    id: str
    state: State
    plan: Plan
    model: Any  # path of the quantized GGUF
    size_bytes: int
    parameters: int
    bench: BenchmarkRecord
    quality: Quality
    verdict: str = ""
    confirmed: bool = False

    @property
    def meets(self) -> bool:
        return self.verdict == MEETS


class Evaluator(Protocol):
    def __call__(self, state: State, plan: Plan, cid: str, baseline: Candidate | None) -> Candidate:
        """Build and measure a candidate (timed alongside `baseline`, if given)."""

    def remeasure(self, candidate: Candidate, baseline: Candidate | None) -> BenchmarkRecord:
        """Time an already built candidate again."""


@dataclass
class SearchOutcome:
    candidates: list[Candidate]
    budget: Budget
    selected: Candidate | None  # best quality within budget, confirmed
    closest: Candidate  # nearest to meeting the budget, for the failure message
    stop_reason: str


def _efficiency(base: Candidate, step: Candidate) -> float:
    """Quality lost per byte removed (lower is better); steps that remove nothing rank last."""
    saved = base.size_bytes - step.size_bytes
    lost = max(step.quality.mean_kld - base.quality.mean_kld, 0.0)
    return lost / saved if saved > 0 else float("inf")


class _Search:
    def __init__(self, space: SearchSpace, evaluate: Evaluator, slo: SLO, max_candidates: int) -> None:
        self.space, self.evaluate, self.max_candidates = space, evaluate, max_candidates
        self.seen: dict[State, Candidate] = {}
        self.budget = Budget.from_slo(slo)
        self.baseline: Candidate | None = None
        self.baseline = self.measure(State(0))

    def measure(self, state: State) -> Candidate:
        if state not in self.seen:
            cand = self.evaluate(state, self.space.plan(state), f"c{len(self.seen):02d}", self.baseline)
            self.seen[state] = cand
            cand.verdict = self.budget.verdict(cand.bench)
            log.info("%s %-26s p50 %.3f s  p90 %.3f s  %.2fx  KLD %.3f  %s", cand.id, state.describe(),
                     cand.bench.latency_p50, cand.bench.latency_p90, cand.bench.speedup, cand.quality.mean_kld,
                     cand.verdict)
        return self.seen[state]

    def best_within(self) -> Candidate | None:
        within = [c for c in self.seen.values() if c.meets]
        return min(within, key=lambda c: (c.quality.mean_kld, c.bench.latency_p90)) if within else None

    def confirm(self, cand: Candidate) -> None:
        """Measure the candidate (alongside the baseline) once more, pool both runs, judge again."""
        pair = None if cand is self.baseline else self.baseline
        cand.bench = cand.bench.pooled(self.evaluate.remeasure(cand, pair))
        cand.confirmed = True
        cand.verdict = self.budget.verdict(cand.bench)
        log.info("confirming %s: p90 %.3f s, %.2fx: %s", cand.id, cand.bench.latency_p90, cand.bench.speedup,
                 cand.verdict)

    def refine_depth(self, base: Candidate, measured: list[Candidate]) -> None:
        """A depth step of several layers may overshoot: try the skipped depths, shallowest first."""
        for cand in measured:
            if not cand.meets or cand.state.layers_dropped - base.state.layers_dropped <= 1:
                continue
            for n in range(base.state.layers_dropped + 1, cand.state.layers_dropped):
                if len(self.seen) >= self.max_candidates:
                    return
                if self.measure(replace(cand.state, layers_dropped=n)).meets:
                    break

    def follow_efficient_path(self, cand: Candidate) -> None:
        """Remove one more layer at a time from `cand` while it could still beat the best."""
        while not cand.meets and len(self.seen) < self.max_candidates:
            best = self.best_within()
            nxt = self.space.deeper(cand.state, step=1)
            if best is None or nxt is None or nxt in self.seen or cand.quality.mean_kld >= best.quality.mean_kld:
                return
            cand = self.measure(nxt)

    def run(self) -> SearchOutcome:
        current = self.baseline
        while True:
            best = self.best_within()
            if best is not None and not best.confirmed:
                self.confirm(best)
                continue
            if best is not None:
                unpruned = best is self.baseline
                stop = "the unpruned model meets the budget" if unpruned else "found a candidate within budget"
                break
            space, state = self.space, current.state
            # Sparse first: a target that opts in wants it measured, and it never wins on bytes saved.
            steps = [space.sparsified(state), space.deeper(state), *space.narrower(state), space.thinner(state),
                     space.requantized(state)]
            steps = [s for s in steps if s]
            steps = [s for s in steps if s not in self.seen][: max(0, self.max_candidates - len(self.seen))]
            if not steps:
                full = len(self.seen) >= self.max_candidates
                stop = "candidate limit reached" if full else "search limits reached (max layers / heads removed)"
                break
            measured = [self.measure(s) for s in steps]
            base = current
            current = min(measured, key=lambda c: (_efficiency(base, c), -c.bench.speedup))
            if any(c.meets for c in measured):
                self.refine_depth(base, measured)
                self.follow_efficient_path(current)

        closest = min(self.seen.values(), key=lambda c: (self.budget.shortfall(c.bench), c.quality.mean_kld))
        return SearchOutcome(list(self.seen.values()), self.budget, self.best_within(), closest, stop)


def greedy_search(space: SearchSpace, evaluate: Evaluator, slo: SLO, max_candidates: int) -> SearchOutcome:
    return _Search(space, evaluate, slo, max_candidates).run()

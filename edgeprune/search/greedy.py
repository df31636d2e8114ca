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
With a predictor, the candidates of a round are timed fastest-predicted first, and the depths a
refinement would try are predicted from their neighbours before anything is built. An evaluator
short of disk (`evicts`) gets each candidate timed as soon as it is built, so that it holds three
files at once (baseline, best, the one being measured), not a whole round's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

from edgeprune.config import SLO
from edgeprune.search.loop import (
    CANDIDATE_LIMIT,
    DEPTH_LIMIT,
    SPACE_LIMIT,
    Candidate,
    Evaluator,
    SearchLoop,
    SearchOutcome,
)
from edgeprune.search.predict import SearchPredictor, interpolated
from edgeprune.search.space import SearchSpace, State

log = logging.getLogger(__name__)


def _efficiency(base: Candidate, step: Candidate) -> float:
    """Quality lost per byte removed (lower is better); steps that remove nothing rank last."""
    saved = base.size_bytes - step.size_bytes
    lost = max(step.quality.mean_kld - base.quality.mean_kld, 0.0)
    return lost / saved if saved > 0 else float("inf")


class GreedySearch(SearchLoop, name="greedy"):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.followed = False  # the depth path past the candidate limit
        super().__init__(*args, **kwargs)

    def left(self) -> int:
        if self.followed:  # past the limit, only the depth path: a bisection of its depths
            return max(1, math.ceil(math.log2(max(self.space.max_layers, 2))))
        return super().left()

    def phase_note(self) -> str:
        return ", passed: following the depth path" if self.followed else ""

    def phase_fields(self) -> dict[str, Any]:
        return {"depth_path": self.followed}

    def measure_round(self, states: list[State]) -> list[Candidate]:
        """Build every state, then time them fastest-predicted first (built order without a predictor,
        or for an evaluator that keeps few files: each timed as soon as it is built)."""
        if self.evaluate.evicts:
            return [self.measure(s) for s in states]
        cands = self.build_all(states)
        order = cands
        if self.predictor is not None and len(self.predictor.observations) > 0:
            order = sorted(cands, key=lambda c: self.predictor.predict(self.predictor.traffic_of(c.model)).latency_s)
        self.time_all(order)
        self.release_unneeded()
        return cands

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

        return self.outcome(stop)


def greedy_search(space: SearchSpace, evaluate: Evaluator, slo: SLO, max_candidates: int,
                  predictor: SearchPredictor | None = None) -> SearchOutcome:
    return GreedySearch(space, evaluate, slo, max_candidates, predictor).run()

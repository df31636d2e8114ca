"""Model-guided search: predict every plan within the limits, build and time only what can win.

Every dense state within the profile's limits (`SearchSpace.grid`: each depth, attention
sublayers, head structure, FFN width and recipe, in each runtime) gets a predicted speed-up (its
traffic on paper, latency/planned.py, through the device's latency model, corrected per kind of
step by what was measured: estimate.SpeedCorrection) and a predicted KLD (estimate.QualityModel
over a torch proxy: the plan's unquantized KLD on a slice of the held-out text, summed from one
sweep per dimension at first, then the plan's own). Each round takes the state of lowest
predicted KLD among those that may meet the budget (the prediction, widened by the fit's noise and
more for a kind of step never timed, reaches it), builds it (which measures its KLD and reads its
real traffic) and times it only if it can still win: a KLD below the best within budget's, and a
prediction from its real file that may still meet. Every build refits the quality model, every
timing the speed correction and the latency model. The search stops when a confirmed candidate
meets the budget and nothing left is predicted to beat its KLD by more than the error measured on
the KLD predictions so far (`kld_tolerance`: their median relative error, within 1-5%), when
nothing left may meet the budget (the reason is measured: the predictions rest on timed
candidates), or at the candidate limit (which counts builds). A candidate that missed the budget
by less than one measurement's noise, with a better KLD than the best within it, is timed again
and judged on both runs pooled, as a pick is confirmed: one noisy run decides neither.

A runtime other than the baseline's is measured before the search gives up on it: until one of
its candidates is timed, the latency model has only the roofline for it and the quality model only
the baseline's quantization error, and both can be off by far more than any spread the search
allows for (ONNX Runtime's int4 answered 1.33x faster than llama.cpp's Q4_K_M on the embedded
model where the uncalibrated prediction said 0.85x; its KLD is 5x Q4_K_M's). So when nothing else
is worth a build, its lowest-KLD plan (the unpruned structure) is built and timed whatever its
prediction, unless its measured KLD cannot beat the best's; the search goes on from what it
measured. The first runtime's path is the one it takes alone, so a pick is never worse for a
second runtime being allowed.

A target that opts in to sparsity gets the pick sparsified, built and timed once at the end: the
roofline models dense kernels, so a sparse plan is measured, not predicted.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import replace
from typing import Any

from edgeprune.errors import EdgepruneError
from edgeprune.events import CANDIDATE, event
from edgeprune.latency import ModelTraffic
from edgeprune.search.budget import OVER_LATENCY, SHORT_OF_SPEEDUP
from edgeprune.search.estimate import MIN_SPEED_NOISE, AdditiveProxy, QualityModel, SpeedCorrection
from edgeprune.search.loop import (
    CANDIDATE_LIMIT,
    NOT_MEASURED,
    NOTHING_PREDICTED,
    TIMED_LIMIT,
    Candidate,
    SearchLoop,
    SearchOutcome,
)
from edgeprune.search.space import State

log = logging.getLogger(__name__)

KLD_TOLERANCE = 0.05  # a plan predicted to beat the best's KLD by less is not worth a build (before any is measured)
MIN_KLD_TOLERANCE = 0.01  # however good the KLD predictions measure, a smaller gain is within noise
MIN_CHANCE = 0.1  # a plan less likely than this to meet the budget is not timed
NEAR_MISS = 2 * MIN_SPEED_NOISE  # a miss by less may be one measurement's noise: timed again
LATENCY_MISSES = (SHORT_OF_SPEEDUP, OVER_LATENCY)  # a RAM verdict is not timing noise
SWEEP_POINTS = 5  # proxy measurements per dimension (depths are interpolated between them)
EXACT_PER_ROUND = 8  # plans whose own proxy is computed per round, best predicted first
STRUCTURE = ("layers", "attention sublayers", "heads", "FFN width")  # what the torch proxy sees
NOT_BETTER = "not timed: its KLD is no better than the best within budget's"


def _spread(values: list[int], n: int) -> list[int]:
    """At most n of the sorted values, evenly spread, the largest included."""
    if len(values) <= n:
        return values
    return sorted({values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)})


class ParetoSearch(SearchLoop, name="pareto"):
    def run(self) -> SearchOutcome:
        if self.predictor is None:
            raise ValueError("the pareto strategy predicts every plan: it needs a latency predictor")
        self._prepare()
        while True:
            best = self.best_within()
            if best is not None and best is self.baseline:
                if not best.confirmed:
                    self.confirm(best)
                    continue
                stop = "the unpruned model meets the budget"
                break
            reserve = 1 if best is None or not best.confirmed else 0  # a pick is always confirmed
            room = min(self.evaluate.parallel, self.max_timed - self.benchmarks() - reserve)
            batch = self._choose(room) if room > 0 and len(self.seen) < self.max_candidates else []
            if batch:
                self._try(batch)
                continue
            if best is not None and not best.confirmed:
                self.confirm(best)  # if it fails, the search goes on with what is left
                continue
            near = self._near_miss() if self.benchmarks() < self.max_timed else None
            if near is not None:
                log.info("%s missed the budget by %.1f%%, within the noise of one measurement, with a better KLD "
                         "than any within it: timed again, its two runs pooled", near.id,
                         100 * (self.budget.shortfall(near.bench) - 1))
                self.confirm(near)
                continue
            if room <= 0:
                stop = "device benchmark limit reached; the best within budget is kept" if best else TIMED_LIMIT
            elif len(self.seen) >= self.max_candidates:
                stop = "candidate limit reached; the best within budget is kept" if best else CANDIDATE_LIMIT
            else:
                stop = (f"found a candidate within budget; nothing left is predicted to beat its KLD by more "
                        f"than {self.kld_tolerance():.1%} (the error measured on the KLD predictions)" if best
                        else NOTHING_PREDICTED)
            break
        self._sparsify()
        return self.outcome(stop)

    # -- what is predicted -----------------------------------------------------------------------
    def _prepare(self) -> None:
        p, space = self.predictor, self.space
        self.speed, self.additive = SpeedCorrection(), AdditiveProxy()
        self.quality = QualityModel(self._key(self.baseline.state), self.baseline.quality.mean_kld)
        self.exact: dict[State, float] = {}  # structure -> its own proxy KLD
        self.raw_speedup: dict[str, float] = {}  # candidate id -> the roofline's, from its real file
        self.base_traffic = p.traffic_of(self.baseline.model)
        self.grid = [s for s in space.grid() if s != self.baseline.state]
        try:
            self.planned = {s: self.evaluate.planned_traffic(self.baseline, s, space.plan(s)) for s in self.grid}
        except NotImplementedError as e:
            raise EdgepruneError("The pareto strategy predicts plans from the unpruned model's GGUF, so it needs "
                                 "llama.cpp as the first runtime; use --strategy greedy with this runtime.") from e
        self._sweep()
        log.info("pareto: %d plans within the limits, proxy swept at %d points", len(self.grid),
                 sum(len(v) - 1 for v in self.additive.sweeps.values()))

    def _sweep(self) -> None:
        """The proxy of each structural dimension alone, at a few amounts."""
        space, dims = self.space, {d: set() for d in STRUCTURE}
        for s in self.grid:
            f = space.features(s)
            structural = [d for d in STRUCTURE if d in f]
            if len(structural) == 1 and s.recipe == "default" and s.runtime == self.baseline.state.runtime:
                dims[structural[0]].add(s)
        for dim, states in dims.items():
            ordered = sorted(states, key=lambda s: space.features(s)[dim])
            amounts = sorted({round(space.features(s)[dim], 6) for s in ordered})
            for amount in _spread(amounts, SWEEP_POINTS):
                state = next(s for s in ordered if round(space.features(s)[dim], 6) == amount)
                self.additive.add_point(dim, space.features(state)[dim], self._exact_proxy(state))

    def _structure(self, state: State) -> State:
        """What the torch proxy sees of a state: its structure, in no recipe or runtime."""
        return replace(state, recipe="default", runtime=self.baseline.state.runtime)

    def _exact_proxy(self, state: State) -> float:
        key = self._structure(state)
        if key not in self.exact:
            self.exact[key] = self.evaluate.proxy_kld(self.space.plan(key))
        return self.exact[key]

    def _amounts(self, state: State) -> dict[str, float]:
        return {d: a for d, a in self.space.features(state).items() if d in STRUCTURE}

    @staticmethod
    def _key(state: State) -> str:
        return f"{state.recipe} on {state.runtime}"

    def predicted_kld(self, state: State) -> tuple[float, bool]:
        """(KLD, from the plan's own proxy rather than the sum of sweeps)."""
        exact = self.exact.get(self._structure(state))
        proxy = exact if exact is not None else self.additive.predict(self._amounts(state))
        return self.quality.predict(self._key(state), proxy), exact is not None

    def predicted_speedup(self, state: State, traffic: ModelTraffic) -> float:
        """The latency model's speed-up, corrected for what the state changes."""
        return self.predictor.speedup(traffic, self.base_traffic) * self.speed.factor(self.space.features(state))

    def chance(self, state: State, traffic: ModelTraffic) -> float:
        """Probability that the state meets the budget's speed-up and latency (from its prediction and
        the spread measured about such predictions)."""
        features, b = self.space.features(state), self.budget
        factor, chance = self.speed.factor(features), 1.0
        if b.speedup is not None:
            speedup = self.predictor.speedup(traffic, self.base_traffic) * factor
            chance *= self.speed.chance(features, speedup / b.speedup)
        if b.latency_s is not None:
            chance *= self.speed.chance(features, b.latency_s * factor / self.predictor.predict(traffic).latency_s)
        return chance

    def _miss(self, state: State, traffic: ModelTraffic) -> str | None:
        """Why timing the state is not worth it (it is unlikely to meet the budget), or None."""
        chance = self.chance(state, traffic)
        if chance >= MIN_CHANCE:
            return None
        b = self.budget
        wanted = f"{b.speedup:g}x" if b.speedup is not None else f"{b.latency_s:g} s"
        return (f"predicted speed-up {self.predicted_speedup(state, traffic):.2f}x: a {chance:.0%} chance of "
                f"meeting {wanted}")

    def _choose(self, n: int) -> list[State]:
        """Up to n unbuilt states to try next, each ranked from its own proxy (computed for at most
        EXACT_PER_ROUND plans a round). Without a candidate within budget: the lowest predicted KLD
        among those at least as likely as not to meet the budget (else the likeliest). With one: those
        as likely, predicted to beat its KLD by more than the predictions' measured error, by expected
        gain (chance x KLD gained). When none is left, another runtime's first plan (_calibrations)."""
        best = self.best_within()
        bar = best.quality.mean_kld / (1 + self.kld_tolerance()) if best is not None else float("inf")
        built = self._built_runtimes()  # a runtime's plans are predicted once one of them is measured
        options = [(s, self.chance(s, self.planned[s])) for s in self.grid if s not in self.seen and s.runtime in built]
        if best is None and options and not any(c >= 0.5 for _, c in options):
            top = max(c for _, c in options)
            return [s for s, c in options if c == top][:n] if top >= MIN_CHANCE else self._calibrations()[:n]
        likely = 0.5  # near the budget a timing's noise decides: a coin toss or better is worth a benchmark

        def rank(state: State, chance: float) -> tuple[float, bool]:
            kld, exact = self.predicted_kld(state)
            return (kld if best is None else -chance * (best.quality.mean_kld - kld)), exact

        heap = [(*rank(s, c), i, c) for i, (s, c) in enumerate(options) if c >= likely]
        heapq.heapify(heap)
        chosen, refined = [], 0
        while heap and len(chosen) < n:
            _, exact, i, chance = heapq.heappop(heap)
            state = options[i][0]
            if not exact and refined < EXACT_PER_ROUND:
                refined += 1
                self.additive.observe_exact(self._amounts(state), self._exact_proxy(state))
                heapq.heappush(heap, (*rank(state, chance), i, chance))
                continue
            if self.predicted_kld(state)[0] < bar:
                chosen.append(state)
        return chosen or self._calibrations()[:n]

    def _calibrations(self) -> list[State]:
        """For each runtime with nothing built yet, its plan of lowest predicted KLD (the unpruned structure)."""
        built = self._built_runtimes()
        by_runtime: dict[str, list[State]] = {}
        for s in self.grid:
            if s.runtime not in built:
                by_runtime.setdefault(s.runtime, []).append(s)
        return [min(states, key=lambda s: self.predicted_kld(s)[0]) for states in by_runtime.values()]

    def _near_miss(self) -> Candidate | None:
        """The lowest-KLD candidate timed once whose miss is within the noise of one measurement
        (NEAR_MISS) and whose KLD beats the best within budget's: one noisy run decides a miss no more
        than a pass, so it is timed again and judged on both runs, as a pick is confirmed."""
        best = self.best_within()
        near = [c for c in self.seen.values()
                if c.measured and not c.confirmed and not c.meets and c.verdict in LATENCY_MISSES
                and self.budget.shortfall(c.bench) <= 1 + NEAR_MISS
                and (best is None or c.quality.mean_kld < best.quality.mean_kld)]
        return min(near, key=lambda c: c.quality.mean_kld, default=None)

    def kld_tolerance(self) -> float:
        """The relative KLD gain worth a build: the median error of the KLD predicted for the
        candidates built so far (KLD_TOLERANCE before two are), within MIN_KLD_TOLERANCE..KLD_TOLERANCE."""
        errors = sorted(abs(c.predicted_kld / c.quality.mean_kld - 1) for c in self.seen.values()
                        if c.predicted_kld is not None and c.quality.mean_kld > 0)
        if len(errors) < 2:
            return KLD_TOLERANCE
        return min(max(errors[len(errors) // 2], MIN_KLD_TOLERANCE), KLD_TOLERANCE)

    # -- what is measured ------------------------------------------------------------------------
    def _try(self, states: list[State]) -> None:
        """Build the states; time those that can still win (as many at once as the evaluator can)."""
        predicted = {s: self.predicted_kld(s)[0] for s in states}
        cands = self.build_all(states)
        for cand in cands:
            cand.predicted_kld = predicted[cand.state]
            self.quality.add(self._key(cand.state), self._exact_proxy(cand.state), cand.quality.mean_kld)
        worth = [c for c in cands if not self._not_worth_timing(c)]
        if worth:
            for cand, bench in zip(worth, self.evaluate.benchmark_all(worth, self.baseline), strict=True):
                self.judge(cand, bench)
                if bench.baseline_runs:
                    self.speed.add(self.space.features(cand.state), self.raw_speedup[cand.id], bench.speedup)
        self.release_unneeded()

    def _not_worth_timing(self, cand: Candidate) -> bool:
        """Judge a built candidate without timing it if it cannot win: no better KLD than the best
        within budget, or a prediction from its real file that cannot meet the budget."""
        p, best = self.predictor, self.best_within()
        traffic = p.traffic_of(cand.model)
        self.raw_speedup[cand.id] = p.speedup(traffic, self.base_traffic)
        cand.prediction = p.predict(traffic)
        cand.predicted_speedup = self.predicted_speedup(cand.state, traffic)
        reason = None
        if best is not None and cand.quality.mean_kld >= best.quality.mean_kld:
            cand.verdict = NOT_BETTER
            reason = f"KLD {cand.quality.mean_kld:.3f}, the best within budget {best.id}'s {best.quality.mean_kld:.3f}"
        elif self._timed_in(cand.state.runtime) and (miss := self._miss(cand.state, traffic)) is not None:
            cand.verdict, reason = f"{NOT_MEASURED} ({miss})", miss
        if reason is None:
            return False
        event(log, CANDIDATE, "%s %-26s KLD %.3f  not timed: %s", cand.id, cand.state.describe(),
              cand.quality.mean_kld, reason, **self._fields(cand, "skipped"))
        self.progress()
        return True

    def _built_runtimes(self) -> set[str]:
        return {s.runtime for s in self.seen}

    def _timed_in(self, runtime: str) -> bool:
        return any(c.measured and c.state.runtime == runtime for c in self.seen.values())

    def _sparsify(self) -> None:
        """A target that opts in to sparsity: the pick sparsified, measured (it is never predicted)."""
        best = self.best_within()
        state = self.space.sparsified(best.state) if best is not None else None
        if state is None or state in self.seen:
            return
        self.measure(state)
        best = self.best_within()
        if best is not None and not best.confirmed:
            self.confirm(best)

    def benchmarks(self) -> int:
        """Device benchmarks so far: each candidate timed, each confirmation."""
        return sum(c.measured for c in self.seen.values()) + sum(c.confirmed for c in self.seen.values())

    def phase_fields(self) -> dict[str, Any]:
        return {"plans": len(getattr(self, "grid", ()))}

    def details(self) -> dict[str, Any]:
        return {"plans_predicted": len(self.grid), "proxies_computed": len(self.exact),
                "kld_tolerance": self.kld_tolerance(),
                "speed_correction": self.speed.to_dict(), "quality_model": self.quality.to_dict(),
                "additive_interaction": self.additive.interaction}

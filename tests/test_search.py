"""The search policy on deterministic measurements (the real loop is covered end to end)."""

from __future__ import annotations

import pytest

from edgeprune.analysis import Importance
from edgeprune.config import SLO, load_profile
from edgeprune.evaluate import Quality
from edgeprune.measure import BenchmarkRecord
from edgeprune.prune import ModelShape
from edgeprune.search import Budget, Candidate, SearchSpace, State, greedy_search

SHAPE = ModelShape(n_layers=12, n_head=6, n_head_kv=2, head_dim=8, hidden=48, ffn=96, vocab=100)
IMPORTANCE = Importance(layer_scores=[0.9, 0.3, 0.05, 0.04, 0.03, 0.06, 0.07, 0.02, 0.08, 0.1, 0.2, 0.5],
                        head_scores=[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]] * 12,
                        channel_scores=[[float(c % 7) for c in range(96)]] * 12)


class Synthetic:
    """Latency proportional to kept layers (+ a fixed cost), heads cheaper; KLD grows with pruning."""

    def __init__(self):
        self.remeasured = []

    def cost(self, state: State) -> float:
        heads = state.heads.heads / SHAPE.n_head if state.heads else 1.0
        return 0.2 + (SHAPE.n_layers - state.layers_dropped) * (0.6 + 0.2 * heads) / SHAPE.n_layers * 1.25

    def record(self, state: State, paired: bool) -> BenchmarkRecord:
        lat = self.cost(state)
        base = self.cost(State(0, None))
        runs = [{"latency_s": lat, "ttft_s": 0.1, "prefill_tok_s": 100.0, "decode_tok_s": 50.0}] * 3
        base_runs = [dict(runs[0], latency_s=base)] * 3 if paired else []
        return BenchmarkRecord("synthetic", runs, 1 << 20, 0.1, 1, "synthetic", "", baseline_runs=base_runs)

    def __call__(self, state, plan, cid, baseline):
        kld = 0.1 * state.layers_dropped ** 1.5 + (0.8 if state.heads else 0.0)
        quality = Quality(perplexity=10.0, mean_kld=kld, top1_agreement=0.5, positions=10)
        size = int(self.cost(state) * 1e6)
        return Candidate(cid, state, plan, None, size, 1, self.record(state, baseline is not None), quality)

    def remeasure(self, candidate, baseline):
        self.remeasured.append(candidate.id)
        return self.record(candidate.state, baseline is not None)


def space():
    return SearchSpace(SHAPE, IMPORTANCE, load_profile("default").search)


def test_space_orders_layers_and_protects_the_ends():
    s = space()
    assert s.layer_order[:3] == [7, 4, 3] and 0 not in s.layer_order and 11 not in s.layer_order
    assert s.max_layers == 6
    # At most 34% of 6 heads may go: only 2 KV groups x 2 queries (4 heads) qualifies.
    assert [str(h) for h in s.head_structures] == ["2x2 heads"]
    assert s.plan(State(0, s.head_structures[0])).heads[0] == (0, (1, 2, 4, 5))


def test_ffn_widths_are_k_quant_multiples_and_pick_the_best_channels():
    shape = ModelShape(n_layers=4, n_head=4, n_head_kv=2, head_dim=8, hidden=32, ffn=1024, vocab=100)
    scores = [[float(c) for c in range(1024)]] * 4  # later channels score higher
    importance = Importance([0.5, 0.1, 0.2, 0.9], [[1.0] * 4] * 4, scores)
    settings = load_profile("default").search.model_copy(update={"max_ffn_fraction": 0.5})
    s = SearchSpace(shape, importance, settings)
    assert s.ffn_widths == [768, 512]
    assert s.thinner(State(0)) == State(0, ffn=768) and s.thinner(State(1, ffn=768)) == State(1, ffn=512)
    assert s.thinner(State(0, ffn=512)) is None
    plan = s.plan(State(1, ffn=512))
    assert plan.drop_layers == (1,) and [l for l, _ in plan.ffn] == [0, 2, 3]
    assert all(channels == tuple(range(512, 1024)) for _, channels in plan.ffn)
    # A model whose FFN is narrower than one K-quant block has no FFN steps.
    assert space().ffn_widths == []


def test_unpruned_model_meeting_the_budget_is_kept():
    ev = Synthetic()
    out = greedy_search(space(), ev, SLO(prompt_tokens=8, answer_tokens=8, latency_budget_s=5.0), 10)
    assert out.selected.id == "c00" and out.selected.confirmed and ev.remeasured == ["c00"]
    assert out.stop_reason == "the unpruned model meets the budget"


def test_selects_the_best_quality_candidate_within_the_speedup():
    ev = Synthetic()
    out = greedy_search(space(), ev, SLO(prompt_tokens=8, answer_tokens=8, speedup=1.3), 16)
    sel = out.selected
    assert sel is not None and sel.meets and sel.confirmed and sel.id in ev.remeasured
    within = [c for c in out.candidates if c.meets]
    assert sel.quality.mean_kld == min(c.quality.mean_kld for c in within)
    # Every candidate short of the speed-up really is.
    assert all(c.bench.speedup < 1.3 for c in out.candidates if not c.meets)
    # The one-layer refinement found the shallowest depth that meets on the depth-only path.
    depth_only = {c.state.layers_dropped: c for c in out.candidates if c.state.heads is None}
    shallowest = min(d for d, c in depth_only.items() if c.meets)
    assert depth_only[shallowest - 1].bench.speedup < 1.3


def test_unreachable_budget_reports_the_closest():
    out = greedy_search(space(), Synthetic(), SLO(prompt_tokens=8, answer_tokens=8, speedup=5.0), 6)
    assert out.selected is None and len(out.candidates) <= 6
    assert out.stop_reason in ("candidate limit reached", "search limits reached (max layers / heads removed)")
    assert out.closest.bench.speedup == max(c.bench.speedup for c in out.candidates)


@pytest.mark.parametrize(
    "slo, speedup, p90, verdict",
    [
        (SLO(prompt_tokens=1, answer_tokens=1, latency_budget_s=1.0), 1.0, 0.9, "meets"),
        (SLO(prompt_tokens=1, answer_tokens=1, latency_budget_s=1.0), 1.0, 1.1, "over latency budget"),
        (SLO(prompt_tokens=1, answer_tokens=1, speedup=1.3), 1.2, 0.5, "short of the speed-up"),
        (SLO(prompt_tokens=1, answer_tokens=1, speedup=1.3, latency_budget_s=1.0), 1.4, 1.2, "over latency budget"),
        (SLO(prompt_tokens=1, answer_tokens=1, speedup=1.3, ram_ceiling_gib=0.5), 1.4, 0.5, "over RAM ceiling"),
    ],
)
def test_budget_verdicts(slo, speedup, p90, verdict):
    runs = [{"latency_s": p90, "ttft_s": 0.1, "prefill_tok_s": 1.0, "decode_tok_s": 1.0}] * 3
    base = [dict(runs[0], latency_s=p90 * speedup)] * 3
    record = BenchmarkRecord("x", runs, 1 << 30, 0.1, 1, "x", "", baseline_runs=base)
    assert Budget.from_slo(slo).verdict(record) == verdict


def test_recipes_are_a_step_of_their_own():
    settings = load_profile("default").search.model_copy(update={"recipes": ("default", "iq4_nl-narrow")})
    s = SearchSpace(SHAPE, IMPORTANCE, settings)
    assert s.requantized(State(2)) == State(2, recipe="iq4_nl-narrow")
    assert s.requantized(State(2, recipe="iq4_nl-narrow")) is None
    assert s.deeper(State(2, recipe="iq4_nl-narrow")).recipe == "iq4_nl-narrow"
    assert "recipe iq4_nl-narrow" in State(0, recipe="iq4_nl-narrow").describe()

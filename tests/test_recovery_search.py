"""Recovery in a build: the best pruned candidates within budget are recovered through the real
evaluator (stages, llama.cpp quantization and quality), timed as their twins, and compete for the pick."""

from __future__ import annotations

import pytest

from conftest import tiny_evaluator
from edgeprune.chat_health import QUESTIONS
from edgeprune.config import CalibrationSettings, RecoverySettings
from edgeprune.evaluator import CandidateEvaluator
from edgeprune.gguf_file import read_gguf
from edgeprune.prune import Plan
from edgeprune.recover import RecoveryJob
from edgeprune.recover.select import chat_of_pick, recover_best
from edgeprune.report import _recovery_lines, outcome_to_dict
from edgeprune.search import SearchOutcome, State
from edgeprune.search.budget import MEETS, SHORT_OF_SPEEDUP, Budget

pytestmark = pytest.mark.slow

BUDGET = Budget(latency_s=None, speedup=1.3, ram_bytes=None)

SETTINGS = RecoverySettings(enabled=True, candidates=2, extra_samples=0, batch_size=4, learning_rate=2e-3, top_k=16,
                            max_steps=40)


def _layout(path) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape)) for t in read_gguf(path).tensors]


@pytest.fixture
def evaluator(tmp_path) -> CandidateEvaluator:
    with tiny_evaluator(tmp_path) as evaluator:
        yield evaluator


def test_the_best_pruned_candidates_within_budget_are_recovered_and_compete_for_the_pick(evaluator, tmp_path):
    train = tmp_path / "train.txt"  # other text than the held-out windows' (4 calibration windows alone overfit)
    train.write_text("\n\n".join(f"Valve {i} closed after {i % 60} seconds; the line pressure fell to {i % 9} bar."
                                  for i in range(400)))
    plans = [Plan(), Plan(drop_layers=(1,)), Plan(drop_layers=(1, 2)), Plan(drop_layers=(2,))]
    built = evaluator.build_all([(State(i), plan, f"c{i:02d}") for i, plan in enumerate(plans)])
    verdicts = [SHORT_OF_SPEEDUP, MEETS, MEETS, MEETS]  # as a speed-up budget would judge them
    for candidate, verdict in zip(built, verdicts, strict=True):
        candidate.verdict = verdict
    within = sorted(built[1:], key=lambda c: c.quality.mean_kld)
    outcome = SearchOutcome(list(built), BUDGET, within[0], built[0], "test", [])
    job = RecoveryJob(SETTINGS, CalibrationSettings(samples=4, heldout_samples=2, seq_len=32), train)

    record = recover_best(outcome, evaluator, job)

    rows = record["candidates"]
    assert [r["from"] for r in rows] == [c.id for c in within[:2]]  # the two best within budget; never c00
    copies = outcome.candidates[4:]
    assert [c.id for c in copies] == [f"{c.id}r" for c in within[:2]]
    for twin, copy, row in zip(within, copies, rows, strict=False):
        assert copy.recovered_from == twin.id and copy.plan == twin.plan and copy.verdict == MEETS
        assert copy.bench is twin.bench  # the same shapes and types: timed as its twin
        assert copy.model != twin.model and _layout(copy.model) == _layout(twin.model)
        assert copy.recovery["steps"] == 40 and row["after_kld"] == copy.quality.mean_kld
        assert copy.quality.mean_kld < twin.quality.mean_kld  # measured on the quantized file, held-out text
    meets = [c for c in outcome.candidates if c.meets]
    assert outcome.selected is min(meets, key=lambda c: c.quality.mean_kld)
    assert outcome.selected.recovered_from is not None and record["selected_before"] == within[0].id

    # Recovering again finds every stage cached: the same copies, nothing retrained.
    again = SearchOutcome(list(built), BUDGET, within[0], built[0], "test", [])
    assert recover_best(again, evaluator, job)["candidates"] == rows

    # The recovered pick's chat answers beside its twin's (a tiny random model's: judged, whatever they say).
    record["chat"] = chat_of_pick(outcome, lambda name: evaluator.runtime(name).format,
                                  evaluator.context.reference.tokenizer, 2)
    assert record["chat"]["candidate"] == outcome.selected.id
    assert [a["question"] for a in record["chat"]["before"]] == [a["question"] for a in record["chat"]["after"]] \
        == list(QUESTIONS)

    report = {"search": outcome_to_dict(outcome) | {"recovery": record}}
    assert report["search"]["candidates"][4]["recovered_from"] == within[0].id
    markdown = "\n".join(_recovery_lines(record))
    assert "## Recovery" in markdown and f"| {within[0].id}r | {within[0].id} |" in markdown
    assert f"Chat answers of {outcome.selected.id}" in markdown and QUESTIONS[0] in markdown

"""A build short of disk: the evaluator removes a released candidate's GGUF from the stage cache
(only when no other candidate shares the file) and rebuilds it, byte for byte, when it is needed
again. The search's side (which files it releases, and when): tests/test_search.py."""

from __future__ import annotations

import pytest

from conftest import tiny_evaluator
from edgeprune.evaluator import CandidateEvaluator
from edgeprune.hashing import sha256_file
from edgeprune.prune import Plan
from edgeprune.search import State


@pytest.fixture
def evaluator(tmp_path) -> CandidateEvaluator:
    with tiny_evaluator(tmp_path, evicts=True) as evaluator:
        yield evaluator


def test_a_released_file_goes_once_no_candidate_holds_it_and_comes_back_the_same(evaluator):
    baseline = evaluator.build(State(0), Plan(), "c00")
    shallow = evaluator.build(State(1), Plan(drop_layers=(1,)), "c01")
    twin = evaluator.build(State(1), Plan(drop_layers=(1,)), "c02")  # another step, the same file
    assert shallow.model == twin.model != baseline.model
    digest = sha256_file(shallow.model)

    evaluator.release(shallow)
    assert twin.model.is_file()  # c02 still holds it
    evaluator.release(twin)
    assert not twin.model.exists() and not twin.model.parent.exists() and baseline.model.is_file()

    evaluator.restore(twin)
    assert sha256_file(twin.model) == digest  # rebuilt: the same key, path and bytes
    # Its quality was cached apart from the file: the restored candidate keeps its figures.
    assert evaluator.build(State(1), Plan(drop_layers=(1,)), "c03").quality == twin.quality


def test_an_evaluator_with_room_keeps_every_file(evaluator):
    evaluator.evicts = False
    cand = evaluator.build(State(1), Plan(drop_layers=(1,)), "c01")
    evaluator.release(cand)
    assert cand.model.is_file()

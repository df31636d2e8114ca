"""Self-generated calibration text through llama.cpp: the sampler (pure math), batched sampling from
the embedded GGUF (runtimes/generate.py) and the windows data.py cuts from it."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import save_tiny_hf
from edgeprune.config import CalibrationSettings
from edgeprune.data import self_generated, self_prompt
from edgeprune.errors import EdgepruneError
from edgeprune.models import load_reference, resolve_source
from edgeprune.models.embedded import embedded_gguf
from edgeprune.pipeline import CandidateModel, calibration_splits, generation_model
from edgeprune.runtimes import generate, llamacpp
from edgeprune.runtimes.generate import _nucleus, next_token
from edgeprune.stages import StageRunner

TEXTS = ["Why?", "Explain how a heat pump works to a new maintenance technician.", "Hi",
         "Write a short poem about the first snow of winter, in the voice of an old sailor who misses the sea."]


def _probs(logits: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _full_sort_nucleus(p: np.ndarray, top_p: float) -> list[int]:
    """The definition: most likely first, equal probabilities by lower id, up to top_p mass."""
    order = sorted(range(len(p)), key=lambda t: (-p[t], t))
    kept, mass = [], 0.0
    for t in order:
        kept.append(t)
        mass += p[t]
        if mass >= top_p:
            break
    return kept


def test_greedy_takes_the_most_likely_allowed_token():
    logits = np.array([1.0, 5.0, 3.0, 5.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert next_token(logits, 0.0, 1.0, rng) == 1  # a tie goes to the lower id
    assert next_token(logits, 0.0, 1.0, rng, banned=np.array([1])) == 3
    assert next_token(logits, 0.0, 1.0, rng, banned=np.array([1, 3])) == 2


def test_top_p_draws_only_from_the_nucleus_in_proportion():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = np.array([next_token(logits, 1.0, 0.7, rng) for _ in range(4000)])
    assert set(draws) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03
    # A lower temperature sharpens: the most likely token wins more often.
    cold = np.array([next_token(logits, 0.3, 1.0, rng) for _ in range(2000)])
    assert (cold == 0).mean() > 0.8 and set(cold) <= {0, 1, 2, 3}
    # A banned token is never drawn, however likely.
    banned = np.array([next_token(logits, 1.0, 1.0, rng, banned=np.array([0])) for _ in range(500)])
    assert 0 not in banned and set(banned) == {1, 2, 3}


@pytest.mark.parametrize("scale", [8.0, 1.0, 0.01])  # peaked (first candidates), broad, flat (full sort)
def test_nucleus_matches_a_full_sort_with_ties(scale):
    rng = np.random.default_rng(1)
    logits = np.round(rng.normal(size=3000) * scale, 1)  # rounding makes many exact ties
    p = _probs(logits)
    for top_p in (0.3, 0.9, 0.95, 1.0):
        assert _nucleus(p, top_p).tolist() == _full_sort_nucleus(p, top_p)


@pytest.fixture(scope="module")
def tokenizer(embedded_reference):
    return embedded_reference.tokenizer


@pytest.fixture(scope="module")
def prompts(tokenizer):
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in ids}) == len(ids)  # different lengths in one batch
    return ids


def test_batched_sampling_returns_the_requested_tokens_reproducibly(prompts, tokenizer):
    counts = [6, 0, 11, 3]
    gguf = embedded_gguf()
    # Batch 2 for 3 prompts with tokens to generate: a slot is freed and reused mid-run.
    first = generate.sample(gguf, prompts, counts, 0.8, 0.95, seed=0, threads=2, batch_size=2)
    assert [len(a) for a in first.answers] == counts
    assert first.tokens == 20 and first.prompt_tokens == sum(map(len, prompts))
    assert first.seconds > 0 and first.tokens_per_s > 0 and first.batch_size == 2
    assert {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")} <= set(first.banned)
    assert not set(first.banned) & {t for a in first.answers for t in a}  # end of generation is banned

    again = generate.sample(gguf, prompts, counts, 0.8, 0.95, seed=0, threads=1, batch_size=2)
    assert again.answers == first.answers  # same seed, same rows (any thread count)
    other = generate.sample(gguf, prompts, counts, 0.8, 0.95, seed=1, threads=2, batch_size=2)
    assert other.answers[2] != first.answers[2]


def test_batched_greedy_answers_agree_with_each_prompt_alone(prompts):
    """Four prompts of different lengths in one batch against each alone.

    Each chosen token must be the top allowed token of llama.cpp's logits for that prompt and answer
    evaluated alone, up to rounding: evaluated at once, they go through the prompt kernels, which
    round differently from token-by-token decoding (measured: up to ~0.013 on logits of ~30; a token
    of another sequence would be off by units). The answers are also compared exactly: verified on this CPU
    with the wheel's baseline (x86-64-v3) kernels, where a sequence's logits do not depend on the
    rest of its batch: each has its own KV stream (kv_unified off) and a batched matrix product
    computes every row as one sequence alone would. A unified KV cache breaks that.
    """
    gguf = embedded_gguf()
    run = generate.sample(gguf, prompts, 16, 0.0, 1.0, seed=0, threads=2, batch_size=4)
    rows = [p + a for p, a in zip(prompts, run.answers, strict=True)]
    width = max(map(len, rows))  # padded at the end: causal attention, earlier logits unchanged
    padded = np.array([r + [0] * (width - len(r)) for r in rows])
    for prompt, answer, logits in zip(prompts, run.answers, llamacpp.sequence_logits(gguf, padded, 1), strict=True):
        steps = logits[len(prompt) - 1 : len(prompt) + len(answer) - 1]
        steps[:, run.banned] = -np.inf
        chosen = steps[np.arange(len(answer)), answer]
        assert np.all(steps.max(axis=1) - chosen < 0.1)
    # Batch size 1: the prompts one after another, each alone in the context.
    alone = generate.sample(gguf, prompts, 16, 0.0, 1.0, seed=0, threads=2, batch_size=1)
    assert run.answers == alone.answers


def test_self_generated_windows_are_varied_disjoint_and_cached(tmp_path, embedded_reference, tokenizer):
    settings = CalibrationSettings(samples=4, heldout_samples=2, seq_len=64, seed=0)
    runner = StageRunner(tmp_path / "cache")
    splits = calibration_splits(embedded_reference, settings, None, runner, threads=2)
    assert splits.calib.shape == (4, 64) and splits.heldout.shape == (2, 64)
    assert splits.source == ("self-generated through llama.cpp by SmolLM2-135M-Instruct.Q4_1.gguf "
                             "(seed 0, 6 chat answers)")

    rows = splits.calib.tolist() + splits.heldout.tolist()
    prompt_lengths = []
    for i, row in enumerate(rows):  # window i: prompt i in the chat template, then its answer
        text = tokenizer.apply_chat_template([{"role": "user", "content": self_prompt(i)}], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=True)["input_ids"]
        assert len(prompt) < 64 and row[: len(prompt)] == prompt
        prompt_lengths.append(len(prompt))
    assert len({self_prompt(i) for i in range(6)}) == 6
    assert len({tuple(r) for r in rows}) == 6
    answers = {tuple(r[n:]) for r, n in zip(rows, prompt_lengths, strict=True)}
    assert len(answers) == 6  # the answers themselves differ, not only their prompts
    assert not {tuple(r) for r in splits.heldout.tolist()} & {tuple(r) for r in splits.calib.tolist()}

    generation = splits.to_dict()["generation"]
    assert generation["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert generation["tokens"] == sum(64 - n for n in prompt_lengths)
    assert generation["seconds"] > 0 and generation["tokens_per_s"] > 0 and generation["threads"] == 2

    again = calibration_splits(embedded_reference, settings, None, runner, threads=1)  # cached
    assert again.sha256 == splits.sha256 and again.generation == splits.generation
    assert (again.calib == splits.calib).all() and (again.heldout == splits.heldout).all()


def test_a_heldout_window_equal_to_a_calibration_window_is_refused(tokenizer):
    # 16 tokens hold only the chat template's system prefix, the same for every prompt.
    settings = CalibrationSettings(samples=2, heldout_samples=1, seq_len=16)
    with pytest.raises(EdgepruneError) as e:
        self_generated(embedded_gguf(), tokenizer, settings, threads=2)
    assert "held-out window equals a calibration window" in str(e.value) and "\n" not in str(e.value)


def test_a_hugging_face_reference_self_generates_from_a_gguf_of_itself(tmp_path):
    reference = load_reference(resolve_source(str(save_tiny_hf(tmp_path / "tiny"))), tmp_path / "cache")
    runner = StageRunner(tmp_path / "cache")
    gguf = generation_model(reference, runner, threads=2)
    assert gguf.suffix == ".gguf" and gguf != reference.source.path
    settings = CalibrationSettings(samples=2, heldout_samples=1, seq_len=128)
    splits = self_generated(gguf, reference.tokenizer, settings, threads=2)  # no chat template: plain prompts
    rows = splits.calib.tolist() + splits.heldout.tolist()
    lengths = []
    for i, row in enumerate(rows):
        prompt = reference.tokenizer(self_prompt(i) + "\n", add_special_tokens=True)["input_ids"]
        assert len(prompt) < 128 and row[: len(prompt)] == prompt and len(row) == 128
        lengths.append(len(prompt))
    assert splits.generation["tokens"] == sum(128 - n for n in lengths)


def test_a_build_short_of_disk_removes_the_quick_copy_and_reuses_the_windows_without_it(tmp_path):
    reference = load_reference(resolve_source(str(save_tiny_hf(tmp_path / "tiny"))), tmp_path / "cache")
    runner = StageRunner(tmp_path / "cache")
    settings = CalibrationSettings(samples=2, heldout_samples=1, seq_len=64)
    splits = calibration_splits(reference, settings, None, runner, threads=2, keep_quick_copy=False)
    copies = tmp_path / "cache" / CandidateModel.name
    assert [p for p in copies.iterdir() if p.is_dir()] == []  # sampled from, then removed
    again = calibration_splits(reference, settings, None, runner, threads=2)
    assert again.sha256 == splits.sha256
    assert [p for p in copies.iterdir() if p.is_dir()] == []  # the cached windows needed no copy


def test_an_unloadable_model_or_a_foreign_vocabulary_is_one_sentence(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    with pytest.raises(EdgepruneError, match=r"^llama\.cpp cannot load broken\.gguf; "):
        generate.sample(broken, [[1, 2]], 4, 0.8, 0.95, seed=0, threads=1)
    with pytest.raises(EdgepruneError, match=r"token ids outside SmolLM2-135M-Instruct\.Q4_1\.gguf's vocabulary of "
                                             r"49152; the tokenizer does not match the model\.$"):
        generate.sample(embedded_gguf(), [[1, 2], [60000]], 4, 0.8, 0.95, seed=0, threads=1)

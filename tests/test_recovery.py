"""Recovery fine-tuning: the distillation math on small tensors, the trainer on tiny Llamas (the loss
falls, LoRA merges exactly, a killed run resumes to the same weights, the time budget holds), and the
recovered weights exported to GGUF with the usual parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from conftest import llama_cpp_logits, tiny_llama, torch_logits
from edgeprune.config import RecoverySettings
from edgeprune.evaluate import kl_divergence
from edgeprune.export import Provenance, write_gguf
from edgeprune.models.weights import ModuleStore
from edgeprune.prune import Plan
from edgeprune.prune.modules import materialize
from edgeprune.recover.distill import TopK, distillation_loss, tail_log
from edgeprune.recover.student import stored_dtype, student
from edgeprune.recover.trainer import Recovery, TrainingData, batch_rows, merged

C = tuple(range(128))
# Non-uniform: a layer dropped, heads and FFN channels cut per layer, one attention sublayer removed.
PLAN = Plan(drop_layers=(1,), heads=((0, (1, 3)), (2, ())), ffn=((0, C[:100]), (3, C[:64])))
VOCAB = 512


def _teacher_targets(model, tokens: torch.Tensor, k: int, temperature: float = 1.0, block: int = 100):
    """Top-k log-probabilities of `model` on `tokens`, the vocabulary fed in blocks as the stage does."""
    with torch.no_grad():
        logits = model(tokens).logits / temperature
    logp, index = [], []
    for row in logits:
        top = TopK(k)
        for start in range(0, row.shape[-1], block):
            top.add(row[:, start : start + block], start)
        lp, ix = top.log_probs()
        logp.append(lp.numpy())
        index.append(ix.numpy())
    return np.stack(logp), np.stack(index).astype(np.int32)


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(tied=True, vocab=VOCAB)


@pytest.fixture(scope="module")
def data(teacher):
    tokens = torch.randint(3, VOCAB, (12, 24), generator=torch.Generator().manual_seed(0))
    logp, index = _teacher_targets(teacher, tokens, k=32)
    return TrainingData(tokens, logp, index)


def _recovery(teacher, data, tmp_path, **settings) -> Recovery:
    values = {"minutes": 5.0, "batch_size": 3, "top_k": 32, "extra_samples": 0} | settings
    student = materialize(ModuleStore(teacher), PLAN)
    return Recovery(student, data, RecoverySettings(**values), threads=2, checkpoints=tmp_path / "ckpt")


def _kl_to_teacher(teacher, student_logits_of, tokens) -> float:
    with torch.no_grad():
        ref = torch.log_softmax(teacher(tokens).logits, -1)
        cand = torch.log_softmax(student_logits_of(tokens), -1)
    return float(kl_divergence(ref, cand).mean())


# -- the math ----------------------------------------------------------------------------------
def test_blockwise_top_k_is_the_top_k_of_the_whole_log_softmax():
    logits = torch.randn(7, 1000, generator=torch.Generator().manual_seed(1)) * 3
    top = TopK(16)
    for start in range(0, 1000, 96):  # blocks that do not divide the vocabulary
        top.add(logits[:, start : start + 96], start)
    logp, index = top.log_probs()
    expected, expected_index = torch.log_softmax(logits, -1).topk(16, dim=-1)
    assert_close(logp, expected, rtol=0, atol=1e-5)
    assert torch.equal(index, expected_index)


def test_distillation_loss_is_the_full_kl_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(2)
    teacher_logits, student_logits = torch.randn(5, 200, generator=g) * 2, torch.randn(5, 200, generator=g) * 2
    t_logp = torch.log_softmax(teacher_logits, -1)
    full = float(kl_divergence(t_logp, torch.log_softmax(student_logits, -1)).mean())
    everything = t_logp.topk(200, -1)
    assert distillation_loss(student_logits, everything.values, everything.indices).item() == pytest.approx(full, 1e-4)
    top = t_logp.topk(20, -1)
    bound = distillation_loss(student_logits, top.values, top.indices).item()
    assert 0 < bound < full
    assert distillation_loss(teacher_logits, top.values, top.indices).item() == pytest.approx(0.0, abs=1e-5)
    # The tail bucket: log(1 - mass of the top k), finite even when the top k hold everything.
    assert_close(tail_log(top.values).exp(), 1 - top.values.exp().sum(-1), rtol=0, atol=1e-5)
    assert torch.isfinite(tail_log(everything.values)).all()


def test_a_student_whose_top_k_hold_all_the_mass_gets_finite_gradients():
    # Step 130 of a real recovery: the student's probabilities on the teacher's top k summed to 1.0 in
    # float32, log(0) of its tail mass, and the clamp after it turned the gradient into NaN.
    teacher = torch.log_softmax(torch.randn(3, 100, generator=torch.Generator().manual_seed(5)), -1).topk(8, -1)
    student = torch.full((3, 100), -30.0)
    student.scatter_(-1, teacher.indices, 20.0)
    student.requires_grad_(True)
    loss = distillation_loss(student, teacher.values, teacher.indices)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_temperature_scales_the_loss_by_t_squared_of_the_softened_kl():
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    t_soft = torch.log_softmax(t / 2, -1).topk(50, -1)
    soft_kl = float(kl_divergence(t_soft.values.gather(-1, t_soft.indices.argsort(-1)),
                                  torch.log_softmax(s / 2, -1)).mean())
    assert distillation_loss(s, t_soft.values, t_soft.indices, 2.0).item() == pytest.approx(4 * soft_kl, 1e-4)


def test_batches_cover_every_window_once_per_pass_in_a_seeded_order():
    rows = [r for step in range(4) for r in batch_rows(step, 3, 12, seed=0)]
    assert sorted(rows) == list(range(12)) and rows != list(range(12))
    assert batch_rows(5, 3, 12, seed=0) == batch_rows(5, 3, 12, seed=0) != batch_rows(5, 3, 12, seed=1)


# -- the trainer -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "full"])
def test_distillation_brings_the_pruned_model_closer_to_the_teacher(teacher, data, tmp_path, method):
    before_model = materialize(ModuleStore(teacher), PLAN)
    before = _kl_to_teacher(teacher, lambda t: before_model(t).logits, data.windows)
    recovery = _recovery(teacher, data, tmp_path, method=method, max_steps=40, learning_rate=2e-3)
    tensors = dict(recovery.run())
    log = recovery.log
    assert log.steps == 40 and log.stopped_by == "max_steps" and log.tokens == 40 * 3 * 24
    assert np.mean(log.losses[-5:]) < 0.7 * np.mean(log.losses[:5])
    after_model = materialize(ModuleStore(teacher), PLAN, overrides={n: (lambda t=t: t) for n, t in tensors.items()})
    after = _kl_to_teacher(teacher, lambda t: after_model(t).logits, data.windows)
    assert after < 0.8 * before
    assert all(n.startswith("model.layers.") for n in tensors)  # embedding, final norm, head: the reference's
    if method == "lora":
        assert {n.rsplit(".", 2)[-2] for n in tensors} <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"}


def test_merged_lora_computes_what_the_unmerged_model_does(teacher, data, tmp_path):
    recovery = _recovery(teacher, data, tmp_path, max_steps=15, learning_rate=5e-3)
    recovery.run()
    tokens = data.windows[:2]
    with torch.no_grad():
        unmerged = recovery.model(tokens).logits
    tensors = dict(merged(recovery.model, recovery.settings))
    plain = materialize(ModuleStore(teacher), PLAN, overrides={n: (lambda t=t: t) for n, t in tensors.items()})
    with torch.no_grad():
        assert_close(plain(tokens).logits, unmerged, rtol=0, atol=1e-5)
        assert (plain(tokens).logits - materialize(ModuleStore(teacher), PLAN)(tokens).logits).abs().max() > 1e-2


class _Killed(Exception):
    pass


def test_a_killed_recovery_resumes_from_its_checkpoint_to_the_same_weights(teacher, data, tmp_path, monkeypatch):
    settings = {"max_steps": 10, "learning_rate": 2e-3, "checkpoint_seconds": 1e-6}  # a checkpoint every step
    uninterrupted = dict(_recovery(teacher, data, tmp_path / "a", **settings).run())

    killed = _recovery(teacher, data, tmp_path / "b", **settings)
    step = killed._step

    def dies_at_step_6() -> float:
        if killed.log.steps == 6:
            raise _Killed
        return step()

    monkeypatch.setattr(killed, "_step", dies_at_step_6)
    with pytest.raises(_Killed):
        killed.run()
    resumed = _recovery(teacher, data, tmp_path / "b", **settings)
    tensors = dict(resumed.run())
    assert resumed.log.resumed_at_step == 6 and resumed.log.steps == 10
    assert len(resumed.log.losses) == 10
    assert tensors.keys() == uninterrupted.keys()
    for name in tensors:
        assert_close(tensors[name], uninterrupted[name], rtol=0, atol=1e-6)


def test_the_time_budget_is_kept(teacher, data, tmp_path):
    recovery = _recovery(teacher, data, tmp_path, minutes=0.03)  # 1.8 s
    recovery.run()
    log = recovery.log
    assert log.stopped_by == "minutes" and log.steps > 1
    assert 1.8 <= log.seconds <= 1.8 + log.longest_step_s  # stopped at the first step past the budget


# -- export --------------------------------------------------------------------------------------
def test_recovered_weights_export_to_gguf_with_the_usual_parity(teacher, data, tmp_path, embedded_tokenizer_spec):
    big_vocab_teacher = tiny_llama(tied=True)  # the embedded tokenizer's vocabulary, which llama.cpp loads
    tokens = torch.randint(3, 49152, (6, 16), generator=torch.Generator().manual_seed(4))
    logp, index = _teacher_targets(big_vocab_teacher, tokens, k=16, block=8192)
    student = materialize(ModuleStore(big_vocab_teacher), PLAN)
    recovery = Recovery(student, TrainingData(tokens, logp, index),
                        RecoverySettings(max_steps=6, batch_size=2, learning_rate=5e-3, top_k=16), 2, tmp_path / "c")
    tensors = dict(recovery.run())
    overrides = {n: (lambda t=t: t) for n, t in tensors.items()}
    path = tmp_path / "recovered.gguf"
    write_gguf(ModuleStore(big_vocab_teacher), PLAN, embedded_tokenizer_spec, path, "F32",
               Provenance("tiny", "0" * 64, PLAN.to_dict(), recovery={"steps": 6}), "t", overrides)
    ids = np.array([[1, 504, 2432, 28, 3300, 17, 33, 34, 35, 216, 4389, 29]])
    expected = torch_logits(materialize(ModuleStore(big_vocab_teacher), PLAN, overrides=overrides), ids)
    got = llama_cpp_logits(path, ids)
    spread = expected.max() - expected.min()
    assert np.abs(got - expected).max() <= 1e-3 * spread
    assert (got.argmax(-1) == expected.argmax(-1)).mean() == 1.0


def test_plain_fine_tuning_lowers_the_cross_entropy_of_the_text(teacher, data, tmp_path):
    recovery = _recovery(teacher, data, tmp_path, objective="sft", max_steps=30, learning_rate=2e-3)
    recovery.run()
    assert np.mean(recovery.log.losses[-5:]) < 0.9 * np.mean(recovery.log.losses[:5])


# -- the student -----------------------------------------------------------------------------------
def test_a_lora_student_keeps_a_16_bit_base_and_computes_what_an_fp32_copy_does(teacher, data, tmp_path):
    narrow = ModuleStore(tiny_llama(tied=True, vocab=VOCAB).to(torch.bfloat16))
    assert stored_dtype(narrow) == torch.bfloat16 and stored_dtype(ModuleStore(teacher)) == torch.float32
    small = student(narrow, PLAN, "lora")
    wide = materialize(narrow, PLAN)  # the same bf16 values, widened to fp32 once
    linears = [m for m in small.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert small.model.embed_tokens.weight.dtype == torch.bfloat16 and small.model.norm.weight.dtype == torch.float32
    size = sum(p.numel() * p.element_size() for p in small.parameters())
    assert size < 0.6 * sum(p.numel() * p.element_size() for p in wide.parameters())
    assert all(p.dtype == torch.float32 for p in student(narrow, PLAN, "full").parameters())
    tokens = data.windows[:2]
    with torch.no_grad():
        assert_close(small(tokens).logits, wide(tokens).logits, rtol=0, atol=1e-5)

    settings = RecoverySettings(max_steps=8, batch_size=3, top_k=32, learning_rate=5e-3)
    trained_small = Recovery(small, data, settings, 2, tmp_path / "a")
    trained_wide = Recovery(wide, data, settings, 2, tmp_path / "b")
    saved = []  # what autograd keeps for the backward pass: never a widened copy of a base weight
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        trained_small.model(input_ids=tokens).logits.sum().backward()
    weights = {tuple(m.weight.shape) for m in linears}
    assert not [s for s in saved if s[1] == torch.float32 and s[0] in weights]
    assert any(s[1] == torch.bfloat16 and s[0] in weights for s in saved)
    trained_wide.model(input_ids=tokens).logits.sum().backward()  # the same gradients as the fp32 copy's
    for p, q in zip(trained_small.params, trained_wide.params, strict=True):
        assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    trained_small.optimizer.zero_grad()
    trained_wide.optimizer.zero_grad()
    got, expected = dict(trained_small.run()), dict(trained_wide.run())
    assert got.keys() == expected.keys() and all(t.dtype == torch.float32 for t in got.values())
    for name in got:  # Adam's normalised steps carry rounding-level differences along: 1e-4 of weights ~0.02
        assert_close(got[name], expected[name], rtol=0, atol=1e-4)

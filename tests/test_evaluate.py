import math

import torch
from torch.testing import assert_close

from edgeprune.evaluate import QualityTally, kl_divergence, log_probs, next_token_nll


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(4, 10)
    assert_close(kl_divergence(log_probs(logits), log_probs(logits)), torch.zeros(4), atol=1e-6, rtol=0)


def test_kl_known_value():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert_close(kl_divergence(p, q), torch.tensor([expected]))


def test_uniform_model_has_vocab_size_perplexity_and_tally():
    vocab, length = 8, 6
    tokens = torch.tensor([1, 3, 5, 7, 0, 2])
    uniform = torch.zeros(length, vocab)
    assert_close(next_token_nll(log_probs(uniform), tokens), torch.full((length - 1,), math.log(vocab)))
    ref = torch.randn(length, vocab)
    tally = QualityTally()
    tally.add(log_probs(ref), uniform.numpy(), tokens)
    q = tally.result()
    assert math.isclose(q.perplexity, vocab, rel_tol=1e-5)
    assert q.positions == length
    assert q.mean_kld > 0
    same = QualityTally()
    same.add(log_probs(ref), ref.numpy(), tokens)
    assert same.result().top1_agreement == 1.0
    assert same.result().mean_kld < 1e-6

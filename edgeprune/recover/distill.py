"""The math of logit distillation over stored teacher targets: pure functions over tensors.

The teacher's distribution at each position is kept as its top-k probabilities plus one tail bucket
(everything else): k*6 bytes per token instead of the vocabulary's 4*V. The loss is the KL divergence
between teacher and student over those k+1 buckets, a lower bound of the full KL that is exact once
the tail is empty, and a close one when the teacher is confident (its top 64 carry most of the mass).
"""

from __future__ import annotations

import torch

# Logs of probabilities below this are clamped: a tail bucket can be empty.
_TINY = 1e-12


class TopK:
    """Running top-k and log-sum-exp of one window's logits, fed a vocabulary block at a time
    (the output head is never whole in memory)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values: torch.Tensor | None = None  # [positions, k] scaled logits
        self.index: torch.Tensor | None = None  # [positions, k] token ids
        self.lse: torch.Tensor | None = None  # [positions]

    def add(self, logits: torch.Tensor, start: int) -> None:
        """`logits`: [positions, block] (already divided by the temperature), block's first id `start`."""
        logits = logits.float()
        block_lse = torch.logsumexp(logits, dim=-1)
        values, index = logits.topk(min(self.k, logits.shape[-1]), dim=-1)
        index = index + start
        if self.values is None:
            self.values, self.index, self.lse = values, index, block_lse
            return
        values = torch.cat([self.values, values], dim=-1)
        index = torch.cat([self.index, index], dim=-1)
        self.values, keep = values.topk(min(self.k, values.shape[-1]), dim=-1)
        self.index = index.gather(-1, keep)
        self.lse = torch.logaddexp(self.lse, block_lse)

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities of the top k, their token ids), each [positions, k]."""
        assert self.values is not None and self.lse is not None and self.index is not None
        return self.values - self.lse[:, None], self.index


def tail_log(logp_top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp_top))) over the last dimension: the log-mass outside the top k.

    Summed in float64 (a tail of 1e-9 survives) and clamped before the log, never after: a student
    whose top k hold all the float32 mass must get a finite gradient, not log(0)'s infinity times
    the clamp's zero (NaN), which is what ended a 15-minute recovery at step 130."""
    mass = logp_top.double().exp().sum(-1)
    return torch.log((1.0 - mass).clamp(min=_TINY)).to(logp_top.dtype)


def distillation_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_index: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean KL(teacher || student) over positions, on the teacher's top-k buckets plus the tail, times
    T^2 (so gradients keep their size across temperatures, as in Hinton et al.).

    `student_logits`: [..., vocab]; `teacher_logp`: [..., k] log-probabilities at temperature T;
    `teacher_index`: [..., k] their token ids."""
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = student.gather(-1, teacher_index.long())
    t_top = teacher_logp.float()
    kl_top = (t_top.exp() * (t_top - s_top)).sum(-1)
    t_tail, s_tail = tail_log(t_top), tail_log(s_top)
    kl_tail = t_tail.exp() * (t_tail - s_tail)
    return (kl_top + kl_tail).mean() * temperature ** 2


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each next token (plain fine-tuning on the text: no teacher)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))

"""Quality of a candidate against the reference: perplexity, KL divergence, top-1 agreement.

Pure functions over logits; `QualityTally` sums them over held-out windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def log_probs(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float32), dim=-1)


def kl_divergence(ref_logp: torch.Tensor, cand_logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || candidate) per position, in nats, shape [positions]."""
    return (ref_logp.exp() * (ref_logp - cand_logp)).sum(dim=-1)


def next_token_nll(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of tokens[1:] given the predictions at positions [:-1]."""
    return -logp[:-1].gather(-1, tokens[1:].unsqueeze(-1)).squeeze(-1)


@dataclass
class Quality:
    perplexity: float
    mean_kld: float
    top1_agreement: float
    positions: int

    def to_dict(self) -> dict[str, float]:
        return {
            "perplexity": self.perplexity,
            "mean_kld": self.mean_kld,
            "top1_agreement": self.top1_agreement,
            "positions": self.positions,
        }


class QualityTally:
    def __init__(self) -> None:
        self.kld = self.nll = self.agree = 0.0
        self.positions = self.predictions = 0

    def add(self, ref_logp: torch.Tensor, cand_logits: torch.Tensor | np.ndarray, tokens: torch.Tensor) -> None:
        cand_logp = log_probs(cand_logits)
        self.kld += float(kl_divergence(ref_logp, cand_logp).sum())
        self.agree += float((ref_logp.argmax(-1) == cand_logp.argmax(-1)).sum())
        self.positions += ref_logp.shape[0]
        self.nll += float(next_token_nll(cand_logp, tokens).sum())
        self.predictions += tokens.numel() - 1

    def result(self) -> Quality:
        return Quality(
            perplexity=float(np.exp(self.nll / self.predictions)),
            mean_kld=self.kld / self.positions,
            top1_agreement=self.agree / self.positions,
            positions=self.positions,
        )


@torch.no_grad()
def reference_log_probs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """The reference's log-probabilities for every held-out window, one [len, vocab] each."""
    return [log_probs(model(input_ids=w.unsqueeze(0), use_cache=False).logits[0]) for w in windows]


def reference_perplexity(ref_logps: list[torch.Tensor], windows: torch.Tensor) -> float:
    nll = sum(float(next_token_nll(lp, w).sum()) for lp, w in zip(ref_logps, windows, strict=True))
    return float(np.exp(nll / sum(w.numel() - 1 for w in windows)))

"""Quality of a candidate against the reference: perplexity, KL divergence, top-1 agreement.

Pure functions over logits; `QualityTally` sums them over held-out windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

    def add(self, ref_logp: torch.Tensor | np.ndarray, cand_logits: torch.Tensor | np.ndarray,
            tokens: torch.Tensor) -> None:
        ref_logp = torch.from_numpy(np.array(ref_logp)) if isinstance(ref_logp, np.ndarray) else ref_logp
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
def reference_log_probs(source: Any, windows: torch.Tensor, out: np.ndarray | None = None,
                        label: str = "reference log-probs") -> np.ndarray:
    """The reference's log-probabilities for every held-out window, [n, len, vocab] float32, computed
    one layer at a time and written into `out` (a memory-mapped file, so they live on disk) or a
    new array. `source`: a WeightStore, a DecoderStream, or a model in memory."""
    from edgeprune.models.streamed import SequentialPass, as_stream

    stream = as_stream(source)
    # One window per batch, as the model would be run on each alone.
    passes = SequentialPass(stream, windows, batch_size=1, label=label)
    hidden = passes.run()
    norm = stream.final_norm()
    normed = [norm(hidden[i])[0] for i in range(len(windows))]
    passes.close()
    vocab = stream.store.shape(stream.store.head_name())[0]
    if out is None:
        out = np.empty((*windows.shape, vocab), dtype=np.float32)
    # Logits a block of the head at a time for every window, then each window normalized in place.
    cap = getattr(stream.config, "final_logit_softcapping", None)  # Gemma's: logits squashed into ±cap
    for start, block in stream.head_blocks():
        for i, h in enumerate(normed):
            logits = h @ block.T
            out[i, :, start : start + len(block)] = (cap * torch.tanh(logits / cap) if cap else logits).numpy()
        del block
    for i in range(len(windows)):
        out[i] = log_probs(out[i]).numpy()
    return out


def reference_perplexity(ref_logps: Sequence[np.ndarray] | np.ndarray, windows: torch.Tensor) -> float:
    nll = sum(float(next_token_nll(torch.from_numpy(np.array(lp)), w).sum())
              for lp, w in zip(ref_logps, windows, strict=True))
    return float(np.exp(nll / sum(w.numel() - 1 for w in windows)))

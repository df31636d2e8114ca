"""Will recovery see enough text within its time budget? Estimated before any work from the model's
shapes and this CPU's measured matrix-multiply rate. Training costs ~4 FLOPs per weight per token
with LoRA (forward, and the backward pass to the activations) and ~6 with every weight trained; on
two CPU cores an 8B model trains a few tokens a second, far too few to recover anything in an
hour. Such a job is refused with the estimate, or runs on a CUDA device when torch sees one."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeprune.errors import EdgepruneError

if TYPE_CHECKING:
    from edgeprune.config import RecoverySettings
    from edgeprune.models.weights import WeightStore

log = logging.getLogger(__name__)

# benchmarks/recovery.py: KD LoRA recovered 69% of the lost KLD on 227k tokens; the first
# measurement 44% on ~60k. Fewer than this is time spent for little.
MIN_TOKENS = 50_000
# The share of a plain fp32 matmul's rate a training step reaches (attention, norms, the optimizer,
# Python): the embedded model at 1.8x trained 252 tokens/s (benchmarks/recovery.py; 0.42 GFLOP per
# token, so 107 GFLOP/s) on a host whose profile (latency/host.py) measures 211-224 GFLOP/s at 2 threads.
TRAINING_EFFICIENCY = 0.5


@dataclass(frozen=True)
class Pace:
    device: str  # "cpu" | "cuda"
    flops_per_token: float
    tokens_per_s: float | None  # None on CUDA: not estimated

    def tokens(self, minutes: float) -> float | None:
        return None if self.tokens_per_s is None else self.tokens_per_s * minutes * 60


def flops_per_token(store: WeightStore, method: str) -> float:
    """Training FLOPs per token of the (unpruned, so at most the pruned) model: the decoder's weights
    and the output head's logits."""
    from edgeprune.models.weights import EMBEDDING

    decoder = sum(math.prod(store.shape(n)) for n in store.names() if n.startswith("model.layers."))
    head = math.prod(store.shape(EMBEDDING))  # vocab x hidden, tied or not: the logits' matmul
    return (6 if method == "full" else 4) * decoder + 4 * head


def recovery_pace(store: WeightStore, settings: RecoverySettings, threads: int, cache_dir: Path) -> Pace:
    """How fast recovery of `store`'s model trains here: on CUDA, not estimated; on the CPU, from the
    host profile's matmul rate (measured once per CPU model and cached, as the latency model's)."""
    import torch

    from edgeprune.latency.host import host_profile

    flops = flops_per_token(store, settings.method)
    if torch.cuda.is_available():
        return Pace("cuda", flops, None)
    return Pace("cpu", flops, host_profile(cache_dir, threads).matmul_gflops * 1e9 * TRAINING_EFFICIENCY / flops)


def check_pace(pace: Pace, settings: RecoverySettings, parameters: int, flag: str) -> None:
    """Refuse, in one sentence with the estimate, a CPU recovery that would train on too little text;
    `flag` is the command's way to turn recovery off."""
    tokens = pace.tokens(settings.minutes)
    if tokens is None:
        log.info("recovery on CUDA (torch sees a GPU)")
        return
    log.info("recovery pace on this CPU: about %.0f tokens/s (%.1f GFLOP per token), %.0fk tokens in %g minutes",
             pace.tokens_per_s, pace.flops_per_token / 1e9, tokens / 1e3, settings.minutes)
    if settings.max_steps is not None:  # the user chose the amount of text
        return
    if tokens >= MIN_TOKENS:
        return
    need = MIN_TOKENS / pace.tokens_per_s / 60
    raise EdgepruneError(
        f"Recovery of this {parameters / 1e9:.1f}B-parameter model would train on about "
        f"{tokens / 1e3:.0f}k tokens in {settings.minutes:g} minutes on this CPU (about {pace.tokens_per_s:.1f} "
        f"tokens/s; it takes at least {MIN_TOKENS // 1000}k to pay): recover on a machine where torch sees a CUDA "
        f"GPU, give --recover-minutes {need:.0f} or more, or {flag}.")


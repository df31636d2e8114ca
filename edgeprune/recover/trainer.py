"""The lifecycle of one recovery: a pruned student made trainable (LoRA adapters or every decoder
weight), trained against stored teacher targets within a time budget, checkpointed so a killed run
resumes, and merged back into plain weights. The math is in `distill.py`.

Only decoder layers train: the embedding, final norm and output head stay the reference's (tied
on most small models; the teacher shares them), so a recovered model is the pruned one with some
decoder tensors replaced, as a sparse one is.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprune.config import RecoverySettings
from edgeprune.errors import EdgepruneError
from edgeprune.progress import progress_bar
from edgeprune.recover.distill import distillation_loss, next_token_loss

log = logging.getLogger(__name__)

CHECKPOINT = "state.pt"
WARMUP_STEPS = 10
FINAL_LR_SHARE = 0.1  # cosine decay to this share of the peak
# Decoder projections (every family's names, Phi-3's fused ones included); never the tied head.
LORA_TARGETS = (r".*layers\.\d+\.(self_attn|mlp)\."
                r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj)")
_LOG_EVERY_S = 30.0
MAX_SKIPPED = 20


@dataclass
class TrainingData:
    windows: torch.Tensor  # [n, seq_len] token ids
    teacher_logp: np.ndarray  # [n, seq_len, k] log-probabilities at the temperature (memory-mapped)
    teacher_index: np.ndarray  # [n, seq_len, k] their token ids

    def batch(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows_sorted = sorted(rows)  # memory-mapped reads in file order
        return (self.windows[rows_sorted], torch.from_numpy(np.ascontiguousarray(self.teacher_logp[rows_sorted])),
                torch.from_numpy(np.ascontiguousarray(self.teacher_index[rows_sorted])).long())


@dataclass
class TrainingLog:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0  # training wall time, across resumed runs
    longest_step_s: float = 0.0  # the budget is checked between steps: it can be overrun by up to one
    losses: list[float] = field(default_factory=list)  # per step
    resumed_at_step: int | None = None
    skipped: int = 0  # steps whose loss or gradient was not finite (not applied)
    stopped_by: str = ""  # "minutes" | "max_steps"

    def summary(self) -> dict[str, Any]:
        head, tail = self.losses[:10], self.losses[-10:]
        return {"steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 1),
                "first_loss": float(np.nanmean(head)) if head else None,
                "last_loss": float(np.nanmean(tail)) if tail else None,
                "resumed_at_step": self.resumed_at_step, "stopped_by": self.stopped_by, "skipped_steps": self.skipped}


def trainable(student: torch.nn.Module, settings: RecoverySettings) -> torch.nn.Module:
    """The student with what recovery trains marked trainable (and LoRA adapters added)."""
    for p in student.parameters():
        p.requires_grad_(False)
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                            target_modules=LORA_TARGETS, bias="none")
        with torch.random.fork_rng(), warnings.catch_warnings():
            # peft asks transformers 5 a deprecated question; nothing for the user to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(settings.seed)  # seeded adapters: a rerun, or a resumed run, starts from the same ones
            model = get_peft_model(student, config)
            # peft draws adapters in the base weight's dtype, then widens them: drawn again in fp32,
            # so a 16-bit base (student.py) starts from the same adapters as an fp32 one.
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.reset_lora_parameters("default", True)
            return model
    for p in student.model.layers.parameters():
        p.requires_grad_(True)
    return student


def merged(model: torch.nn.Module, settings: RecoverySettings) -> Iterator[tuple[str, torch.Tensor]]:
    """The trained decoder tensors as plain fp32 weights, by name in the pruned model, in layer order
    and one at a time: each adapted base weight widened with its LoRA delta added (a 16-bit base
    never takes the delta in 16 bits), or every decoder weight of a full fine-tune."""
    if settings.method == "lora":
        from peft.tuners.lora import LoraLayer

        pattern = re.compile(LORA_TARGETS)
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                name = name.removeprefix("base_model.model.")
                assert pattern.fullmatch(name), name
                with torch.no_grad():
                    weight = module.get_base_layer().weight.float() + module.get_delta_weight("default").float()
                yield f"{name}.weight", weight.cpu().contiguous()
        return
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            yield name, tensor.detach().float().cpu().contiguous()


def learning_rate(settings: RecoverySettings, step: int, done: float) -> float:
    """Linear warm-up, then cosine decay over the budget's share `done` (of minutes or steps)."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    cosine = FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return settings.peak_lr() * warm * cosine


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Window indices of a step: passes over the data, each in its own seeded order (a resumed run
    sees the same batches)."""
    rows = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(j, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        rows.append(int(order[i]))
    return rows


class Recovery:
    """Train `student` toward the teacher targets in `data`; `checkpoints` keeps state across kills."""

    def __init__(self, student: torch.nn.Module, data: TrainingData, settings: RecoverySettings, threads: int,
                 checkpoints: Path) -> None:
        self.settings, self.data, self.threads, self.checkpoints = settings, data, threads, checkpoints
        # A CUDA device when torch sees one (the same steps, far faster); else the CPU threads given.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = trainable(student, settings).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.peak_lr(), weight_decay=0.0)
        self.log = TrainingLog()

    def run(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Train; then the merged tensors (`merged`), one at a time."""
        s = self.settings
        budget = s.minutes * 60
        self._resume()
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        torch.set_flush_denormal(True)  # denormal gradients slow CPU training several-fold
        self.model.train()
        bar = progress_bar("recovery", budget, "s")
        bar.update(min(self.log.seconds, budget))
        last_save = last_log = time.monotonic()
        try:
            while True:
                if self.log.seconds >= budget:
                    self.log.stopped_by = "minutes"
                    break
                if s.max_steps is not None and self.log.steps >= s.max_steps:
                    self.log.stopped_by = "max_steps"
                    break
                t0 = time.perf_counter()
                loss = self._step()
                took = time.perf_counter() - t0
                self.log.seconds += took
                self.log.longest_step_s = max(self.log.longest_step_s, took)
                bar.update(min(took, max(0.0, budget - bar.n)))
                bar.set_postfix(loss=f"{loss:.3f}", step=self.log.steps)
                now = time.monotonic()
                if now - last_log >= _LOG_EVERY_S:
                    log.info("recovery step %d: KD loss %.4f, %.0f of %.0f s", self.log.steps, loss,
                             self.log.seconds, budget)
                    last_log = now
                if now - last_save >= s.checkpoint_seconds:
                    self._save()
                    last_save = now
        finally:
            bar.close()
            torch.set_num_threads(threads)
            torch.set_flush_denormal(False)
        self.model.eval()
        return merged(self.model, s)

    def _step(self) -> float:
        s = self.settings
        rows = batch_rows(self.log.steps, s.batch_size, len(self.data.windows), s.seed)
        tokens, t_logp, t_index = (t.to(self.device) for t in self.data.batch(rows))
        done = max(self.log.seconds / (s.minutes * 60), self.log.steps / s.max_steps if s.max_steps else 0.0)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(s, self.log.steps, done)
        with torch.enable_grad():
            logits = self.model(input_ids=tokens, use_cache=False).logits
            if s.objective == "kd":
                loss = distillation_loss(logits, t_logp, t_index, s.temperature)
            else:
                loss = next_token_loss(logits, tokens)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if torch.isfinite(loss) and torch.isfinite(norm):
            self.optimizer.step()
        else:  # one bad batch must not poison the weights: skip it, and say so if it keeps happening
            self.log.skipped += 1
            log.warning("recovery step %d: non-finite loss or gradient, step skipped (%d so far)", self.log.steps,
                        self.log.skipped)
            if self.log.skipped > MAX_SKIPPED:
                raise EdgepruneError(f"Recovery diverged: {self.log.skipped} steps gave non-finite gradients; lower "
                                     "[recovery] learning_rate.")
        self.log.steps += 1
        self.log.tokens += tokens.numel()
        value = loss.item()
        self.log.losses.append(value)
        return value

    # -- checkpoints ---------------------------------------------------------------------------
    def _trained_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _save(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoints / f"{CHECKPOINT}.tmp-{os.getpid()}"
        torch.save({"params": self._trained_state(), "optimizer": self.optimizer.state_dict(),
                    "log": asdict(self.log)}, tmp)
        os.replace(tmp, self.checkpoints / CHECKPOINT)  # a kill mid-save leaves the previous checkpoint
        log.debug("recovery checkpoint at step %d", self.log.steps)

    def _resume(self) -> None:
        path = self.checkpoints / CHECKPOINT
        if not path.is_file():
            return
        state = torch.load(path, weights_only=True, map_location=self.device)  # our own file; still never a pickle
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.log = TrainingLog(**state["log"])
        self.log.resumed_at_step = self.log.steps
        log.info("recovery resumed from its checkpoint at step %d (%.0f s trained)", self.log.steps, self.log.seconds)

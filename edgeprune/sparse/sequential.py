"""Sequential calibration, as the Wanda and SparseGPT reference implementations run it: capture
the calibration activations entering the first decoder layer, then for each layer in turn gather
its linear layers' input statistics, prune them, and run the *pruned* layer to produce the next
layer's inputs, so every layer is calibrated on what it will see after pruning upstream.

Working memory is one layer's statistics plus the activations of the calibration set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from edgeprune.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from edgeprune.progress import progress
from edgeprune.sparse.methods import SPARSE_METHODS, SparseSettings, needs_calibration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSparsity:
    name: str
    shape: tuple[int, int]
    zeros: int
    pruned: int  # entries of the method's mask (zeros may be more: weights that were zero already)

    @property
    def sparsity(self) -> float:
        return self.zeros / (self.shape[0] * self.shape[1])


@dataclass
class SparsifyReport:
    method: str
    settings: dict[str, Any]
    tensors: list[TensorSparsity] = field(default_factory=list)
    seconds: float = 0.0
    rss_before_bytes: int = 0
    peak_rss_bytes: int | None = None  # during the pass; None where the counter cannot be reset
    calibration_tokens: int = 0

    @property
    def overall(self) -> float:
        total = sum(t.shape[0] * t.shape[1] for t in self.tensors)
        return sum(t.zeros for t in self.tensors) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "settings": self.settings,
            "overall_sparsity": self.overall,
            "seconds": self.seconds,
            "rss_before_bytes": self.rss_before_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "calibration_tokens": self.calibration_tokens,
            "tensors": [asdict(t) | {"sparsity": t.sparsity} for t in self.tensors],
        }


class _StopForward(Exception):
    pass


@torch.no_grad()
def layer_inputs(model: Any, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(hidden states, keyword arguments) entering decoder layer 0, one pair per batch of windows.

    The model's own forward builds them (embeddings, RoPE cos/sin, mask), so every later layer is
    called exactly as the model would call it.
    """
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[start : start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def sparsify(model: Any, windows: torch.Tensor | None, method_name: str, settings: SparseSettings,
             batch_size: int = 4) -> SparsifyReport:
    """Prune every linear layer of every decoder layer of `model` in place (not the embeddings or
    the output head, as in the papers). `windows`: calibration token windows [n, seq_len]."""
    method = SPARSE_METHODS[method_name]()
    report = SparsifyReport(method_name, asdict(settings), rss_before_bytes=current_rss_bytes())
    can_reset = reset_peak_rss()
    t0 = time.perf_counter()
    needs_data = needs_calibration(method_name)
    if needs_data and (windows is None or len(windows) == 0):
        raise ValueError(f"{method_name} needs calibration windows")
    batches = layer_inputs(model, windows, batch_size) if needs_data else []
    report.calibration_tokens = int(windows.numel()) if needs_data else 0

    for i, layer in enumerate(progress(model.model.layers, f"{method_name}", total=len(model.model.layers))):
        linears = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        stats = {name: method.statistic(mod.in_features) for name, mod in linears.items()} if needs_data else {}
        handles = [mod.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0]))
                   for name, mod in linears.items() if needs_data]
        try:
            for hidden, kwargs in batches:
                layer(hidden, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, mod in linears.items():
            weight, mask = method.prune(mod.weight.data, stats.get(name), settings)
            mod.weight.data.copy_(weight)
            report.tensors.append(TensorSparsity(
                f"model.layers.{i}.{name}.weight", tuple(weight.shape), int((weight == 0).sum()), int(mask.sum())))
        del stats
        # The next layer sees what this one outputs once pruned.
        batches = [(layer(hidden, **kwargs), kwargs) for hidden, kwargs in batches]
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = peak_rss_bytes() if can_reset else None
    log.info("%s: %.1f%% of decoder weights zero in %.1f s", method_name, 100 * report.overall, report.seconds)
    return report

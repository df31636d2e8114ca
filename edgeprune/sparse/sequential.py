"""Sequential calibration, as the Wanda and SparseGPT reference implementations run it: for each
decoder layer in turn (a sequential pass, `models/streamed.py`) gather its linear layers' input
statistics, prune them, and run the *pruned* layer to produce the next layer's inputs, so every
layer is calibrated on what it will see after pruning upstream.

Working memory is one layer, its statistics and the activations of the calibration set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from edgeprune.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from edgeprune.models.streamed import DecoderStream, SequentialPass, as_stream
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


@torch.no_grad()
def sparsify_stream(stream: DecoderStream, windows: torch.Tensor | None, method_name: str, settings: SparseSettings,
                    on_layer: Callable[[int, nn.Module], None], batch_size: int = 4) -> SparsifyReport:
    """Prune every linear layer of every decoder layer of the stream's model (not the embeddings or
    the output head, as in the papers), one layer at a time; `on_layer(i, layer)` receives each
    pruned layer (to store its weights) before it produces the next layer's inputs.
    `windows`: calibration token windows [n, seq_len]."""
    method = SPARSE_METHODS[method_name]()
    report = SparsifyReport(method_name, asdict(settings), rss_before_bytes=current_rss_bytes())
    can_reset = reset_peak_rss()
    t0 = time.perf_counter()
    needs_data = needs_calibration(method_name)
    if needs_data and (windows is None or len(windows) == 0):
        raise ValueError(f"{method_name} needs calibration windows")
    report.calibration_tokens = int(windows.numel()) if needs_data else 0
    if not needs_data:  # no activations needed: a dummy window keeps the pass's shape
        windows = torch.zeros((0, 1), dtype=torch.long)

    for step in SequentialPass(stream, windows, batch_size, label=method_name):
        i, layer = step.index, step.layer
        linears = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        stats = {name: method.statistic(mod.in_features) for name, mod in linears.items()} if needs_data else {}
        handles = [mod.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0]))
                   for name, mod in linears.items() if needs_data]
        try:
            step.run()
        finally:
            for h in handles:
                h.remove()
        for name, mod in linears.items():
            weight, mask = method.prune(mod.weight.data, stats.get(name), settings)
            mod.weight.data.copy_(weight)
            report.tensors.append(TensorSparsity(
                f"model.layers.{i}.{name}.weight", tuple(weight.shape), int((weight == 0).sum()), int(mask.sum())))
        del stats
        on_layer(i, layer)
        step.advance()  # the next layer sees what this one outputs once pruned
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = peak_rss_bytes() if can_reset else None
    log.info("%s: %.1f%% of decoder weights zero in %.1f s", method_name, 100 * report.overall, report.seconds)
    return report


def linear_weights(index: int, layer: nn.Module) -> dict[str, torch.Tensor]:
    """A decoder layer's linear weights under their model-level names (what sparse methods change)."""
    return {f"model.layers.{index}.{name}.weight": m.weight.detach().contiguous()
            for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def decoder_linear_weights(model: Any) -> dict[str, torch.Tensor]:
    """Every decoder layer's linear weights of a model in memory, by name."""
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        out |= linear_weights(i, layer)
    return out


@torch.no_grad()
def load_weights(model: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Copy `tensors` into the model's parameters of the same names (in place)."""
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        params[name].copy_(tensor)
    return model


@torch.no_grad()
def sparsify(model: Any, windows: torch.Tensor | None, method_name: str, settings: SparseSettings,
             batch_size: int = 4) -> SparsifyReport:
    """`sparsify_stream` on an (unpruned) model in memory, its weights replaced in place."""
    return sparsify_stream(as_stream(model), windows, method_name, settings,
                           lambda i, layer: load_weights(model, linear_weights(i, layer)), batch_size)

"""Importance on the whole model in memory: what needs the loss at the output, and the reference
the layer-by-layer runner is checked against.

- states and activation statistics: hooks on every layer during ordinary forwards;
- loss increase: per batch, every layer's input and mid-layer residual are kept from one forward;
  skipping a block then re-runs only the layers after it (the layers before are unchanged);
- Taylor: one forward and backward per calibration window, accumulating the mean gradient and
  the mean squared per-window gradient (diagonal empirical Fisher, as LLM-Pruner's `acc_grad`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from functools import partial
from typing import Any

import torch
from torch import nn

from edgeprune.analysis.capture import LayerProbe, StateTally, StructuredImportance, layer_weights
from edgeprune.analysis.groups import module_groups
from edgeprune.analysis.layer_scores import token_nll
from edgeprune.analysis.methods import LayerImportance, UnitInputs
from edgeprune.memory import peak_rss_bytes, reset_peak_rss
from edgeprune.progress import progress
from edgeprune.prune.plan import ModelShape

log = logging.getLogger(__name__)


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


def _logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(hidden))


@torch.no_grad()
def _states_and_stats(model: Any, windows: torch.Tensor, tally: StateTally, stats: bool,
                      batch_size: int) -> list[LayerProbe]:
    probes = [LayerProbe(layer, states=bool(tally.methods), stats=stats) for layer in model.model.layers]
    with contextlib.ExitStack() as stack:
        for p in probes:
            stack.enter_context(p)
        for b, start in enumerate(progress(range(0, len(windows), batch_size), "states")):
            for i, p in enumerate(probes):
                p.on_states = partial(tally.add, i, b)
            model(input_ids=windows[start : start + batch_size], use_cache=False)
    return probes


@torch.no_grad()
def loss_scores(model: Any, windows: torch.Tensor, methods: list[LayerImportance],
                batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Token-averaged scores of the "loss" methods: NLL with each block skipped vs the full model.

    A skipped attention leaves h_mid = h_in and a skipped MLP leaves h_out = h_mid, exactly what the
    pruned model (`models.streamed.RemovedAttention` / `RemovedMLP`) computes.
    """
    layers = model.model.layers
    n_layers = len(layers)
    sums = {m.key: torch.zeros(n_layers - m.n + 1, dtype=torch.float64) for m in methods}
    counts = {m.key: 0 for m in methods}
    batches = layer_inputs(model, windows, batch_size)
    for b, (h0, kwargs) in enumerate(progress(batches, "loss increase")):
        ids = windows[b * batch_size : (b + 1) * batch_size]
        states: list[tuple[torch.Tensor, torch.Tensor]] = []  # (h_in, h_mid) of every layer
        hidden = h0
        for layer in layers:
            with LayerProbe(layer, on_states=lambda h_in, h_mid, _out, keep=states.append: keep((h_in, h_mid))):
                hidden = layer(hidden, **kwargs)
        base = token_nll(_logits(model, hidden), ids)
        for m in methods:
            for first in range(n_layers - m.n + 1):
                h_in, h_mid = states[first]
                if m.granularity == "layer":
                    hidden, resume = h_in, first + m.n
                elif m.granularity == "attention":
                    layer = layers[first]
                    hidden, resume = h_in + layer.mlp(layer.post_attention_layernorm(h_in)), first + 1
                else:
                    hidden, resume = h_mid, first + 1
                for layer in layers[resume:]:
                    hidden = layer(hidden, **kwargs)
                sums[m.key][first] += m.score(token_nll(_logits(model, hidden), ids), base).sum()
            counts[m.key] += base.numel()
    return {key: sums[key] / counts[key] for key in sums}


def gradients(model: Any, windows: torch.Tensor) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Per decoder layer, for its attention and MLP parameters: the gradient of the mean calibration
    loss, and the mean over windows of each window's squared gradient (diagonal empirical Fisher)."""
    layers = model.model.layers
    names = [(i, n) for i, layer in enumerate(layers) for n, _ in layer.named_parameters()
             if n.startswith(("self_attn.", "mlp."))]
    params = [layers[i].get_parameter(n) for i, n in names]
    flags = {p: p.requires_grad for p in model.parameters()}
    total = [torch.zeros_like(p) for p in params]
    squares = [torch.zeros_like(p) for p in params]
    try:
        for p in model.parameters():  # no gradients for embeddings or norms: nothing scores them
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for window in progress(windows, "gradients"):
                ids = window.unsqueeze(0)
                loss = token_nll(model(input_ids=ids, use_cache=False).logits, ids).mean()
                for t, s, g in zip(total, squares, torch.autograd.grad(loss, params), strict=True):
                    t += g
                    s += g.square()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    grads: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    fisher: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    for (i, n), t, s in zip(names, total, squares, strict=True):
        grads[i][n], fisher[i][n] = t / len(windows), s / len(windows)
    return grads, fisher


def analyse_model(model: Any, windows: torch.Tensor, layer_methods=(), unit_methods=(),
                  batch_size: int = 4) -> StructuredImportance:
    """Every registered kind of score, on a model held in memory. `windows`: token windows [n, seq_len]."""
    layer_methods, unit_methods = list(layer_methods), list(unit_methods)
    can_reset = reset_peak_rss()
    t0 = time.perf_counter()
    n_layers = len(model.model.layers)
    tally = StateTally(layer_methods, n_layers)
    needs_stats = any(m.needs == "activations" for m in unit_methods)
    result = StructuredImportance(runner="whole-model", calibration_tokens=int(windows.numel()))

    probes = _states_and_stats(model, windows, tally, needs_stats, batch_size) if tally.methods or needs_stats else []
    result.layer_scores = tally.result()
    loss_methods = [m for m in layer_methods if m.needs == "loss"]
    if loss_methods:
        result.layer_scores.update(loss_scores(model, windows, loss_methods, batch_size))
    grads = fisher = None
    if any(m.needs == "gradients" for m in unit_methods):
        grads, fisher = gradients(model, windows)

    head_dim = ModelShape.from_config(model.config).head_dim
    result.unit_scores = {m.name: [] for m in unit_methods}
    for i, layer in enumerate(model.model.layers if unit_methods else []):
        inputs = UnitInputs(layer_weights(layer), module_groups(layer, head_dim),
                            probes[i].stats if needs_stats else None,
                            grads[i] if grads else None, fisher[i] if fisher else None)
        for m in unit_methods:
            result.unit_scores[m.name].append(m.score(inputs))
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes() if can_reset else None
    log.info("whole-model importance in %.1f s", result.seconds)
    return result

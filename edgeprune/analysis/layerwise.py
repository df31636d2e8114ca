"""Layer-by-layer importance: one decoder layer's weights in memory at a time.

A sequential pass (`models/streamed.py`) loads each layer in turn; its probe collects what the
registered methods need while the layer runs every batch, and the layer is scored and released.
Working memory is the calibration activations plus one layer, so a model larger than RAM can be
analysed. Methods that need the loss or gradients need every later layer too: they run on the
whole model (`whole_model.analyse_model`) and are refused here.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import torch

from edgeprune.analysis.capture import LayerProbe, StateTally, StructuredImportance, layer_weights
from edgeprune.analysis.groups import module_groups
from edgeprune.analysis.methods import LayerImportance, UnitImportance, UnitInputs
from edgeprune.memory import peak_rss_bytes, reset_peak_rss
from edgeprune.models.streamed import DecoderStream, SequentialPass, as_stream
from edgeprune.prune.plan import ModelShape

log = logging.getLogger(__name__)


def _check(layer_methods: list[LayerImportance], unit_methods: list[UnitImportance]) -> None:
    whole = [m.key for m in layer_methods if m.needs != "states"]
    whole += [m.name for m in unit_methods if m.needs == "gradients"]
    if whole:
        raise ValueError(
            f"{', '.join(whole)} need the loss at the model's output (every later layer): run them with "
            "whole_model.analyse_model"
        )


@torch.no_grad()
def analyse_layerwise(source: DecoderStream | Any, windows: torch.Tensor, layer_methods=(), unit_methods=(),
                      batch_size: int = 4) -> StructuredImportance:
    """Scores of the "states" layer methods and the weight / activation unit methods, one layer at
    a time. `source`: a DecoderStream, or a model in memory. `windows`: token windows [n, seq_len]."""
    layer_methods, unit_methods = list(layer_methods), list(unit_methods)
    _check(layer_methods, unit_methods)
    source = as_stream(source)
    can_reset = reset_peak_rss()
    t0 = time.perf_counter()
    head_dim = ModelShape.from_config(source.config).head_dim
    needs_stats = any(m.needs == "activations" for m in unit_methods)
    tally = StateTally(layer_methods, source.n_layers)
    result = StructuredImportance(runner="layerwise", calibration_tokens=int(windows.numel()))
    result.unit_scores = {m.name: [] for m in unit_methods}

    for step in SequentialPass(source, windows, batch_size, label="importance"):
        i, layer = step.index, step.layer
        probe = LayerProbe(layer, states=bool(tally.methods), stats=needs_stats)

        def to_batch(b: int, i: int = i, probe: LayerProbe = probe) -> None:
            probe.on_states = partial(tally.add, i, b)

        with probe:
            step.advance(on_batch=to_batch)
        if unit_methods:
            inputs = UnitInputs(layer_weights(layer), module_groups(layer, head_dim), probe.stats or None)
            for m in unit_methods:
                result.unit_scores[m.name].append(m.score(inputs))
        del layer, probe
    result.layer_scores = tally.result()
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes() if can_reset else None
    log.info("layer-by-layer importance of %d layers in %.1f s", source.n_layers, result.seconds)
    return result

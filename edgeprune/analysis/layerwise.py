"""Layer-by-layer importance: one decoder layer's weights in memory at a time.

As sparse/sequential.py does, the calibration windows are run up to decoder layer 0 once; then
each layer in turn is loaded, runs every batch of activations (its probe collecting what the
registered methods need), is scored, hands its outputs on as the next layer's inputs, and is
released. Working memory is the calibration activations plus one layer, so with
`SafetensorsLayers` (tensors read one by one from the checkpoint) a model larger than RAM can be
analysed. Methods that need the loss or gradients need every later layer too: they run on the
whole model (`whole_model.analyse_model`) and are refused here.
"""

from __future__ import annotations

import copy
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from edgeprune.analysis.capture import LayerProbe, StateTally, StructuredImportance, layer_weights
from edgeprune.analysis.groups import module_groups
from edgeprune.analysis.methods import LayerImportance, UnitImportance, UnitInputs
from edgeprune.memory import peak_rss_bytes, reset_peak_rss, return_freed_memory
from edgeprune.prune.plan import ModelShape
from edgeprune.sparse.sequential import layer_inputs

log = logging.getLogger(__name__)

Batches = list[tuple[torch.Tensor, dict[str, Any]]]


class LayerSource(Protocol):
    config: Any
    n_layers: int

    def first_inputs(self, windows: torch.Tensor, batch_size: int) -> Batches:
        """(hidden states, keyword arguments) entering decoder layer 0, one pair per batch."""

    def load(self, index: int) -> nn.Module:
        """Decoder layer `index`, ready to run; the runner drops it when done."""


class InMemoryLayers:
    """The layers of a model already in memory (nothing is loaded or freed)."""

    def __init__(self, model: Any) -> None:
        self.model, self.config, self.n_layers = model, model.config, len(model.model.layers)

    def first_inputs(self, windows: torch.Tensor, batch_size: int) -> Batches:
        return layer_inputs(self.model, windows, batch_size)

    def load(self, index: int) -> nn.Module:
        return self.model.model.layers[index]


class SafetensorsLayers:
    """A Llama checkpoint directory read tensor by tensor: only the embeddings (while computing the
    first layer's inputs) and one decoder layer are ever in memory."""

    def __init__(self, directory: Path, dtype: torch.dtype = torch.float32) -> None:
        from safetensors import safe_open
        from transformers import AutoConfig, LlamaForCausalLM

        from edgeprune.models.reference import as_llama_config, weight_files

        self.dtype = dtype
        config = as_llama_config(AutoConfig.from_pretrained(directory), str(directory))
        # A skeleton on the meta device costs nothing and settles config details (attention
        # implementation) exactly as a loaded model would.
        with torch.device("meta"):
            self._skeleton = LlamaForCausalLM(config)
        self.config = self._skeleton.config
        self.n_layers = self.config.num_hidden_layers
        self._file_of: dict[str, Path] = {}
        for path in weight_files(directory):
            with safe_open(str(path), framework="pt") as f:
                self._file_of.update({name: path for name in f.keys()})

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for path in sorted({self._file_of[n] for n in names}):
            with safe_open(str(path), framework="pt") as f:  # closed at once: no mapping outlives the read
                out.update({n: f.get_tensor(n).to(self.dtype) for n in names if self._file_of[n] == path})
        return out

    def first_inputs(self, windows: torch.Tensor, batch_size: int) -> Batches:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        model = copy.deepcopy(self._skeleton)
        weight = self._read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        model.model.embed_tokens.load_state_dict({"weight": weight}, assign=True)
        # RoPE frequencies are buffers computed at construction: build them for real.
        model.model.rotary_emb = LlamaRotaryEmbedding(config=self.config)
        try:
            return layer_inputs(model, windows, batch_size)
        finally:
            del model

    def load(self, index: int) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        prefix = f"model.layers.{index}."
        tensors = self._read([n for n in self._file_of if n.startswith(prefix)])
        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, layer_idx=index)
        state = {n[len(prefix):]: t for n, t in tensors.items()}
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()


def _check(layer_methods: list[LayerImportance], unit_methods: list[UnitImportance]) -> None:
    whole = [m.key for m in layer_methods if m.needs != "states"]
    whole += [m.name for m in unit_methods if m.needs == "gradients"]
    if whole:
        raise ValueError(
            f"{', '.join(whole)} need the loss at the model's output (every later layer): run them with "
            "whole_model.analyse_model"
        )


@torch.no_grad()
def analyse_layerwise(source: LayerSource | Any, windows: torch.Tensor, layer_methods=(), unit_methods=(),
                      batch_size: int = 4) -> StructuredImportance:
    """Scores of the "states" layer methods and the weight / activation unit methods, one layer at
    a time. `source`: a LayerSource, or a model in memory. `windows`: token windows [n, seq_len]."""
    layer_methods, unit_methods = list(layer_methods), list(unit_methods)
    _check(layer_methods, unit_methods)
    if not hasattr(source, "first_inputs"):
        source = InMemoryLayers(source)
    can_reset = reset_peak_rss()
    t0 = time.perf_counter()
    head_dim = ModelShape.from_config(source.config).head_dim
    needs_stats = any(m.needs == "activations" for m in unit_methods)
    tally = StateTally(layer_methods, source.n_layers)
    result = StructuredImportance(runner="layerwise", calibration_tokens=int(windows.numel()))
    result.unit_scores = {m.name: [] for m in unit_methods}

    batches = source.first_inputs(windows, batch_size)
    for i in range(source.n_layers):
        layer = source.load(i)
        probe = LayerProbe(layer, states=bool(tally.methods), stats=needs_stats)
        outputs: Batches = []
        with probe:
            for b, (hidden, kwargs) in enumerate(batches):
                probe.on_states = partial(tally.add, i, b)
                outputs.append((layer(hidden, **kwargs), kwargs))
        if unit_methods:
            inputs = UnitInputs(layer_weights(layer), module_groups(layer, head_dim), probe.stats or None)
            for m in unit_methods:
                result.unit_scores[m.name].append(m.score(inputs))
        batches = outputs
        del layer, probe, outputs  # the layer's weights go now, before the next is read
        return_freed_memory()
        log.debug("layer %d scored", i)
    result.layer_scores = tally.result()
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes() if can_reset else None
    log.info("layer-by-layer importance of %d layers in %.1f s", source.n_layers, result.seconds)
    return result

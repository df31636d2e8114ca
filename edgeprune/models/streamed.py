"""A model's decoder one layer at a time: every torch pass of a build runs through here.

As llm-compressor's sequential pipeline does, the token windows are embedded once, then each
decoder layer in turn is read from the `WeightStore` (the plan's slices applied), runs every batch
of hidden states, hands its outputs on as the next layer's inputs, and is released. Working memory
is one layer plus the activations, which spill to disk beyond a budget; nothing holds the model.
The caller visits each layer (hooks for importance, the imatrix, sparse statistics) between its
load and its run.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.memory import return_freed_memory
from edgeprune.models.weights import FINAL_NORM, ModuleStore, WeightStore
from edgeprune.prune.apply import kept_layer_types, prune_layer
from edgeprune.prune.plan import LayerShape, ModelShape, Plan

log = logging.getLogger(__name__)

DEFAULT_ACTIVATION_BUDGET = 1 << 30
# The output head is converted to fp32 in row chunks of at most this many bytes.
HEAD_CHUNK_BYTES = 512 << 20
# A replacement for one tensor of the pruned model (the sparse methods' weights), by HF name.
Overrides = Mapping[str, Callable[[], torch.Tensor]]


def activation_budget() -> int:
    """Bytes of hidden states kept in RAM before they spill to disk (EDGEPRUNE_ACTIVATION_BUDGET)."""
    value = os.environ.get("EDGEPRUNE_ACTIVATION_BUDGET")
    return int(value) if value else DEFAULT_ACTIVATION_BUDGET


class Activations:
    """The hidden states of every batch, in RAM up to `budget` bytes and in .npy files beyond it."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = activation_budget() if budget is None else budget
        self._held: list[torch.Tensor | Path] = []
        self._bytes = 0
        self._dir: Path | None = None

    def append(self, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if self._bytes + size <= self.budget:
            self._held.append(hidden)
            self._bytes += size
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="edgeprune-activations-"))
            # Gone with this object (or at exit) even when no caller closes it: an error mid-pass,
            # or a pass whose last outputs nobody reads.
            self._remove = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        path = self._dir / f"{len(self._held)}.npy"
        np.save(path, hidden.numpy(), allow_pickle=False)
        self._held.append(path)

    @property
    def spilled(self) -> int:
        return sum(isinstance(h, Path) for h in self._held)

    def __len__(self) -> int:
        return len(self._held)

    def __getitem__(self, i: int) -> torch.Tensor:
        held = self._held[i]
        return torch.from_numpy(np.load(held, allow_pickle=False)) if isinstance(held, Path) else held

    def close(self) -> None:
        self._held.clear()
        if self._dir is not None:
            self._remove()
            self._dir = None


class RemovedAttention(nn.Module):
    """A layer's attention after pruning removed it: its residual branch is zero."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """A layer's MLP after pruning removed it: its residual branch is zero."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def layer_config(config: Any, layer_shape: LayerShape) -> Any:
    out = copy.deepcopy(config)
    # Stated, not derived: a config without head_dim (Qwen2's) would derive it from the pruned head count.
    out.head_dim = ModelShape.from_config(config).head_dim
    out.num_attention_heads = layer_shape.n_head or config.num_attention_heads
    out.num_key_value_heads = layer_shape.n_head_kv or config.num_key_value_heads
    out.intermediate_size = layer_shape.ffn or config.intermediate_size
    return out


def empty_layer(config: Any, layer_shape: LayerShape, index: int) -> nn.Module:
    """A decoder layer of `layer_shape` on the meta device (no storage), removed sublayers zeroed."""
    from edgeprune.families import family_of

    with torch.device("meta"):
        layer = family_of(config).decoder_layer(layer_config(config, layer_shape), index)
    if not layer_shape.has_attention:
        layer.self_attn, layer.input_layernorm = RemovedAttention(), nn.Identity()
    if not layer_shape.has_mlp:
        layer.mlp, layer.post_attention_layernorm = RemovedMLP(), nn.Identity()
    return layer


class _StopForward(Exception):
    pass


class _CaptureLayer(nn.Module):
    """Stands in for a decoder layer of the skeleton: records the keyword arguments the model calls
    it with and passes the hidden states on; the last one wanted stops the forward."""

    def __init__(self, captured: list[dict[str, Any]], last: bool) -> None:
        super().__init__()
        self.captured, self.last = captured, last

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.captured.append(kwargs | {"hidden_states": hidden_states})
        if self.last:
            raise _StopForward
        return hidden_states


class DecoderStream:
    """The decoder of `store`'s model with `plan` applied, one layer at a time, computing in `dtype`.

    `overrides` replace tensors of the pruned model by name (the sparse weights of a candidate).
    """

    def __init__(self, store: WeightStore, plan: Plan | None = None, overrides: Overrides | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        from edgeprune.families import family_of

        self.store, self.plan, self.dtype = store, plan or Plan(), dtype
        self.overrides = dict(overrides or {})
        self.shape = ModelShape.from_config(store.config)
        self.plan.validate(self.shape)
        self.kept = self.plan.kept_layers(self.shape)
        self.layer_shapes = self.plan.layer_shapes(self.shape)
        # A skeleton on the meta device settles config details (attention implementation) exactly as
        # a loaded model would, and computes each layer's keyword arguments (RoPE, mask).
        with torch.device("meta"):
            self._skeleton = family_of(store.config).causal_lm(store.config)
        self.config = self._skeleton.config
        # Kept layer i is built as layer i of the pruned model: its attention type is the original's.
        self._kept_config = kept_layer_types(self.config, self.kept)
        self.n_layers = len(self.kept)

    # -- what enters layer 0 -------------------------------------------------------------------
    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        from edgeprune.families import family_of

        rows = self.store.rows("model.embed_tokens.weight", windows.reshape(-1)).reshape(
            *windows.shape, -1).to(self.dtype)
        scale = family_of(self.config).embedding_scale(self.config)
        # As transformers scales: by the scale rounded to the weights' dtype.
        return rows if scale == 1.0 else rows * torch.tensor(scale, dtype=self.dtype)

    @torch.no_grad()
    def first_inputs(self, windows: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Hidden states entering decoder layer 0 for one batch of windows, and the keyword arguments
        of each kept layer. The model's own forward builds them, so every layer is called as the model
        calls it: layers of another attention type (Gemma 3's sliding and global layers) get another
        mask and other rotary embeddings."""
        from edgeprune.families import family_of

        model = self._skeleton.model
        if not hasattr(self, "_rotary"):
            self._rotary = family_of(self.config).rotary_embedding(self.config)  # buffers computed for real
        captured: list[dict[str, Any]] = []
        last = self.kept[-1] if self.kept else 0
        meta_layers, meta_rotary = model.layers, model.rotary_emb
        model.layers = nn.ModuleList(_CaptureLayer(captured, i == last) for i in range(len(meta_layers)))
        model.rotary_emb = self._rotary
        try:
            model(inputs_embeds=self.embed(windows), use_cache=False)
        except _StopForward:
            pass
        finally:
            model.layers, model.rotary_emb = meta_layers, meta_rotary
        hidden = captured[0]["hidden_states"]
        kwargs = [{k: v for k, v in captured[old].items() if k != "hidden_states"} for old in self.kept]
        return hidden, kwargs

    # -- one layer -----------------------------------------------------------------------------
    def load(self, i: int) -> nn.Module:
        """Kept layer `i` (new numbering), its tensors read, sliced by the plan, in `dtype`."""
        old = self.kept[i]
        tensors = prune_layer(self.store.layer(old), old, self.plan, self.shape)
        prefix = f"model.layers.{i}."
        for name in tensors:
            if prefix + name in self.overrides:
                tensors[name] = self.overrides[prefix + name]()
        layer = empty_layer(self._kept_config, self.layer_shapes[i], i)
        layer.load_state_dict({k: v.to(self.dtype) for k, v in tensors.items()}, strict=True, assign=True)
        return layer.eval()

    # -- the output head -----------------------------------------------------------------------
    def final_norm(self) -> nn.Module:
        from edgeprune.families import family_of

        norm = family_of(self.config).final_norm(self.config)
        norm.weight.data = self.store.read(FINAL_NORM).to(self.dtype)
        return norm

    def head_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The output projection in row blocks of at most HEAD_CHUNK_BYTES in `dtype`, each with its
        first row: the head (2 GiB of fp32 for Llama-3's vocabulary at 4096) is never whole in RAM."""
        name = self.store.head_name()
        vocab, hidden = self.store.shape(name)
        rows = max(1, HEAD_CHUNK_BYTES // (hidden * torch.finfo(self.dtype).bits // 8))
        for start in range(0, vocab, rows):
            yield start, self.store.row_block(name, start, min(start + rows, vocab)).to(self.dtype)


def as_stream(source: Any) -> DecoderStream:
    """A stream as is; a store, or a (unpruned) model in memory, streamed whole."""
    if isinstance(source, DecoderStream):
        return source
    return DecoderStream(source if isinstance(source, WeightStore) else ModuleStore(source))


class LayerStep:
    """One layer of a sequential pass: the caller hooks `layer`, then runs it (or lets the pass do so)."""

    def __init__(self, index: int, layer: nn.Module, inputs: Activations, kwargs: list[dict[str, Any]]) -> None:
        self.index, self.layer, self.inputs, self.kwargs = index, layer, inputs, kwargs
        self.outputs: Activations | None = None

    @torch.no_grad()
    def run(self, on_batch: Callable[[int], None] | None = None) -> None:
        """Every batch through the layer, outputs discarded (statistics are gathered by hooks)."""
        for b in range(len(self.inputs)):
            if on_batch is not None:
                on_batch(b)
            self.layer(self.inputs[b], **self.kwargs[b])

    @torch.no_grad()
    def advance(self, on_batch: Callable[[int], None] | None = None) -> None:
        """Every batch through the layer, outputs kept as the next layer's inputs."""
        outputs = Activations(self.inputs.budget)
        for b in range(len(self.inputs)):
            if on_batch is not None:
                on_batch(b)
            out = self.layer(self.inputs[b], **self.kwargs[b])
            outputs.append(out[0] if isinstance(out, tuple) else out)
        self.outputs = outputs


class SequentialPass:
    """Iterate a stream's layers over token windows; afterwards `hidden` holds the last layer's outputs.

    for step in SequentialPass(stream, windows):
        ...hook step.layer, then step.advance() (called for you if you do not)
    """

    def __init__(self, stream: DecoderStream, windows: torch.Tensor, batch_size: int = 4,
                 budget: int | None = None, label: str | None = None) -> None:
        self.stream, self.windows, self.batch_size, self.budget = stream, windows, batch_size, budget
        self.label = label
        self.hidden: Activations | None = None
        self.kwargs: list[list[dict[str, Any]]] = []  # per batch, per layer
        self.spilled = 0

    def __iter__(self) -> Iterator[LayerStep]:
        from edgeprune.progress import progress

        hidden = Activations(self.budget)
        try:
            for start in range(0, len(self.windows), self.batch_size):
                h, kw = self.stream.first_inputs(self.windows[start : start + self.batch_size])
                hidden.append(h)
                self.kwargs.append(kw)
            layers = range(self.stream.n_layers)
            for i in progress(layers, self.label, total=len(layers)) if self.label else layers:
                step = LayerStep(i, self.stream.load(i), hidden, [kw[i] for kw in self.kwargs])
                yield step
                if step.outputs is None:
                    step.advance()
                self.spilled = max(self.spilled, hidden.spilled)
                hidden.close()
                hidden = step.outputs
                del step  # the layer's weights go now, before the next is read
                return_freed_memory()
        except BaseException:  # an error, or a caller that stopped early: the spill files go now
            hidden.close()
            raise
        self.hidden = hidden

    def run(self) -> Activations:
        for _ in self:
            pass
        return self.hidden

    def close(self) -> None:
        if self.hidden is not None:
            self.hidden.close()

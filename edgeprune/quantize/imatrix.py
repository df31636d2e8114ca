"""Importance matrix for llama.cpp's quantizer: mean x^2 of every input column of every matmul.

The accumulation is a pure function (tested on small tensors); the hooks only feed it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.families import family_of
from edgeprune.models.streamed import SequentialPass, as_stream

TOKEN_EMBD = "token_embd.weight"


def add_squares(total: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`total` plus the per-column sum of squares of `x` (any leading dims); and the row count."""
    rows = x.reshape(-1, x.shape[-1]).double()
    return total + rows.square().sum(dim=0), rows.shape[0]


@torch.no_grad()
def collect_imatrix(source: Any, windows: torch.Tensor, batch_size: int = 4) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean x^2 per input column, over `windows` (calibration tokens only).

    `source`: the candidate's DecoderStream (its plan and sparse weights applied), or a model in
    memory. One layer at a time: hooks on every nn.Linear of the layer in hand (so per-layer
    pruned shapes need no special case), then the output head on the last layer's outputs.

    Tied embeddings: the GGUF has no `output`, llama.cpp's output matmul multiplies by
    `token_embd`, so the lm_head's statistics go under `token_embd.weight` -- as llama.cpp's own
    llama-imatrix records them (it names an entry after the matmul's weight). llama-quant.cpp uses
    the entry when its size matches (a mismatch is skipped for token_embd only). It changes
    nothing under llama.cpp's default type for a 576-wide tied output (Q8_0 ignores weights);
    with a Q5_0 output (recipes.py) it lowered mean KLD 0.106 -> 0.097 on the embedded model,
    in 8 of 8 held-out windows (benchmarks/quant.py). The input embedding lookup is no matmul:
    an untied `token_embd` gets no entry.
    """
    stream = as_stream(source)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def add(name: str, x: torch.Tensor) -> None:
        total, n = add_squares(sums.get(name, torch.zeros(x.shape[-1], dtype=torch.float64)), x)
        sums[name], rows[name] = total, rows.get(name, 0) + n

    gguf_tensor_name = family_of(stream.store.config).gguf_name
    passes = SequentialPass(stream, windows, batch_size, label="imatrix")
    for step in passes:
        linears = {gguf_tensor_name(f"model.layers.{step.index}.{name}.weight"): module
                   for name, module in step.layer.named_modules() if isinstance(module, nn.Linear)}
        handles = [module.register_forward_pre_hook(lambda _m, args, n=n: add(n, args[0]))
                   for n, module in linears.items()]
        try:
            step.advance()
        finally:
            for h in handles:
                h.remove()
    head = TOKEN_EMBD if stream.store.tied else gguf_tensor_name("lm_head.weight")
    norm = stream.final_norm()
    for b in range(len(passes.hidden)):
        add(head, norm(passes.hidden[b]))
    passes.close()
    return {name: (total / rows[name]).float().numpy() for name, total in sums.items()}

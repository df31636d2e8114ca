"""Importance matrix for llama.cpp's quantizer: mean x^2 of every input column of every matmul.

The accumulation is a pure function (tested on small tensors); the hooks only feed it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.export.gguf_llama import gguf_tensor_name
from edgeprune.progress import progress

TOKEN_EMBD = "token_embd.weight"


def add_squares(total: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`total` plus the per-column sum of squares of `x` (any leading dims); and the row count."""
    rows = x.reshape(-1, x.shape[-1]).double()
    return total + rows.square().sum(dim=0), rows.shape[0]


@torch.no_grad()
def collect_imatrix(model: Any, windows: torch.Tensor, batch_size: int = 4) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean x^2 per input column, over `windows` (calibration tokens only).

    Hooks every nn.Linear, so per-layer pruned shapes need no special case.

    Tied embeddings: the GGUF has no `output`, llama.cpp's output matmul multiplies by
    `token_embd`, so the lm_head's statistics go under `token_embd.weight` -- as llama.cpp's own
    llama-imatrix records them (it names an entry after the matmul's weight). llama-quant.cpp uses
    the entry when its size matches (a mismatch is skipped for token_embd only). It changes
    nothing under llama.cpp's default type for a 576-wide tied output (Q8_0 ignores weights);
    with a Q5_0 output (recipes.py) it lowered mean KLD 0.106 -> 0.097 on the embedded model,
    in 8 of 8 held-out windows (benchmarks/quant.py). The input embedding lookup is no matmul:
    an untied `token_embd` gets no entry.
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def hook(name: str):
        def fn(module: nn.Linear, args: tuple) -> None:
            total, n = add_squares(sums.get(name, torch.zeros(module.in_features, dtype=torch.float64)), args[0])
            sums[name], rows[name] = total, rows.get(name, 0) + n

        return fn

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = TOKEN_EMBD if module_name == "lm_head" and tied else gguf_tensor_name(module_name + ".weight")
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        for start in progress(range(0, len(windows), batch_size), "imatrix"):
            model(input_ids=windows[start : start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: (total / rows[name]).float().numpy() for name, total in sums.items()}

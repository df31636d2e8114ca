"""GPTQ (Frantar et al., arXiv 2210.17323) onto MatMulNBits' block grid: quantize a weight one input
column at a time, and spread each column's rounding error over the columns not yet quantized with
the inverse Hessian of the layer's calibration inputs (the OBS update SparseGPT uses for pruning),
so the layer's output on those inputs moves as little as possible.

Each block of `block` columns takes its grid (scale, zero point) from the weights as the updates
have left them when the block starts, the reference's `groupsize` behaviour without act-order: the
columns stay in order, so a block is what MatMulNBits reads. Pure tensor code.
"""

from __future__ import annotations

import numpy as np
import torch

from edgeprune.runtimes.onnx import nbits
from edgeprune.sparse.sparsegpt import inverse_hessian_factor, single_thread

LAZY = 128  # columns whose updates are applied to the rest at once


def gptq(weight: np.ndarray, hessian: torch.Tensor, bits: int, block: int, symmetric: bool,
         percdamp: float = 0.01) -> nbits.Packed:
    """weight (N, K) float32, hessian (K, K) of its inputs -> the packed weight."""
    with single_thread():
        return _gptq(torch.from_numpy(np.asarray(weight, np.float32)), hessian, bits, block, symmetric, percdamp)


def _gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, block: int, symmetric: bool,
          percdamp: float) -> nbits.Packed:
    rows, k = w.shape
    k_blocks = -(-k // block)
    cols = k_blocks * block  # zero-padded columns: their inputs are zero, their weights stay zero
    w_pad = torch.zeros(rows, cols)
    w_pad[:, :k] = w
    h = torch.zeros(cols, cols)
    h[:k, :k] = hessian.float()
    hinv = inverse_hessian_factor(w_pad, h, percdamp)

    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    scale = torch.zeros(rows, k_blocks)
    zero = torch.zeros(rows, k_blocks, dtype=torch.int32)
    levels = (1 << bits) - 1
    for i1 in range(0, cols, LAZY):
        i2 = min(i1 + LAZY, cols)
        w1 = w_pad[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:  # the block's grid, from the weights as updated so far
                ahead = torch.cat([w1[:, i:], w_pad[:, i2:]], dim=1)[:, :block].numpy()
                s, z = nbits.block_grid(ahead[:, None, :], bits, symmetric)
                scale[:, col // block] = torch.from_numpy(s[:, 0])
                zero[:, col // block] = torch.from_numpy(z[:, 0])
            s, z = scale[:, col // block], zero[:, col // block].float()
            safe = torch.where(s == 0, torch.ones_like(s), s)
            q = torch.clamp(torch.floor(w1[:, i] / safe + z + 0.5), 0, levels)
            codes[:, col] = q.to(torch.uint8)
            e = (w1[:, i] - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w_pad[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return nbits.packed(codes.numpy().reshape(rows, k_blocks, block), scale.numpy(), zero.numpy(), k, bits, block,
                        symmetric)

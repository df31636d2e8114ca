"""Block-wise 4- and 8-bit weights for ONNX Runtime's `MatMulNBits` (com.microsoft), in numpy.

A weight W is (N, K), HF's (out, in). Blocks of `block` values run along K (the last one padded
with zeros). Per block a float32 scale and an integer zero point; a value is stored as
q = clip(floor(w / scale + zp + 0.5)) and read back as (q - zp) * scale. The layouts:

- B: uint8 (N, K_blocks, block * bits / 8); 4-bit codes two per byte, the even one in the low nibble;
- scales: float32 (N, K_blocks);
- zero points: uint8 (N, ceil(K_blocks * bits / 8)), packed like B (a spare nibble holds 8); absent
  for symmetric weights, where the runtime takes 2^(bits-1).

Asymmetric blocks span [min(w, 0), max(w, 0)]; symmetric ones map the value of largest magnitude
to -2^(bits-1). The rounding is computed in float32, as ONNX Runtime's own packer does, so the bytes
equal the ones it writes (tests/test_onnx_nbits.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = (4, 8)


@dataclass(frozen=True)
class Packed:
    """One weight as MatMulNBits reads it."""

    weight: np.ndarray  # uint8 (N, K_blocks, block * bits / 8)
    scales: np.ndarray  # float32 (N, K_blocks)
    zero_points: np.ndarray | None  # uint8, packed; None when symmetric
    k: int
    bits: int
    block: int


def blocks_of(w: np.ndarray, block: int) -> np.ndarray:
    """(N, K) -> (N, K_blocks, block) float32, the last block padded with zeros."""
    n, k = w.shape
    k_blocks = -(-k // block)
    padded = np.zeros((n, k_blocks * block), np.float32)
    padded[:, :k] = w
    return padded.reshape(n, k_blocks, block)


def block_grid(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int32) of every block of (N, K_blocks, block) values."""
    levels = (1 << bits) - 1
    if symmetric:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        scale = (extreme / -(1 << (bits - 1))).astype(np.float32)
        return scale, np.full(scale.shape, 1 << (bits - 1), np.int32)
    low = np.minimum(blocks.min(-1), 0.0)
    high = np.maximum(blocks.max(-1), 0.0)
    scale = ((high - low) / levels).astype(np.float32)
    zero = np.clip(np.rint(-low / _nonzero(scale)), 0, levels).astype(np.int32)
    return scale, zero


def _nonzero(scale: np.ndarray) -> np.ndarray:
    return np.where(scale == 0, np.float32(1), scale)


def codes(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """The integer codes of (N, K_blocks, block) values on a given grid (uint8)."""
    q = np.floor(blocks / _nonzero(scale)[..., None] + zero[..., None].astype(np.float32) + np.float32(0.5))
    return np.clip(q, 0, (1 << bits) - 1).astype(np.uint8)


def _pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """4-bit codes two per byte along the last axis (even index low); 8-bit as they are."""
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.full((*q.shape[:-1], 1), 8, np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def pack(w: np.ndarray, bits: int, block: int, symmetric: bool) -> Packed:
    """Round-to-nearest quantization of w (N, K) on each block's own grid."""
    if bits not in BITS:
        raise ValueError(f"bits {bits}: MatMulNBits weights here are {BITS}")
    blocks = blocks_of(np.asarray(w, np.float32), block)
    scale, zero = block_grid(blocks, bits, symmetric)
    return packed(codes(blocks, scale, zero, bits), scale, zero, w.shape[1], bits, block, symmetric)


def packed(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, k: int, bits: int, block: int,
           symmetric: bool) -> Packed:
    """Codes (N, K_blocks, block) and their grid, in MatMulNBits' layout."""
    zero_points = None if symmetric else _pack_codes(zero.astype(np.uint8), bits)
    return Packed(_pack_codes(q, bits), scale.astype(np.float32), zero_points, k, bits, block)


def unpack(p: Packed) -> np.ndarray:
    """The (N, K) float32 weight the runtime computes with."""
    n, k_blocks, _ = p.weight.shape
    if p.bits == 4:
        q = np.stack([p.weight & 0x0F, p.weight >> 4], -1).reshape(n, k_blocks, -1)
    else:
        q = p.weight
    if p.zero_points is None:
        zero = np.full((n, k_blocks), 1 << (p.bits - 1), np.float32)
    elif p.bits == 4:
        zero = np.stack([p.zero_points & 0x0F, p.zero_points >> 4], -1).reshape(n, -1)[:, :k_blocks]
    else:
        zero = p.zero_points
    values = (q.astype(np.float32) - zero.astype(np.float32)[..., None]) * p.scales[..., None]
    return values.reshape(n, -1)[:, :p.k]

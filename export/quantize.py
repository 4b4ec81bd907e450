"""Block-wise int4/int8 weight quantization in the layout of ORT's com.microsoft MatMulNBits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = {"int4": 4, "int8": 8}


@dataclass
class BlockQuantized:
    """A [N, K] weight quantized per block of `block_size` inputs, ready for MatMulNBits.

    `packed` is uint8 [N, k_blocks, block_size * bits / 8]; `scales` float32 [N * k_blocks];
    `zero_points` uint8 packed like MatMulNBits wants ([N * ceil(k_blocks * bits / 8)]) or None
    for symmetric weights (the op then assumes the mid-point 2**(bits-1)). `offsets` float32
    [N, k_blocks] or None: a per-block term added to every weight of the block (the `m` of
    GGUF's Q4_1, `d * q + m`), which integer zero points cannot hold; the graph adds
    `block sums of x @ offsets.T` to the op's output (export.graph_fused).
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    n: int
    k: int
    bits: int
    block_size: int
    offsets: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """The float32 [N, K] weight the op computes with (used by tests and accuracy checks)."""
        q = _unpack(self.packed, self.bits).astype(np.float32)  # [N, k_blocks, block_size]
        k_blocks = q.shape[1]
        scales = self.scales.reshape(self.n, k_blocks, 1)
        if self.zero_points is None:
            zp = np.float32(2 ** (self.bits - 1))
        else:
            zp = _unpack(self.zero_points.reshape(self.n, -1), self.bits)[:, :k_blocks]
            zp = zp.astype(np.float32)[..., None]
        w = (q - zp) * scales
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(self.n, -1)[:, : self.k]


def _unpack(data: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes -> one value per element along the last axis (low nibble first for 4 bits)."""
    if bits == 8:
        return data
    low, high = data & 0x0F, data >> 4
    return np.stack([low, high], axis=-1).reshape(*data.shape[:-1], -1)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Values in [0, 2**bits) along the last axis -> uint8 bytes (even index in the low nibble)."""
    q = q.astype(np.uint8)
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.uint8)], axis=-1)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _check(bits: int, block_size: int, weight: np.ndarray) -> np.ndarray:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {w.shape}")
    return w


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """[N, K] -> [N, k_blocks, block_size], zero-padded along K."""
    n, k = w.shape
    k_blocks = -(-k // block_size)
    if k_blocks * block_size != k:
        w = np.pad(w, ((0, 0), (0, k_blocks * block_size - k)))
    return w.reshape(n, k_blocks, block_size)


def on_symmetric_grid(weight: np.ndarray, *, bits: int, block_size: int = 32) -> bool:
    """True when every block is exactly `d * q` with integer |q| <= 2**(bits-1) - 1 and the
    block's largest |value| at the top level: a dequantized GGUF Q8_0 (8 bits) tensor. Such a
    tensor quantizes symmetrically without any loss."""
    blocks = _blocks(_check(bits, block_size, weight), block_size)
    top = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(top)
    safe = np.where(scales == 0, 1.0, scales).astype(np.float32)
    return bool(np.all(np.rint(blocks / safe) * scales == blocks))


def quantize_affine(weight: np.ndarray, *, bits: int = 4, block_size: int = 32) -> BlockQuantized:
    """Quantize a float [N, K] weight as `scale * q + min` per block, q in 0..2**bits-1.

    Each block maps [min, max] onto the levels (Q4_1's rule), so a block whose values already
    lie on 2**bits evenly spaced levels from its minimum (a dequantized GGUF Q4_1 block) is
    reproduced exactly (to float32 rounding); other blocks are rounded to the nearest level.
    The op sees `scale * (q - zero_point)` with the integer zero point nearest to -min/scale;
    what that leaves of the minimum (at most half a step for a block that straddles 0) is the
    float `offsets` (see
    BlockQuantized). Keeping the op's part centred keeps its int8-activation error that of the
    weight itself (a zero point of 0 would double it).
    """
    w = _check(bits, block_size, weight)
    n, k = w.shape
    blocks = _blocks(w, block_size)
    qmax = 2**bits - 1
    lo = blocks.min(axis=-1, keepdims=True)
    scales = ((blocks.max(axis=-1, keepdims=True) - lo) / np.float32(qmax)).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales).astype(np.float32)
    q = np.clip(np.rint((blocks - lo) / safe), 0, qmax)
    zp = np.clip(np.rint(-lo / safe), 0, qmax).astype(np.float32)
    offsets = (lo + scales * zp).astype(np.float32)  # (q - zp) * scale + offsets = scale*q + lo
    return BlockQuantized(
        packed=_pack(q, bits),
        scales=scales.reshape(-1),
        zero_points=_pack(zp[..., 0], bits).reshape(-1),
        n=n,
        k=k,
        bits=bits,
        block_size=block_size,
        offsets=offsets[..., 0],
    )


def quantize_blockwise(
    weight: np.ndarray,
    *,
    bits: int,
    block_size: int = 32,
    symmetric: bool = False,
) -> BlockQuantized:
    """Quantize a float [N, K] weight (out, in) block-wise along K.

    Asymmetric: each block maps [min, max] (widened to include 0) onto 0..2**bits-1 with a zero
    point. Symmetric: each block maps [-absmax, absmax] around the fixed mid-point, no zero points.
    """
    w = _check(bits, block_size, weight)
    n, k = w.shape
    blocks = _blocks(w, block_size)
    qmax = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        absmax = np.abs(blocks).max(axis=-1, keepdims=True)
        scales = absmax / (mid - 1)
        safe = np.where(scales == 0, 1.0, scales)
        q = np.clip(np.rint(blocks / safe) + mid, 0, qmax)
        zero_points = None
    else:
        lo = np.minimum(blocks.min(axis=-1, keepdims=True), 0.0)
        hi = np.maximum(blocks.max(axis=-1, keepdims=True), 0.0)
        scales = (hi - lo) / qmax
        safe = np.where(scales == 0, 1.0, scales)
        zp = np.clip(np.rint(-lo / safe), 0, qmax)
        q = np.clip(np.rint(blocks / safe) + zp, 0, qmax)
        zero_points = _pack(zp[..., 0], bits).reshape(-1)
    return BlockQuantized(
        packed=_pack(q, bits),
        scales=scales.astype(np.float32).reshape(-1),
        zero_points=zero_points,
        n=n,
        k=k,
        bits=bits,
        block_size=block_size,
    )

"""64-bit key mixing shared by the data layer (numpy) and the parameter server (torch).

``mix64`` is the splitmix64 finalizer: a bijection on 64-bit integers that spreads
sequential or skewed ids over all bits. Both versions give identical results (tested):
int64 values are read as their two's-complement uint64 bits.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

MIX_M1 = 0xBF58476D1CE4E5B9
MIX_M2 = 0x94D049BB133111EB
GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1  # a Python int as uint64


def as_int64(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``x`` in ``[0, 2**64)``."""
    return x - (1 << 64) if x >= 1 << 63 else x


def mix64_np(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64/int64 array; returns uint64 (same shape)."""
    z = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(MIX_M1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(MIX_M2)
        z ^= z >> np.uint64(31)
    return z


_LANE = np.uint64(0xFFFF)


def hash_lanes(h: np.ndarray, k: int) -> np.ndarray:
    """``k <= 4`` uniforms in [-1, 1) from the 16-bit lanes of uint64 ``h``: float32
    ``[..., k]`` (lane ``j`` is bits ``16j .. 16j+15``)."""
    out = np.empty(h.shape + (k,), dtype=np.float32)
    for j in range(k):
        lane = ((h >> np.uint64(16 * j)) & _LANE).astype(np.float32)
        out[..., j] = lane * (2.0 / 65536.0) - 1.0
    return out


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64_torch(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on an int64 tensor (any device); returns int64 (same shape).

    int64 multiplication wraps modulo 2^64 in torch, which is what the mixer needs.
    """
    z = x.to(torch.int64)
    z = z ^ _srl(z, 30)
    z = z * as_int64(MIX_M1)
    z = z ^ _srl(z, 27)
    z = z * as_int64(MIX_M2)
    z = z ^ _srl(z, 31)
    return z


@functools.lru_cache(maxsize=4096)
def salt_for(name: str) -> int:
    """Deterministic 64-bit salt (as int64) for a feature or table name (not Python's hash)."""
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & ((1 << 64) - 1)
    return as_int64(int(mix64_np(np.array([h], dtype=np.uint64))[0]))

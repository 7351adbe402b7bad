"""Row initialisers that are a pure function of (table seed, key).

A row created on first touch gets the same values whichever rank, tier or step creates
it, so a sharded or tiered table is comparable bit for bit with a dense reference whose
row ``i`` was initialised with :func:`init_rows` of key ``i``.
"""

from __future__ import annotations

import math

import torch

from terarec.config import InitConfig, InitKind
from terarec.hashing import GOLDEN, _signed, mix64_torch

_COL = _signed(0xD6E8FEB86659FD93)


def _uniform01(keys: torch.Tensor, cols: int, seed: int, offset: int = 0) -> torch.Tensor:
    """Deterministic U[0, 1) ``[N, cols]`` float64 from keys ``[N]``."""
    col = torch.arange(offset + 1, offset + cols + 1, device=keys.device, dtype=torch.int64)
    z = mix64_torch(keys.unsqueeze(1) ^ (col * _COL)) ^ _signed(seed * GOLDEN % (1 << 64))
    z = mix64_torch(z)
    return ((z >> 11) & ((1 << 53) - 1)).to(torch.float64) * (1.0 / (1 << 53))


def init_rows(keys: torch.Tensor, dim: int, cfg: InitConfig, seed: int) -> torch.Tensor:
    """Initial embedding weights for ``keys``.

    Args:
        keys: int64 ``[N]``.
        dim: row width.
        cfg: initializer kind and scale.
        seed: the table's seed (see :func:`table_seed`).
    Returns:
        float32 ``[N, dim]`` on ``keys.device``.
    """
    if cfg.kind == InitKind.ZEROS or keys.numel() == 0:
        return torch.zeros(keys.numel(), dim, device=keys.device)
    if cfg.kind == InitKind.UNIFORM:
        u = _uniform01(keys, dim, seed)
        return ((2.0 * u - 1.0) * cfg.scale).to(torch.float32)
    # Box-Muller from two independent uniform streams.
    u1 = _uniform01(keys, dim, seed).clamp_min(1e-300)
    u2 = _uniform01(keys, dim, seed, offset=dim)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return (z * cfg.scale).to(torch.float32)

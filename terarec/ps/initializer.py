"""Row initialisers that are a pure function of (table seed, key).

A row created on first touch gets the same values whichever rank, tier or step creates
it, so a sharded or tiered table is comparable bit for bit with a dense reference whose
row ``i`` was initialised with :func:`init_rows` of key ``i``.
"""

from __future__ import annotations

import math

import torch

from terarec.config import InitConfig, InitKind
from terarec.hashing import GOLDEN, as_int64, mix64_torch

_U24 = 1.0 / (1 << 24)


def _seed_term(seed: int | torch.Tensor) -> int | torch.Tensor:
    """``seed * GOLDEN mod 2^64`` as int64 (torch's int64 product wraps the same way)."""
    if isinstance(seed, torch.Tensor):
        return seed.to(torch.int64) * as_int64(GOLDEN)
    return as_int64(seed * GOLDEN % (1 << 64))


def _uniform01(keys: torch.Tensor, n: int, seed: int | torch.Tensor) -> torch.Tensor:
    """Deterministic U(0, 1) ``[N, n]`` float32 from keys ``[N]``.

    A splitmix64 stream per key: its state is ``mix64(key ^ seed)``, draw ``j`` is
    ``mix64(state + (j + 1) * GOLDEN)``; each 64-bit draw gives two 24-bit uniforms
    (high and low halves), centred in their bins so that 0 and 1 never occur.
    """
    draws = (n + 1) // 2
    state = mix64_torch(keys ^ _seed_term(seed))
    steps = torch.arange(1, draws + 1, device=keys.device, dtype=torch.int64) * as_int64(GOLDEN)
    z = mix64_torch(state.unsqueeze(1) + steps)  # [N, draws]
    halves = torch.stack([(z >> 40) & 0xFFFFFF, (z >> 8) & 0xFFFFFF], dim=2)
    u = (halves.view(keys.numel(), 2 * draws)[:, :n].to(torch.float32) + 0.5) * _U24
    return u


def init_rows(
    keys: torch.Tensor, dim: int, cfg: InitConfig, seed: int | torch.Tensor
) -> torch.Tensor:
    """Initial embedding weights for ``keys``.

    Args:
        keys: int64 ``[N]``.
        dim: row width.
        cfg: initializer kind and scale.
        seed: the table's seed (see :func:`table_seed`), or int64 ``[N]``: one per key
            (rows of several tables at once; row ``i`` equals its one-seed value).
    Returns:
        float32 ``[N, dim]`` on ``keys.device``.
    """
    if cfg.kind == InitKind.ZEROS or keys.numel() == 0:
        return torch.zeros(keys.numel(), dim, device=keys.device)
    if cfg.kind == InitKind.UNIFORM:
        return _uniform01(keys, dim, seed).mul_(2.0 * cfg.scale).sub_(cfg.scale)
    # Box-Muller over pairs of uniforms.
    u = _uniform01(keys, 2 * dim, seed)
    u1, u2 = u[:, :dim], u[:, dim:]
    z = torch.log(u1).mul_(-2.0).sqrt_().mul_(torch.cos(u2 * (2.0 * math.pi)))
    return z.mul_(cfg.scale)

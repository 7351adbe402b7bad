"""The one small interface every tier implements (HugeCTR-style "fill what you have").

A *row* is one float32 vector ``[row_width]``: embedding weights, then the optimizer
state (see ``terarec.optim.sparse``). Tiers store rows by unbounded int64 key.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Tier(Protocol):
    """Storage for rows keyed by int64 ids.

    ``find`` fills the rows it has and returns the positions it missed; a chain of tiers
    passes only those positions to the next tier.
    """

    name: str
    row_width: int

    def __len__(self) -> int:
        """Number of rows held."""
        ...

    def find(self, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Copies the rows of present keys into ``out``.

        Args:
            keys: int64 ``[N]``.
            out: float32 ``[N, row_width]``; rows of absent keys are left untouched.
        Returns:
            int64 ``[M]`` positions (into ``keys``) that were missed.
        """
        ...

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Inserts or overwrites rows. keys: int64 ``[N]`` unique; rows ``[N, row_width]``."""
        ...

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``(keys [R], rows [R, row_width])`` held (for checkpoints and tests)."""
        ...

    def flush(self) -> None:
        """Makes every written row durable (no-op for memory tiers)."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters: rows, bytes, hits, misses, inserts."""
        ...

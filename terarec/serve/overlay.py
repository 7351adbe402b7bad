"""Live updates of a served bundle: the rows the training run changed since, in RAM.

A running training job writes delta checkpoints (the rows changed since its last
checkpoint, the keys it deleted, its dense weights). The service applies them without a
restart (:meth:`~terarec.serve.scorer.Scorer.apply_delta`):

* changed rows go into an :class:`Overlay` above the read-only row store, stored in the
  bundle's row dtype (quantised like the bundle), at most ``max_rows`` rows; deleted
  keys are kept as tombstones (they read as zero rows, as absent keys do);
* the row caches forget the keys a delta touched, so the next read sees the overlay;
* the dense weights are loaded into the programs' parameters in place;
* all of it between two scoring passes (the service's swap lock), so a request is
  scored wholly by the old model or wholly by the new one.

Deltas must come in order: each one's parent (its manifest names it by sha256) is the
bundle's checkpoint or the last delta applied. A delta that would grow the overlay past
its bound is refused (the model keeps serving the last one applied); a new full export
replaces store and overlay (restart the service on it, or :meth:`Scorer.from_bundle` a
new scorer and swap it in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from terarec.ps.index.key_map import KeyMap
from terarec.serve.quant import dequantize, quantize, row_bytes


class OverlayFull(RuntimeError):
    """A delta would grow the overlay past ``max_rows``."""


class Overlay:
    """Changed rows of every table (by table id) in the bundle's row encoding.

    Args:
        dims: table id → dim.
        dtype: the bundle's row dtype.
        max_rows: rows (changed and deleted keys) it may hold over all tables.
    """

    def __init__(self, dims: dict[int, int], dtype: str, max_rows: int) -> None:
        self.dims, self.dtype, self.max_rows = dims, dtype, max_rows
        self.maps = {t: KeyMap("cpu", 1024) for t in dims}
        self.raw = {t: torch.empty(0, row_bytes(dtype, d), dtype=torch.uint8)
                    for t, d in dims.items()}
        self.size = {t: 0 for t in dims}

    @property
    def rows(self) -> int:
        return sum(self.size.values())

    def new_keys(self, table_id: int, keys: torch.Tensor) -> int:
        """How many of unique ``keys`` the table's overlay does not hold yet."""
        return int((self.maps[table_id].find(keys) < 0).sum())

    def put(self, table_id: int, keys: torch.Tensor, weights: torch.Tensor) -> None:
        """Sets the rows of unique ``keys`` (``weights [N, dim]`` float; zero rows with
        ``deleted``) — upserts."""
        if keys.numel() == 0:
            return
        m = self.maps[table_id]
        slots = m.find(keys)
        new = slots < 0
        n_new = int(new.sum())
        at = self.size[table_id]
        slots[new] = torch.arange(at, at + n_new)
        need = at + n_new
        raw = self.raw[table_id]
        if need > raw.shape[0]:
            grown = torch.empty(max(need, 2 * raw.shape[0]), raw.shape[1], dtype=torch.uint8)
            grown[: at] = raw[: at]
            self.raw[table_id] = raw = grown
        raw[slots] = quantize(weights, self.dtype)
        m.insert(keys[new], slots[new])
        self.size[table_id] = need

    def read(self, table_id: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(held bool [N], rows float32 [held, dim])`` of ``keys``."""
        slots = self.maps[table_id].find(keys)
        held = slots >= 0
        raw = self.raw[table_id][slots[held]]
        return held, dequantize(raw, self.dtype, self.dims[table_id])


@dataclass
class PendingDelta:
    """A delta read and checked, ready to commit between two scoring passes."""

    path: str
    step: int
    sha256: str
    parent: str
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

"""The scratch pad: rows of a batch that the device cache has no room for.

When a batch (or the current batch plus the prefetched next one) has more unique keys
than the device tier's budget can take, the rows that do not fit are trained from a
scratch pad beside the cache instead of failing the step, as FBGEMM's SSD TBE does for
its conflict misses: they are fetched from the lower tiers like any miss, read and updated
in place by slot during the step, and written back down (never dropped) once no step
that uses them is pending. The pad is transient working memory sized by the batch, not
part of the cache budget: between steps it holds the last step's rows (until the next
``prepare`` or prefetch writes down those no pending step uses) and the prefetched next
batch's.

Slots of the pad are numbered after the cache's: ``capacity + i`` for pad row ``i``.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from terarec.ps.index.key_map import KeyMap
from terarec.ps.tiers.protocol import FREQ, LAST, META_WIDTH


class ScratchPad:
    """Transient rows keyed by int64 ids, each locked until a step.

    Args:
        row_width: floats per row.
        base: slot number of pad row 0 (the cache's capacity).
        device: where the rows live (the device tier's device).
    """

    def __init__(self, row_width: int, base: int, device: torch.device) -> None:
        self.row_width = row_width
        self.base = base
        self.device = torch.device(device)
        self._rows = torch.empty(0, row_width, device=self.device)
        self._keys = torch.empty(0, dtype=torch.int64, device=self.device)
        self._lock = torch.empty(0, dtype=torch.int64, device=self.device)
        self._used = torch.empty(0, dtype=torch.bool, device=self.device)
        self._meta = torch.empty(0, META_WIDTH, dtype=torch.int64, device=self.device)
        self._map = KeyMap(self.device, capacity=1024)
        self.peak = 0  # most rows held at once
        # A prefetch may grow the pad on a background thread while the step being
        # trained writes its rows: growth and row access are serialised.
        self._guard = threading.Lock()

    def __len__(self) -> int:
        return len(self._map)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Slots (``base + i``) of ``keys`` ``[N]``, -1 where absent."""
        if len(self._map) == 0:
            return torch.full_like(keys, -1)
        idx = self._map.find(keys)
        return torch.where(idx >= 0, idx + self.base, idx)

    def lock(self, slots: torch.Tensor, until: int) -> None:
        """Keeps the rows at pad ``slots`` ``[N]`` until step ``until`` (never shortens)
        and records the use (metadata as :meth:`CacheTier.touch`)."""
        i = slots - self.base
        self._lock[i] = torch.clamp(self._lock[i], min=until)
        self._meta[i, FREQ] += (self._meta[i, LAST] != until).to(torch.int64)
        self._meta[i, LAST] = until

    def add(
        self, keys: torch.Tensor, rows: torch.Tensor, until: int, meta: torch.Tensor
    ) -> torch.Tensor:
        """Adds absent unique ``keys`` ``[M]`` with ``rows [M, row_width]`` and their
        metadata ``meta [M, 2]`` (before this use); returns their slots."""
        m = keys.numel()
        free = (~self._used).nonzero().squeeze(1)
        if free.numel() < m:
            self._grow(self._used.numel() + m - free.numel())
            free = (~self._used).nonzero().squeeze(1)
        i = free[:m]
        self._rows[i] = rows.to(self._rows.dtype)
        self._keys[i] = keys
        self._lock[i] = until
        self._used[i] = True
        self._meta[i] = meta
        self._meta[i, FREQ] += (meta[:, LAST] != until).to(torch.int64)
        self._meta[i, LAST] = until
        self._map.insert(keys, i)
        self.peak = max(self.peak, len(self._map))
        return i + self.base

    def release(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Removes every row no step from ``step`` on needs:
        ``(keys [R], rows [R, W], meta [R, 2])``."""
        if len(self._map) == 0:
            return self._keys[:0], self._rows[:0], self._meta[:0]
        i = (self._used & (self._lock < step)).nonzero().squeeze(1)
        keys, rows, meta = self._keys[i], self._rows[i], self._meta[i]
        self._used[i] = False
        self._map.delete(keys)
        return keys, rows, meta

    def drop_all(self) -> None:
        """Forgets every row (checkpoint restore replaces all rows)."""
        self._used.zero_()
        self._map = KeyMap(self.device, capacity=1024)

    def find(self, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Copies the rows of present ``keys`` ``[N]`` into ``out``; missed positions."""
        slots = self.lookup(keys)
        hit = (slots >= 0).nonzero().squeeze(1)
        out[hit] = self.read(slots[hit]).to(out.dtype)
        return (slots < 0).nonzero().squeeze(1)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._used.nonzero().squeeze(1)
        return self._keys[i], self._rows[i]

    def export_meta(self) -> torch.Tensor:
        """Metadata of the rows :meth:`export` lists, in that order ``[R, 2]``."""
        return self._meta[self._used.nonzero().squeeze(1)]

    def read(self, slots: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
        with self._guard:
            src = self._rows if cols is None else self._rows[:, :cols]
            return src.index_select(0, slots - self.base)

    def update_rows(self, slots: torch.Tensor, grad: torch.Tensor, optimizer: Any) -> None:
        """One fused optimizer step on the pad rows at unique ``slots`` in place."""
        with self._guard:
            optimizer.update_at(self._rows, slots - self.base, grad)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        with self._guard:
            self._rows.index_copy_(0, slots - self.base, rows)

    def _grow(self, n: int) -> None:
        with self._guard:
            self._grow_locked(n)

    def _grow_locked(self, n: int) -> None:
        old = self._used.numel()
        cap = max(n, 2 * old, 1024)
        rows = torch.empty(cap, self.row_width, device=self.device)
        rows[:old] = self._rows
        keys = torch.zeros(cap, dtype=torch.int64, device=self.device)
        keys[:old] = self._keys
        lock = torch.full((cap,), -1, dtype=torch.int64, device=self.device)
        lock[:old] = self._lock
        used = torch.zeros(cap, dtype=torch.bool, device=self.device)
        used[:old] = self._used
        meta = torch.zeros(cap, META_WIDTH, dtype=torch.int64, device=self.device)
        meta[:old] = self._meta
        self._rows, self._keys, self._lock, self._used = rows, keys, lock, used
        self._meta = meta

"""Host (CPU DRAM) tier: unbounded, a hash index over a growing row array.

Rows are stored densely by slot id, so training can gather and scatter slot blocks
in place (``read`` / ``write``) without going through key lookups twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from terarec.ps.hash_index import HashIndex


class HostTier:
    """Rows of one table in host memory (on CPU-only runs also the training tier).

    Args:
        row_width: floats per row (embedding dim + optimizer state).
        device: memory the rows live in.
        capacity: initial row capacity (grows by doubling).
    """

    name = "host"

    def __init__(
        self, row_width: int, device: torch.device | str = "cpu", capacity: int = 1024
    ) -> None:
        self.row_width = row_width
        self.device = torch.device(device)
        self.index = HashIndex(self.device, capacity=2 * capacity)
        self._rows = torch.zeros(capacity, row_width, device=self.device)
        self._hits = 0
        self._misses = 0
        self._inserts = 0

    def __len__(self) -> int:
        return len(self.index)

    # -- Tier protocol -------------------------------------------------------------
    def find(self, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        slots = self.index.find(keys.to(self.device))  # keys may come from a device tier
        found = slots >= 0
        hit_pos = found.nonzero().squeeze(1)
        out[hit_pos.to(out.device)] = self._rows[slots[hit_pos]].to(out.device)
        missed = (~found).nonzero().squeeze(1).to(keys.device)
        self._hits += hit_pos.numel()
        self._misses += missed.numel()
        return missed

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        keys, rows = keys.to(self.device), rows.to(self.device)
        slots, _ = self.index.find_or_insert(keys)
        self._reserve(len(self.index))
        self._rows[slots] = rows.to(self._rows.dtype)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.index)
        return self.index.keys().clone(), self._rows[:n].clone()

    def flush(self) -> None:
        return None

    def stats(self) -> dict[str, float]:
        return {
            "rows": float(len(self)),
            "bytes": float(len(self) * self.row_width * self._rows.element_size()),
            "hits": float(self._hits),
            "misses": float(self._misses),
            "inserts": float(self._inserts),
        }

    # -- slot access for the training path ----------------------------------------
    def slots_for(
        self, keys: torch.Tensor, create: Callable[[torch.Tensor, torch.Tensor], None]
    ) -> torch.Tensor:
        """Slots of unique ``keys``, creating absent rows with ``create(positions, out)``.

        Args:
            keys: int64 ``[U]`` unique.
            create: fills ``out [M, row_width]`` (in place) with the initial rows of the
                new keys, given their int64 positions ``[M]`` in ``keys``.
        Returns:
            int64 ``[U]`` slots.
        """
        first = len(self.index)
        slots, inserted = self.index.find_or_insert(keys)
        n_new = len(self.index) - first
        if n_new:
            self._reserve(first + n_new)
            # New keys get the next slot ids in their order in ``keys``: one block.
            create(inserted.nonzero().squeeze(1), self._rows[first : first + n_new])
        self._inserts += n_new
        self._hits += keys.numel() - n_new
        self._misses += n_new
        return slots

    def append_unindexed(self, keys: torch.Tensor) -> int:
        """Reserves rows for ``keys`` that the index must not map (see ``TableGroup``).

        Returns the first of the ``keys.numel()`` consecutive new slots; the caller fills
        them through :meth:`row_block`.
        """
        first = self.index.append_unindexed(keys)
        self._reserve(len(self.index))
        self._inserts += keys.numel()
        return first

    def row_block(self, first: int, n: int) -> torch.Tensor:
        """A writable view of the rows of slots ``[first, first + n)``."""
        return self._rows[first : first + n]

    def lookup_slots(self, keys: torch.Tensor) -> torch.Tensor:
        """Slots of ``keys`` (-1 where absent) without creating rows. ``[N]``."""
        return self.index.find(keys)

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows at ``slots``: ``[N, row_width]`` (a copy)."""
        return self._rows.index_select(0, slots)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites the rows at unique ``slots`` with ``rows`` ``[N, row_width]``."""
        self._rows.index_copy_(0, slots, rows)

    def load(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Replaces the whole content (checkpoint restore)."""
        self.index.load_keys(keys)
        self._rows = torch.zeros(max(1024, keys.numel()), self.row_width, device=self.device)
        self._rows[: keys.numel()] = rows.to(self.device, torch.float32)

    def _reserve(self, n: int) -> None:
        if n <= self._rows.shape[0]:
            return
        cap = self._rows.shape[0]
        while cap < n:
            cap *= 2
        grown = torch.empty(cap, self.row_width, device=self.device)  # rows >= len unused
        grown[: self._rows.shape[0]] = self._rows
        self._rows = grown

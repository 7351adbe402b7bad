"""Host (CPU DRAM) tier: unbounded, a hash index over a growing row array.

Rows are stored densely by slot id, so training can gather and scatter slot blocks
in place (``read`` / ``write``) without going through key lookups twice. Each slot also
holds the row's metadata ``(last_step, freq)`` (two int64 ``[cap]`` arrays beside the rows).

Removing rows (``evict``, ``expire``) marks their slots *dead*: the index keeps the key,
lookups treat it as absent, and the next insert of that key revives the slot with the
new row. Dead slots are reclaimed by :meth:`compact` (one vectorised pass: the index and
the row array are rebuilt from the live slots, which get new, dense slot ids);
:meth:`maybe_compact` does it once dead slots outnumber live ones, so at most half of
the memory is ever dead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Optional

import torch

from terarec.ps.index.hash_index import HashIndex
from terarec.ps.tiers.protocol import Export, Rows, Spare, check_batch
from terarec.ps.tiers.slots import SlotRows

_MIN_COMPACT = 1024  # dead slots below this never trigger a compaction


class HostTier(SlotRows):
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
        self._last = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self._freq = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self._dead = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self._n_dead = 0
        self._unindexed: list[int] = []  # slots of append_unindexed (kept unindexed)
        self._stats = dict.fromkeys(("hits", "misses", "inserts", "deletes", "expired"), 0)

    def __len__(self) -> int:
        return len(self.index) - self._n_dead

    @property
    def num_slots(self) -> int:
        """Slots handed out so far (live and dead): new rows get slots from here on."""
        return len(self.index)

    # -- Tier protocol -------------------------------------------------------------
    def find(
        self, keys: torch.Tensor, out: torch.Tensor, meta: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        check_batch(self.name, self.row_width, keys, out, meta, what="out")
        slots = self.lookup_slots(keys.to(self.device))  # keys may come from a device tier
        found = slots >= 0
        hit = found.nonzero().squeeze(1)
        src = slots[hit]
        out[hit.to(out.device)] = self._rows[src].to(out.device, out.dtype)
        if meta is not None:
            meta[hit.to(meta.device)] = self.read_meta(src).to(meta.device)
        missed = (~found).nonzero().squeeze(1).to(keys.device)
        self._stats["hits"] += hit.numel()
        self._stats["misses"] += missed.numel()
        return missed

    def insert(
        self, keys: torch.Tensor, rows: torch.Tensor, meta: Optional[torch.Tensor] = None
    ) -> Rows:
        check_batch(self.name, self.row_width, keys, rows, meta)
        if keys.numel():
            keys, rows = keys.to(self.device), rows.to(self.device, self._rows.dtype)
            slots, inserted = self.index.find_or_insert(keys)
            self._reserve(len(self.index))
            revived = self._revive(slots)
            self._rows[slots] = rows
            if meta is None:
                self._last.index_fill_(0, slots, 0)
                self._freq.index_fill_(0, slots, 0)
            else:
                self.write_meta(slots, meta)
            self._stats["inserts"] += int(inserted.sum()) + revived
        return Rows.empty(self.row_width, self.device)

    def evict(self, keys: torch.Tensor) -> int:
        check_batch(self.name, self.row_width, keys)
        if keys.numel() == 0:
            return 0
        slots = self.lookup_slots(torch.unique(keys.to(self.device)))
        n = self._kill(slots[slots >= 0])
        self._stats["deletes"] += n
        return n

    def expire(self, before_step: int, spare: Optional[Spare] = None) -> torch.Tensor:
        """Removes rows last used before ``before_step`` (unless ``spare(keys)``); returns
        their keys (see :class:`~terarec.ps.tiers.protocol.Tier`). Slots become dead (see
        :meth:`maybe_compact`)."""
        n = self.num_slots
        stale = (self._last[:n] < before_step) & ~self._dead[:n]
        slots = stale.nonzero().squeeze(1)
        keys = self.index.keys()[slots]
        if spare is not None and slots.numel():
            keep = spare(keys).to(self.device)
            slots, keys = slots[~keep], keys[~keep]
        self._stats["expired"] += self._kill(slots)
        return keys.clone()

    def export(self, with_meta: bool = False) -> Export:
        return self.export_slots(self.live_slots(), with_meta)

    def export_slots(self, slots: torch.Tensor, with_meta: bool = False) -> Export:
        """:meth:`export` of the live ``slots`` only (a chunk of ``live_slots()``)."""
        keys, rows = self.index.keys()[slots], self._rows[slots]
        return (keys, rows, self.read_meta(slots)) if with_meta else (keys, rows)

    def flush(self) -> None:
        return None

    def stats(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self._stats.items()}
        out["rows"] = float(len(self))
        out["bytes"] = float(len(self) * (self.row_width * self._rows.element_size() + 16))
        return out

    # -- slot access for the training path ----------------------------------------
    def slots_for(
        self,
        keys: torch.Tensor,
        create: Callable[[torch.Tensor, torch.Tensor], None],
        expire_before: Optional[int] = None,
        fresh: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Slots of unique ``keys``, creating absent rows with ``create(positions, out)``.

        Args:
            keys: int64 ``[U]`` unique.
            create: fills ``out [M, row_width]`` (in place) with the initial rows of the
                new keys, given their int64 positions ``[M]`` in ``keys``.
            expire_before: TTL: a held row last used before this step is expired and
                created again (as if its key were new).
            fresh: optional bool ``[U]``, set True where a row was (re)created.
        Returns:
            int64 ``[U]`` slots. New and re-created rows have metadata ``(0, 0)``: the
            caller :meth:`touch` es the rows it uses.
        """
        first = len(self.index)
        slots, inserted = self.index.find_or_insert(keys)
        n_new = len(self.index) - first
        if n_new:
            self._reserve(first + n_new)
            # New keys get the next slot ids in their order in ``keys``: one block.
            create(inserted.nonzero().squeeze(1), self._rows[first : first + n_new])
            self._last[first : first + n_new] = 0
            self._freq[first : first + n_new] = 0
        redo: Optional[torch.Tensor] = None
        if self._n_dead:  # dead slots of these keys come back
            redo = self._dead[slots] & ~inserted
        if expire_before is not None:
            last = self._last.index_select(0, slots)
            stale = (last < expire_before) & ~inserted & ~self._dead.index_select(0, slots)
            self._stats["expired"] += int(stale.sum())
            redo = stale if redo is None else redo | stale
        n_redo = 0
        if redo is not None and bool(redo.any()):
            pos = redo.nonzero().squeeze(1)
            n_redo = pos.numel()
            block = torch.empty(n_redo, self.row_width, device=self.device)
            create(pos, block)
            self._revive(slots[pos])
            self._rows[slots[pos]] = block
            self._last.index_fill_(0, slots[pos], 0)
            self._freq.index_fill_(0, slots[pos], 0)
        if fresh is not None:
            fresh.copy_(inserted if redo is None else inserted | redo)
        self._stats["inserts"] += n_new + n_redo
        self._stats["hits"] += keys.numel() - n_new - n_redo
        self._stats["misses"] += n_new + n_redo
        return slots

    def append_unindexed(self, keys: torch.Tensor) -> int:
        """Reserves rows for ``keys`` that the index must not map (see ``TableGroup``).

        Returns the first of the ``keys.numel()`` consecutive new slots; the caller fills
        them through :meth:`row_block`.
        """
        first = self.index.append_unindexed(keys)
        self._reserve(len(self.index))
        self._last[first : len(self.index)] = 0
        self._freq[first : len(self.index)] = 0
        self._unindexed.extend(range(first, len(self.index)))
        self._stats["inserts"] += keys.numel()
        return first

    def row_block(self, first: int, n: int) -> torch.Tensor:
        """A writable view of the rows of slots ``[first, first + n)``."""
        return self._rows[first : first + n]

    def lookup_slots(self, keys: torch.Tensor) -> torch.Tensor:
        """Slots of ``keys`` (-1 where absent) without creating rows. ``[N]``."""
        slots = self.index.find(keys)
        if self._n_dead:
            slots = torch.where(self._dead[slots.clamp(min=0)], -1, slots)
        return slots

    def live_slots(self) -> torch.Tensor:
        """Slots holding a row, ascending: int64 ``[len(self)]``."""
        n = self.num_slots
        if not self._n_dead:
            return torch.arange(n, device=self.device)
        return (~self._dead[:n]).nonzero().squeeze(1)

    def live_slot_chunks(self, chunk: int) -> Iterator[torch.Tensor]:
        """:meth:`live_slots` in pieces of ``chunk`` slots or fewer (never all at once)."""
        n = self.num_slots
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            if not self._n_dead:
                yield torch.arange(start, end, device=self.device)
            else:
                yield (~self._dead[start:end]).nonzero().squeeze(1) + start

    def is_dead(self, slots: torch.Tensor) -> torch.Tensor:
        """bool ``[N]``: which ``slots`` were removed (evicted or expired)."""
        return self._dead[slots]

    # -- reclaiming dead slots -------------------------------------------------------
    def maybe_compact(self) -> Optional[torch.Tensor]:
        """:meth:`compact` once dead slots outnumber live ones (and at least 1024);
        returns its permutation, or None when it did not run."""
        if self._n_dead < max(_MIN_COMPACT, len(self)):
            return None
        return self.compact()

    def compact(self) -> torch.Tensor:
        """Drops dead slots: live rows get dense slot ids, indexed rows first (in slot
        order), then the unindexed ones. One pass over the rows; the index is rebuilt.

        Returns:
            int64 ``[len(self)]``: new slot ``i`` holds the row of old slot ``perm[i]``
            (callers that keep per-slot data remap it with this).
        """
        n = self.num_slots
        alive = ~self._dead[:n]
        unindexed = torch.zeros(n, dtype=torch.bool, device=self.device)
        if self._unindexed:
            unindexed[torch.tensor(self._unindexed, device=self.device)] = True
        indexed = (alive & ~unindexed).nonzero().squeeze(1)
        side = (alive & unindexed).nonzero().squeeze(1)
        perm = torch.cat([indexed, side])
        keys = self.index.keys()
        kept_side = keys[side]
        self.index.load_keys(keys[indexed])
        if side.numel():
            self.index.append_unindexed(kept_side)
        m = perm.numel()
        self._rows[:m] = self._rows.index_select(0, perm)
        for a in (self._last, self._freq):
            a[:m] = a.index_select(0, perm)
            a[m:] = 0
        self._dead.zero_()
        self._n_dead = 0
        self._unindexed = list(range(indexed.numel(), m))
        return perm

    # -- internals ---------------------------------------------------------------------
    def _kill(self, slots: torch.Tensor) -> int:
        """Marks live ``slots`` (unique) dead; returns how many were live."""
        if slots.numel() == 0:
            return 0
        live = slots[~self._dead[slots]]
        self._dead[live] = True
        self._n_dead += live.numel()
        return live.numel()

    def _revive(self, slots: torch.Tensor) -> int:
        """Clears the dead mark of ``slots`` (a key written again); returns how many."""
        if not self._n_dead:
            return 0
        dead = slots[self._dead[slots]]
        self._dead[dead] = False
        self._n_dead -= dead.numel()
        return dead.numel()

    def _reserve(self, n: int) -> None:
        if n <= self._rows.shape[0]:
            return
        cap = self._rows.shape[0]
        while cap < n:
            cap *= 2
        old = self._rows.shape[0]
        grown = torch.empty(cap, self.row_width, device=self.device)  # rows >= len unused
        grown[:old] = self._rows
        self._rows = grown
        for name in ("_last", "_freq"):
            arr = torch.zeros(cap, dtype=torch.int64, device=self.device)
            arr[:old] = getattr(self, name)
            setattr(self, name, arr)
        dead = torch.zeros(cap, dtype=torch.bool, device=self.device)
        dead[:old] = self._dead
        self._dead = dead

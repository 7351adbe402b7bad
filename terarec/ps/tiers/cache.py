"""A fixed-capacity, fully associative row cache: the device (HBM) tier and the
budgeted host tier.

``capacity`` rows of ``row_width`` floats live in one slot array; a :class:`KeyMap`
maps keys to slots and forgets evicted keys, so slots are recycled. Each slot carries
the row's metadata, which moves with the row to and from the tiers below: the last step
that used it and how many steps used it (:data:`~terarec.ps.tiers.protocol.META_WIDTH`), plus a
lock (the step until which it must stay: rows of the current and the next batch are
never evicted nor expired). Victims are the unlocked rows with the oldest last use
(``lru``) or the fewest uses, oldest first among equals (``lfu``). Every evicted row is
handed back to the caller, who writes it to the tier below: the cache never drops a
row (only :meth:`CacheTier.evict` and :meth:`CacheTier.expire` remove rows on purpose).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from terarec.ps.index.key_map import KeyMap
from terarec.ps.tiers.protocol import Export, Rows, Spare, TierFullError, check_batch
from terarec.ps.tiers.slots import SlotRows

__all__ = ["CacheTier", "Policy", "TierFullError"]

Policy = Literal["lru", "lfu"]


class CacheTier(SlotRows):
    """Rows keyed by int64 ids in a fixed number of slots, with LRU/LFU eviction.

    Args:
        row_width: floats per row (weights + optimizer state).
        capacity: rows it holds at most.
        device: where the rows live (``cuda`` for the HBM tier).
        policy: ``lru`` or ``lfu``.
        name: tier name in stats and errors (``device`` / ``host``).
        pin: allocate the row array in pinned host memory (fast copies to a GPU).
        rows: the row array to use, float32 ``[capacity, row_width]`` on ``device``
            (e.g. this table's part of one array shared by a group of tables, which
            then gathers and updates every table's rows in one launch); default a new
            zeroed one.
    """

    def __init__(
        self,
        row_width: int,
        capacity: int,
        device: torch.device | str = "cpu",
        policy: Policy = "lru",
        name: str = "device",
        pin: bool = False,
        rows: Optional[torch.Tensor] = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"{name} tier: capacity must be >= 1 row, got {capacity}")
        if policy not in ("lru", "lfu"):
            raise ValueError(f"{name} tier: policy must be lru or lfu, got {policy!r}")
        self.name = name
        self.row_width = row_width
        self.capacity = capacity
        self.device = torch.device(device)
        self.policy = policy
        if rows is None:
            rows = torch.zeros(capacity, row_width, device=self.device)
            rows = rows.pin_memory() if pin and self.device.type == "cpu" else rows
        elif rows.shape != (capacity, row_width) or rows.device.type != self.device.type:
            raise ValueError(
                f"{name} tier: rows must be [{capacity}, {row_width}] on {self.device}, got "
                f"{tuple(rows.shape)} on {rows.device}"
            )
        self._rows = rows
        self._keys = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self._used = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self._last = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self._freq = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self._lock = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self._map = KeyMap(self.device, capacity=2 * capacity)
        self._size = 0
        self._stats = dict.fromkeys(("inserts", "evictions", "deletes", "expired"), 0)
        # hits counted on the device: a lookup on the training path never waits for it
        self._hits = torch.zeros((), dtype=torch.int64, device=self.device)
        self._looked = 0  # keys looked up

    def __len__(self) -> int:
        return self._size

    # -- slot-level API (the training path) ------------------------------------------
    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key, -1 where absent ``[N]``; counts hits and misses."""
        slots = self._map.find(keys)
        self._hits += (slots >= 0).sum()
        self._looked += keys.numel()
        return slots

    def lock(self, slots: torch.Tensor, until_step: int) -> None:
        """Keeps the rows at ``slots`` from eviction while the step is <= ``until_step``."""
        self._lock[slots] = torch.clamp(self._lock[slots], min=until_step)

    def admit(
        self,
        keys: torch.Tensor,
        rows: torch.Tensor,
        step: int,
        lock_until: int = -1,
        meta: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Rows]:
        """Places absent ``keys`` ``[M]`` (unique) with their ``rows``, evicting as needed.

        Args:
            meta: int64 ``[M, 2]`` metadata the rows bring along (from a lower tier);
                default ``(step, 1)``: a first use at ``step``.
        Returns:
            ``(slots [M], evicted)``: the rows that made room (with their metadata), for
            the tier below.
        Raises:
            TierFullError: fewer than ``M`` slots are free or evictable at ``step``
                (rows locked until ``step`` or later are not).
        """
        m = keys.numel()
        if m == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device), self._no_rows()
        free = (~self._used).nonzero().squeeze(1)[:m]
        need = m - free.numel()
        evicted = self._no_rows()
        if need > 0:
            victims, evicted = self._evict(need, step)
            free = torch.cat([free, victims])
        self._keys[free] = keys
        self._rows[free] = rows.to(self._rows.dtype)
        self._used[free] = True
        if meta is None:
            self._last[free] = step
            self._freq[free] = 1
        else:
            self.write_meta(free, meta)
        self._lock[free] = lock_until
        self._map.insert(keys, free)
        self._size += m
        self._stats["inserts"] += m
        return free, evicted

    def room(self, step: int) -> int:
        """Rows :meth:`admit` can place at ``step``: free slots plus evictable ones."""
        return int((~self._used | (self._lock < step)).sum())

    def evict_by_policy(self, n: int, step: int) -> Rows:
        """Evicts ``n`` unlocked rows by the policy; returns them (keys, rows, metadata)."""
        return self._evict(n, step)[1]

    def remove(self, keys: torch.Tensor) -> Rows:
        """Takes present ``keys`` (unique) out: returns their rows and metadata."""
        keys = keys.to(self.device)
        slots = self._map.find(keys)
        hit = (slots >= 0).nonzero().squeeze(1)
        s = slots[hit]
        out = Rows(keys[hit], self._rows[s], self.read_meta(s))
        self._release(s, out.keys)
        return out

    def take(
        self, keys: torch.Tensor, out: torch.Tensor, meta: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Like :meth:`find`, but the rows found leave the tier (exclusive caching).
        ``keys`` unique."""
        missed = self.find(keys, out, meta)
        hit = torch.ones(keys.numel(), dtype=torch.bool, device=keys.device)
        hit[missed] = False
        present = keys[hit].to(self.device)
        self._release(self._map.find(present), present)
        return missed

    # -- Tier protocol ---------------------------------------------------------------
    def find(
        self, keys: torch.Tensor, out: torch.Tensor, meta: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Copies the rows (and metadata) of present keys into ``out`` (``meta``);
        returns missed positions (on the keys' device)."""
        check_batch(self.name, self.row_width, keys, out, meta, what="out")
        slots = self.lookup(keys.to(self.device))
        hit = (slots >= 0).nonzero().squeeze(1)
        src = slots[hit]
        out[hit.to(out.device)] = self._rows[src].to(out.device, out.dtype)
        if meta is not None:
            meta[hit.to(meta.device)] = self.read_meta(src).to(meta.device)
        return (slots < 0).nonzero().squeeze(1).to(keys.device)

    def insert(
        self,
        keys: torch.Tensor,
        rows: torch.Tensor,
        meta: Optional[torch.Tensor] = None,
        step: int = 0,
    ) -> Rows:
        """Upserts rows (keys unique; ``meta`` default zeros), evicting unlocked rows by
        the policy for the new ones (at ``step``); returns the evicted rows."""
        check_batch(self.name, self.row_width, keys, rows, meta)
        keys, rows = keys.to(self.device), rows.to(self.device)
        if meta is None:
            meta = torch.zeros(keys.numel(), 2, dtype=torch.int64, device=self.device)
        meta = meta.to(self.device)
        slots = self._map.find(keys)
        present = slots[slots >= 0]
        if present.numel():
            hit = (slots >= 0).nonzero().squeeze(1)
            self.write(present, rows[hit])
            self.write_meta(present, meta[hit])
        absent = (slots < 0).nonzero().squeeze(1)
        if absent.numel() == 0:
            return self._no_rows()
        locks = self._lock[present]
        self._lock[present] = torch.clamp(locks, min=step)  # the rows just written stay
        try:
            return self.admit(keys[absent], rows[absent], step, meta=meta[absent])[1]
        finally:
            self._lock[present] = locks

    def evict(self, keys: torch.Tensor) -> int:
        """Removes the rows of ``keys`` held (locked or not); returns how many."""
        check_batch(self.name, self.row_width, keys)
        if keys.numel() == 0:
            return 0
        n = self.remove(torch.unique(keys.to(self.device))).keys.numel()
        self._stats["deletes"] += n
        return n

    def expire(self, before_step: int, spare: Optional[Spare] = None) -> torch.Tensor:
        """Removes the rows last used before ``before_step``, except those ``spare(keys)``
        marks and those locked for ``before_step`` or later; returns their keys."""
        stale = self._used & (self._last < before_step) & (self._lock < before_step)
        slots = stale.nonzero().squeeze(1)
        keys = self._keys[slots]
        if spare is not None and slots.numel():
            keep = spare(keys).to(self.device)
            slots, keys = slots[~keep], keys[~keep]
        self._release(slots, keys)
        self._stats["expired"] += slots.numel()
        return keys

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        """bool ``[N]`` (on the keys' device): which keys are held. Counts nothing."""
        return (self._map.find(keys.to(self.device)) >= 0).to(keys.device)

    def export(self, with_meta: bool = False) -> Export:
        used = self._used.nonzero().squeeze(1)
        keys, rows = self._keys[used], self._rows[used]
        return (keys, rows, self.read_meta(used)) if with_meta else (keys, rows)

    def flush(self) -> None:
        return None

    def stats(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self._stats.items()}
        hits = int(self._hits)
        out["hits"], out["misses"] = float(hits), float(self._looked - hits)
        out["rows"] = float(self._size)
        out["bytes"] = float(self._size * (self.row_width * self._rows.element_size() + 16))
        return out

    # -- internals -------------------------------------------------------------------
    def _no_rows(self) -> Rows:
        return Rows.empty(self.row_width, self.device)

    def _victims(self, n: int, step: int) -> torch.Tensor:
        evictable = self._used & (self._lock < step)
        count = int(evictable.sum())
        if count < n:
            raise TierFullError(
                f"{self.name} tier: needs {n} more free rows at step {step} but only "
                f"{count} of its {self.capacity} rows may be evicted (the others are locked "
                "for the batch being trained, and the next one when prefetched); raise its "
                "budget",
                tier=self.name,
            )
        big = torch.iinfo(torch.int64).max
        if self.policy == "lru":
            score = torch.where(evictable, self._last, big)
            return torch.topk(score, n, largest=False, sorted=False).indices
        # lfu: fewest uses, then oldest — one sort on (freq, last)
        last = torch.where(evictable, self._last, big)
        order = torch.sort(last, stable=True).indices
        freq = torch.where(evictable, self._freq, big)[order]
        return order[torch.sort(freq, stable=True).indices[:n]]

    def _release(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Frees ``slots`` holding ``keys`` (unique): the map forgets them."""
        self._map.delete(keys)
        self._used[slots] = False
        self._lock[slots] = -1
        self._size -= slots.numel()

    def _evict(self, n: int, step: int) -> tuple[torch.Tensor, Rows]:
        """Frees ``n`` victims: ``(slots, their rows)`` (rows copied out)."""
        victims = self._victims(n, step)
        out = Rows(self._keys[victims], self._rows[victims], self.read_meta(victims))
        self._release(victims, out.keys)
        self._stats["evictions"] += n
        return victims, out

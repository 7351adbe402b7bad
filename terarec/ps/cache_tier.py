"""A fixed-capacity, fully associative row cache: the device (HBM) tier and the
budgeted host tier.

``capacity`` rows of ``row_width`` floats live in one slot array; a :class:`KeyMap`
maps keys to slots and forgets evicted keys, so slots are recycled. Each slot carries
the metadata that eviction needs: the last step that touched it, how often it was
touched, and a lock (the step until which it must stay: rows of the current and the
next batch are never evicted). Victims are the unlocked rows with the oldest last
access (``lru``) or the fewest touches, oldest first among equals (``lfu``). Every
evicted row is handed back to the caller, who writes it to the tier below: the cache
never drops a row.
"""

from __future__ import annotations

from typing import Literal

import torch

from terarec.ps.key_map import KeyMap

Policy = Literal["lru", "lfu"]


class TierFullError(RuntimeError):
    """A tier cannot take the rows asked for without evicting locked rows."""


class CacheTier:
    """Rows keyed by int64 ids in a fixed number of slots, with LRU/LFU eviction.

    Args:
        row_width: floats per row (weights + optimizer state).
        capacity: rows it holds at most.
        device: where the rows live (``cuda`` for the HBM tier).
        policy: ``lru`` or ``lfu``.
        name: tier name in stats and errors (``device`` / ``host``).
        pin: allocate the row array in pinned host memory (fast copies to a GPU).
    """

    def __init__(
        self,
        row_width: int,
        capacity: int,
        device: torch.device | str = "cpu",
        policy: Policy = "lru",
        name: str = "device",
        pin: bool = False,
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
        rows = torch.zeros(capacity, row_width, device=self.device)
        self._rows = rows.pin_memory() if pin and self.device.type == "cpu" else rows
        self._keys = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self._used = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self._last = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self._freq = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self._lock = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self._map = KeyMap(self.device, capacity=2 * capacity)
        self._size = 0
        self._stats = dict.fromkeys(("hits", "misses", "inserts", "evictions"), 0)

    def __len__(self) -> int:
        return self._size

    # -- slot-level API (the training path) ------------------------------------------
    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key, -1 where absent ``[N]``; counts hits and misses."""
        slots = self._map.find(keys)
        hits = int((slots >= 0).sum())
        self._stats["hits"] += hits
        self._stats["misses"] += keys.numel() - hits
        return slots

    def touch(self, slots: torch.Tensor, step: int) -> None:
        """Records an access at ``step`` of the rows at ``slots`` (unique)."""
        self._last[slots] = step
        self._freq[slots] += 1

    def lock(self, slots: torch.Tensor, until_step: int) -> None:
        """Keeps the rows at ``slots`` from eviction while the step is <= ``until_step``."""
        self._lock[slots] = torch.clamp(self._lock[slots], min=until_step)

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows at ``slots`` ``[N, row_width]`` (a copy)."""
        return self._rows.index_select(0, slots)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites the rows at unique ``slots``."""
        self._rows.index_copy_(0, slots, rows.to(self._rows.dtype))

    def admit(
        self, keys: torch.Tensor, rows: torch.Tensor, step: int, lock_until: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Places absent ``keys`` ``[M]`` (unique) with their ``rows``, evicting as needed.

        Returns:
            ``(slots [M], evicted_keys [E], evicted_rows [E, row_width])``: the rows that
            made room, for the tier below.
        Raises:
            TierFullError: fewer than ``M`` slots are free or evictable at ``step``
                (rows locked until ``step`` or later are not).
        """
        m = keys.numel()
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        if m == 0:
            return empty, empty, torch.empty(0, self.row_width, device=self.device)
        free = (~self._used).nonzero().squeeze(1)[:m]
        need = m - free.numel()
        ev_keys, ev_rows = empty, torch.empty(0, self.row_width, device=self.device)
        if need > 0:
            victims, ev_keys, ev_rows = self._evict(need, step)
            free = torch.cat([free, victims])
        self._keys[free] = keys
        self._rows[free] = rows.to(self._rows.dtype)
        self._used[free] = True
        self._last[free] = step
        self._freq[free] = 1
        self._lock[free] = lock_until
        self._map.insert(keys, free)
        self._size += m
        self._stats["inserts"] += m
        return free, ev_keys, ev_rows

    def room(self, step: int) -> int:
        """Rows :meth:`admit` can place at ``step``: free slots plus evictable ones."""
        return int((~self._used | (self._lock < step)).sum())

    def _victims(self, n: int, step: int) -> torch.Tensor:
        evictable = self._used & (self._lock < step)
        count = int(evictable.sum())
        if count < n:
            raise TierFullError(
                f"{self.name} tier: needs {n} more free rows at step {step} but only "
                f"{count} of its {self.capacity} rows may be evicted (the others are locked "
                "for the batch being trained, and the next one when prefetched); raise its "
                "budget"
            )
        big = torch.iinfo(torch.int64).max
        if self.policy == "lru":
            score = torch.where(evictable, self._last, big)
            return torch.topk(score, n, largest=False, sorted=False).indices
        # lfu: fewest touches, then oldest — one sort on (freq, last)
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

    def _evict(self, n: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frees ``n`` victims: ``(slots, keys, rows)`` (rows copied out)."""
        victims = self._victims(n, step)
        keys, rows = self._keys[victims], self._rows[victims]
        self._release(victims, keys)
        self._stats["evictions"] += n
        return victims, keys, rows

    def remove(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes present ``keys`` out: returns their ``(keys [R], rows [R, W])``."""
        slots = self._map.find(keys)
        hit = (slots >= 0).nonzero().squeeze(1)
        out_keys, out_rows = keys[hit], self._rows[slots[hit]]
        self._release(slots[hit], out_keys)
        return out_keys, out_rows

    def take(self, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Like :meth:`find`, but the rows found leave the tier (exclusive caching)."""
        missed = self.find(keys, out)
        hit = torch.ones(keys.numel(), dtype=torch.bool, device=keys.device)
        hit[missed] = False
        present = keys[hit]
        self._release(self._map.find(present), present)
        return missed

    # -- Tier protocol ---------------------------------------------------------------
    def find(self, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Copies the rows of present keys into ``out``; returns missed positions."""
        slots = self.lookup(keys)
        hit = (slots >= 0).nonzero().squeeze(1)
        out[hit] = self._rows[slots[hit]].to(out.dtype)
        return (slots < 0).nonzero().squeeze(1)

    def insert(
        self, keys: torch.Tensor, rows: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upserts rows (keys unique); returns the evicted ``(keys, rows)``."""
        slots = self._map.find(keys)
        present = (slots >= 0).nonzero().squeeze(1)
        if present.numel():
            self.write(slots[present], rows[present])
        absent = (slots < 0).nonzero().squeeze(1)
        _, ev_keys, ev_rows = self.admit(keys[absent], rows[absent], step)
        return ev_keys, ev_rows

    def evict(self, n: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Evicts ``n`` rows by the policy; returns their ``(keys, rows)``."""
        _, keys, rows = self._evict(n, step)
        return keys, rows

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        used = self._used.nonzero().squeeze(1)
        return self._keys[used].clone(), self._rows[used].clone()

    def flush(self) -> None:
        return None

    def stats(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self._stats.items()}
        out["rows"] = float(self._size)
        out["bytes"] = float(self._size * self.row_width * self._rows.element_size())
        return out

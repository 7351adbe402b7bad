"""A vectorised int64 -> int64 hash map with deletes, for fixed-capacity caches.

Unlike :class:`~terarec.ps.index.hash_index.HashIndex` (which hands out dense, never-reused
slot ids), a ``KeyMap`` stores caller-chosen values and forgets keys, so a cache can
recycle its slots. Layout: open addressing with linear probing over a ``[cap, 2]``
(mixed key, value) table. Keys are stored as ``mix64(key)`` (a bijection), so ids that
share low bits spread evenly; the mixed value -1 marks an empty bucket, so the one key
whose mix is -1 keeps its value on the side.

A delete sets the entry's value to -3 and keeps its key in the bucket (a *dead* entry:
probes pass over it, a later insert of the same key revives it). Dead entries count
towards the load; when live + dead would exceed ``max_load``, the map is rebuilt from
its live entries (into twice the buckets if the live entries alone need it).

Backends: ``fbgemm`` (CPU; FBGEMM's ``pruned_hashmap_insert`` / ``_lookup`` kernels,
whose insert overwrites the value of a present key), ``triton`` (CUDA, the default
there: one launch per find or upsert, :mod:`terarec.ps.index.triton_hash`) and ``torch`` (any
device; the reference: a few torch ops per probe round, never per key).
"""

from __future__ import annotations

import torch

from terarec.hashing import mix64_torch
from terarec.ps.index import triton_hash
from terarec.ps.index.hash_index import Backend, BucketTable, bucket_count

_EMPTY = -1
_DEAD = -3  # value of a deleted entry (FBGEMM's insert skips only the value -1)


class KeyMap(BucketTable):
    """int64 keys -> int64 values >= 0, with insert (upsert), find and delete.

    Args:
        device: where the map lives.
        capacity: initial bucket count (rounded up to a power of two).
        max_load: (live + dead) / buckets bound that triggers a rebuild.
        backend: ``auto`` (fbgemm on CPU when available), ``torch`` or ``fbgemm``.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        capacity: int = 1024,
        max_load: float = 0.5,
        backend: Backend = "auto",
    ) -> None:
        super().__init__(device, max_load, backend)
        self._live = 0
        self._used = 0  # buckets holding a key (live or dead)
        self._side = -1  # value of the key whose mix is -1 (-1: absent)
        self._alloc(bucket_count(capacity))

    def _alloc(self, cap: int) -> None:
        old = getattr(self, "_table", None)
        if old is not None and old.is_cuda:
            # A rebuild may run on another stream than the one that allocated the table
            # (the training pipeline prefetches on a side stream): the memory must not
            # be reused before this stream's queued reads of it are done.
            old.record_stream(torch.cuda.current_stream(old.device))
        self._alloc_table(cap)

    def __len__(self) -> int:
        return self._live

    @property
    def capacity(self) -> int:
        return self._cap

    # -- public ops -----------------------------------------------------------------
    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """Value of each key, -1 where absent. keys ``[N]`` (duplicates allowed)."""
        mixed = mix64_torch(keys)
        out = self._lookup(mixed)
        if self._side >= 0:
            out = torch.where(mixed == _EMPTY, self._side, out)
        return out

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Sets ``map[keys[i]] = values[i]``. keys ``[N]`` unique, values ``[N]`` >= 0."""
        if keys.numel() == 0:
            return
        mixed = mix64_torch(keys)
        values = values.to(torch.int64)
        side = mixed == _EMPTY
        if bool(side.any()):
            pos = side.nonzero()[0, 0]
            if self._side < 0:
                self._live += 1
            self._side = int(values[pos])
            keep = (~side).nonzero().squeeze(1)
            mixed, values = mixed[keep], values[keep]
        present = self._lookup_raw(mixed)  # -1: no bucket, -3: dead, >= 0: live
        new_live = int((present < 0).sum())
        new_buckets = int((present == _EMPTY).sum())
        if self._used + new_buckets > self.max_load * self._cap:
            self._rebuild(self._live + new_live)
            present = self._lookup_raw(mixed)
            new_buckets = int((present == _EMPTY).sum())
        self._put(mixed, values)
        self._live += new_live
        self._used += new_buckets

    def delete(self, keys: torch.Tensor) -> None:
        """Forgets ``keys`` ``[N]`` (unique; absent ones are ignored)."""
        if keys.numel() == 0:
            return
        mixed = mix64_torch(keys)
        side = mixed == _EMPTY
        if bool(side.any()) and self._side >= 0:
            self._side = -1
            self._live -= 1
        present = self._lookup_raw(mixed)
        live = ((present >= 0) & ~side).nonzero().squeeze(1)
        if live.numel():
            self._put(mixed[live], torch.full_like(live, _DEAD))
            self._live -= live.numel()

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mixed keys, values)`` of live entries (``mix64`` of the keys)."""
        live = (self._table[:, 0] != _EMPTY) & (self._table[:, 1] >= 0)
        k, v = self._table[live, 0], self._table[live, 1]
        if self._side >= 0:
            k = torch.cat([k, torch.tensor([_EMPTY], device=self.device)])
            v = torch.cat([v, torch.tensor([self._side], device=self.device)])
        return k, v

    # -- internals -------------------------------------------------------------------
    def _rebuild(self, live_needed: int) -> None:
        k, v = self._table[:, 0], self._table[:, 1]
        live = (k != _EMPTY) & (v >= 0)
        keys, vals = k[live], v[live]
        cap = self._cap
        while live_needed > self.max_load * cap / 2:  # leave room for dead entries
            cap *= 2
        self._alloc(cap)
        self._put(keys, vals)
        self._used = keys.numel()

    def _lookup(self, mixed: torch.Tensor) -> torch.Tensor:
        """Values of mixed keys (-1 absent or dead)."""
        return self._lookup_raw(mixed).clamp(min=-1)

    def _lookup_raw(self, mixed: torch.Tensor) -> torch.Tensor:
        """The bucket value: -1 where no bucket holds the key, -3 dead, else the value."""
        if mixed.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if self.backend == "triton":
            return triton_hash.probe(mixed, self._table)[0]
        if self.backend == "fbgemm":
            offsets = torch.tensor([0, mixed.numel()], dtype=torch.int64)
            return torch.ops.fbgemm.pruned_hashmap_lookup(
                mixed, offsets, self._table, self._table_offsets
            )
        return self._torch_probe(mixed)[0]

    def _torch_probe(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bucket value, bucket)`` of each mixed key: the bucket holding it, else the
        first empty bucket of its chain (value -1)."""
        out = torch.full_like(mixed, _EMPTY)
        bucket = torch.empty_like(mixed)
        pending = torch.arange(mixed.numel(), device=self.device)
        pos = mix64_torch(mixed) & self._mask
        k = mixed
        while pending.numel():
            entry = self._table.index_select(0, pos)
            empty = entry[:, 0] == _EMPTY
            match = entry[:, 0] == k
            done = empty | match
            idx = pending[done]
            out[idx] = torch.where(match[done], entry[done, 1], _EMPTY)
            bucket[idx] = pos[done]
            more = ~done
            pending, pos, k = pending[more], (pos[more] + 1) & self._mask, k[more]
        return out, bucket

    def _put(self, mixed: torch.Tensor, values: torch.Tensor) -> None:
        """Upserts unique mixed keys (none equal to -1); values >= 0 or -3 (dead)."""
        if mixed.numel() == 0:
            return
        if self.backend == "triton":  # one launch: find or claim, then set every value
            _, bucket, _ = triton_hash.probe_or_claim(mixed, self._table)
            self._table[bucket, 1] = values
            return
        if self.backend == "fbgemm":
            offsets = torch.tensor([0, mixed.numel()], dtype=torch.int64)
            torch.ops.fbgemm.pruned_hashmap_insert(
                mixed, values, offsets, self._table, self._table_offsets
            )
            return
        # torch: keys are unique, so two keys never want the same *existing* bucket;
        # new keys may race for an empty one: the claim that lands wins, others retry.
        pending = torch.arange(mixed.numel(), device=self.device)
        claim = torch.full((self._cap,), -1, dtype=torch.int64, device=self.device)
        while pending.numel():
            raw, bucket = self._torch_probe(mixed[pending])
            exists = raw != _EMPTY
            upd = pending[exists]
            self._table[bucket[exists], 1] = values[upd]
            cand, cpos = pending[~exists], bucket[~exists]
            claim[cpos] = cand
            won = claim[cpos] == cand
            win, wpos = cand[won], cpos[won]
            self._table[wpos] = torch.stack([mixed[win], values[win]], dim=1)
            pending = cand[~won]

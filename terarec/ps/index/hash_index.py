"""Vectorised open-addressing hash index: int64 key -> dense slot id.

Two backends behind one class, both keeping slot ids dense (0, 1, 2, ...) so that the
rows they index never move when the index grows:

* ``fbgemm`` (CPU, the default there): FBGEMM's ``pruned_hashmap_insert`` /
  ``pruned_hashmap_lookup`` kernels (C++ linear probing over a ``[cap, 2]`` key/value
  table) hold the keys as they are: the kernels hash them themselves (MurmurHash3's
  64-bit finalizer, so ids that share low bits still spread). They reserve key -1 as
  the empty marker, so key -1 keeps its slot on the side. The kernels are
  single-threaded loops that release the GIL, so a lookup is split into
  ``torch.get_num_threads()`` contiguous chunks run on a small thread pool; inserts
  (new keys only, after the lookup) run as one call, since two writers could claim the
  same empty bucket.
* ``torch`` (any device; the reference and the CUDA path): every operation is a
  handful of torch ops per *probe round* (never per key). Linear probing over a
  power-of-two table kept at most half full, so the expected number of rounds is ~2;
  the loop runs until no key is pending.

Insertion of keys that are not present is resolved without atomics: all pending keys
that reach an empty bucket in the same round write their position into a claim array;
the write that lands wins the bucket, the others probe on. Slot ids are handed out
densely (0, 1, 2, ...) so that the rows they index never move when the index grows.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Optional

import torch

from terarec.hashing import mix64_torch
from terarec.ps.index import triton_hash

Backend = Literal["auto", "torch", "fbgemm", "triton"]

_EMPTY = -1
# Most keys resolve in their home bucket, so early rounds look at one bucket per key;
# once few keys are pending (the long tail of probe chains) each round scans a window
# of buckets so the tail ends in a round or two instead of dozens of tiny rounds.
_TAIL_WINDOW = 16
_TAIL_PENDING = 2048


# A lookup is split over threads only when each gets at least this many keys: below
# it, handing a chunk to a pool thread costs more than probing it.
_MIN_CHUNK = 16384
_pool: Optional[ThreadPoolExecutor] = None
_pool_pid = -1
_pool_workers = 0
_pool_lock = threading.Lock()


def _lookup_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool for split lookups (made again after a fork: the threads of
    a pool do not survive one)."""
    global _pool, _pool_pid, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid() or _pool_workers < workers:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="terarec-index")
            _pool_pid, _pool_workers = os.getpid(), workers
        return _pool


# Tables from this size up go on transparent huge pages (one 2 MiB page or more).
_HUGE_MIN_BYTES = 1 << 21


def host_table(cap: int) -> torch.Tensor:
    """A ``[cap, 2]`` int64 CPU table filled with -1, on transparent huge pages where the
    kernel grants them through ``madvise`` (THP ``madvise`` mode; with ``always`` every
    large allocation gets them anyway). Every probe is a random access into the table:
    on 4 KiB pages nearly each one also misses the TLB (a page walk, dearer still in a
    VM); huge pages made find-or-insert on a 256 MB table ~15-25% faster here. The cost:
    the kernel may compact memory to find free huge pages, so an allocation (a rehash)
    can take longer, most of all the first one in a fragmented process.
    """
    nbytes = cap * 16
    if nbytes < _HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.full((cap, 2), _EMPTY, dtype=torch.int64)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    table = torch.frombuffer(buf, dtype=torch.int64).view(cap, 2)  # keeps `buf` alive
    return table.fill_(_EMPTY)


def _width(pending: int, total: int) -> int:
    return _TAIL_WINDOW if pending <= max(_TAIL_PENDING, total // 32) else 1


def fbgemm_hashmap_available() -> bool:
    """Whether FBGEMM's CPU hash-map kernels are loaded."""
    try:
        import fbgemm_gpu  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops.fbgemm, "pruned_hashmap_insert") and hasattr(
        torch.ops.fbgemm, "pruned_hashmap_lookup"
    )


def bucket_count(capacity: int) -> int:
    """Initial buckets for ``capacity``: a power of two, at least 16."""
    return max(16, 1 << (max(capacity, 1) - 1).bit_length())


def check_max_load(max_load: float) -> float:
    if not 0.1 <= max_load <= 0.9:
        raise ValueError(f"max_load must be in [0.1, 0.9], got {max_load}")
    return max_load


def _resolve_backend(backend: Backend, device: torch.device) -> str:
    if backend not in ("auto", "torch", "fbgemm", "triton"):
        raise ValueError(
            f"hash index backend must be auto, torch, fbgemm or triton, got {backend!r}"
        )
    if backend == "fbgemm" and (device.type != "cpu" or not fbgemm_hashmap_available()):
        raise ValueError("the fbgemm hash index backend needs a CPU device and fbgemm_gpu")
    if backend == "triton" and not triton_hash.available(device):
        raise ValueError(
            "the triton hash index backend needs triton and a CUDA device "
            "(or TRITON_INTERPRET=1 on CPU)"
        )
    if backend == "auto":
        if device.type == "cuda" and triton_hash.available(device):
            return "triton"
        return "fbgemm" if device.type == "cpu" and fbgemm_hashmap_available() else "torch"
    return backend


class BucketTable:
    """What both hash maps share: device, backend and the ``[cap, 2]`` int64 bucket table
    (mixed key, value), ``_EMPTY`` where no key is.

    Args:
        device: where the table lives.
        max_load: rehash / rebuild bound on the buckets in use.
        backend: ``auto`` (fbgemm on CPU when available, else torch), ``torch``, ``fbgemm``.
    """

    def __init__(self, device: torch.device | str, max_load: float, backend: Backend) -> None:
        self.max_load = check_max_load(max_load)
        self.device = torch.device(device)
        self.backend = _resolve_backend(backend, self.device)

    def _alloc_table(self, cap: int) -> None:
        """A fresh, empty table of ``cap`` buckets (a power of two)."""
        self._cap = cap
        self._mask = cap - 1
        # Key and value side by side: one cache line holds a whole probe window.
        if self.backend == "fbgemm":  # on huge pages (see host_table)
            self._table = host_table(cap)
        else:
            self._table = torch.full((cap, 2), _EMPTY, dtype=torch.int64, device=self.device)
        self._table_offsets = torch.tensor([0, cap], dtype=torch.int64)


class HashIndex(BucketTable):
    """Maps unbounded int64 keys to dense slot ids ``[0, len(self))``.

    Args:
        device: where the index lives (the tier's device).
        capacity: initial bucket count (rounded up to a power of two).
        max_load: rehash into twice the buckets when the load would exceed this.
        backend: ``auto`` (fbgemm on CPU when available, else torch), ``torch``, ``fbgemm``.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        capacity: int = 1024,
        max_load: float = 0.5,
        backend: Backend = "auto",
    ) -> None:
        super().__init__(device, max_load, backend)
        self._size = 0
        self._special = -1  # fbgemm backend: slot of the key whose mixed value is -1
        self._unindexed: list[int] = []  # slots with a key but no bucket (append_unindexed)
        self._alloc(bucket_count(capacity))
        self._slot_keys = torch.empty(0, dtype=torch.int64, device=self.device)

    def _alloc(self, cap: int) -> None:
        self._alloc_table(cap)
        if self.backend == "torch":
            self._claim = torch.full((cap,), -1, dtype=torch.int64, device=self.device)
            self._window = torch.arange(_TAIL_WINDOW, device=self.device)

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._cap

    def keys(self) -> torch.Tensor:
        """Keys in slot order: ``keys()[s]`` is the key of slot ``s``. ``[len(self)]``."""
        return self._slot_keys[: self._size]

    def _home(self, keys: torch.Tensor) -> torch.Tensor:
        return mix64_torch(keys) & self._mask

    def _scan(
        self, pos: torch.Tensor, keys: torch.Tensor, w: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Looks at ``w`` buckets from ``pos`` for each key.

        Returns ``(hit, hit_val, has_empty, empty_pos)``: whether the key sits in the
        window before its first empty bucket, its slot id there, whether the window has
        an empty bucket (then the key is absent if not hit), and that bucket.
        """
        ar = self._window[:w]
        wpos = (pos.unsqueeze(1) + ar) & self._mask  # [P, w]
        win = self._table.index_select(0, wpos.view(-1)).view(-1, w, 2)
        vals = win[..., 1]
        empty = vals < 0
        has_empty = empty.any(dim=1)
        first_empty = torch.where(has_empty, empty.byte().argmax(dim=1), w)
        # A match counts only before the first empty bucket (linear-probing invariant).
        match = (win[..., 0] == keys.unsqueeze(1)) & (ar < first_empty.unsqueeze(1))
        hit = match.any(dim=1)
        hit_val = (vals * match).sum(dim=1)  # the single matching slot id
        empty_pos = (pos + first_empty) & self._mask
        return hit, hit_val, has_empty, empty_pos

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key, -1 where absent.

        Args:
            keys: int64 ``[N]`` (duplicates allowed).
        Returns:
            int64 ``[N]``.
        """
        if self.backend != "torch":
            return self._fb_find(self._stored(keys))
        out = torch.full_like(keys, -1)
        pending = torch.arange(keys.numel(), device=keys.device)
        pos = self._home(keys)
        k = keys
        while pending.numel():
            w = _width(pending.numel(), keys.numel())
            hit, hit_val, has_empty, _ = self._scan(pos, k, w)
            out[pending[hit]] = hit_val[hit]
            more = ~hit & ~has_empty
            pending, pos, k = pending[more], (pos[more] + w) & self._mask, k[more]
        return out

    def find_or_insert(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot of each key, inserting absent keys with fresh slot ids.

        Args:
            keys: int64 ``[N]``, **unique**.
        Returns:
            ``(slots, inserted)``: int64 ``[N]`` slot ids and bool ``[N]``, True where the
            key was new (new keys get the ids ``len(self)`` onwards).
        """
        n = keys.numel()
        if self._size + n > self.max_load * self._cap:
            self._grow(self._size + n)
        if self.backend == "triton":
            return self._tr_find_or_insert(keys)
        if self.backend == "fbgemm":
            return self._fb_find_or_insert(keys)
        out = torch.full_like(keys, -1)
        inserted = torch.zeros(n, dtype=torch.bool, device=keys.device)
        self._probe(keys, out, inserted, None)
        return out, inserted

    # -- fbgemm backend ----------------------------------------------------------------
    def _stored(self, keys: torch.Tensor) -> torch.Tensor:
        """The keys as the table holds them: as they are for fbgemm (its kernels hash
        them), ``mix64`` for triton (whose kernels take the low bits as the bucket)."""
        if self.backend == "fbgemm":  # the kernels read the raw buffer
            return keys.to(torch.int64).contiguous()
        return mix64_torch(keys)

    def _fb_lookup(
        self, stored: torch.Tensor, start: int, misses: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One kernel call: slots of ``stored [C]`` (-1: no bucket holds the key) and,
        if ``misses``, the positions of those -1 plus ``start``, ascending."""
        offsets = torch.tensor([0, stored.numel()], dtype=torch.int64)
        out = torch.ops.fbgemm.pruned_hashmap_lookup(
            stored, offsets, self._table, self._table_offsets
        )
        return out, (out < 0).nonzero().squeeze(1).add_(start) if misses else None

    def _fb_lookup_split(
        self, stored: torch.Tensor, misses: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`_fb_lookup` of ``stored [N]`` on ``torch.get_num_threads()`` threads at
        once (the kernel is a single-threaded loop that runs without the GIL); the misses
        are found inside the threads too. The keys are cut into ~4 contiguous chunks per
        thread that the threads take in turn, so a thread the OS preempts (a shared
        machine) holds up a small chunk, not half the batch."""
        n = stored.numel()
        parts = min(torch.get_num_threads(), n // _MIN_CHUNK)
        if parts <= 1:
            return self._fb_lookup(stored, 0, misses)
        step = max(_MIN_CHUNK, -(-n // (4 * parts)))
        starts = list(range(0, n, step))  # one entry per chunk
        got: list[Any] = [None] * len(starts)
        turn = itertools.count()  # next() is atomic under the GIL

        def work() -> None:
            for i in iter(turn.__next__, None):
                if i >= len(starts):
                    return
                got[i] = self._fb_lookup(stored[starts[i] : starts[i] + step], starts[i], misses)

        pool = _lookup_pool(parts - 1)
        futs = [pool.submit(work) for _ in range(parts - 1)]
        work()
        for f in futs:
            f.result()
        out = torch.cat([g[0] for g in got])
        return out, torch.cat([g[1] for g in got]) if misses else None

    def _fb_side(self, stored: torch.Tensor, out: torch.Tensor, miss: torch.Tensor) -> torch.Tensor:
        """Key -1 is the kernels' empty marker: they always miss it, and its slot (if it
        has one) is kept on the side. Fills that slot into ``out``; returns the misses
        left (positions ``[M]``)."""
        if self._special < 0 or miss.numel() == 0:
            return miss
        side = stored.index_select(0, miss) == _EMPTY
        if not bool(side.any()):
            return miss
        out.index_fill_(0, miss[side], self._special)
        return miss[~side]

    def _fb_find(self, mixed: torch.Tensor) -> torch.Tensor:
        """Slots of stored keys ``[N]`` (-1: absent), fbgemm or triton."""
        if mixed.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=mixed.device)
        if self.backend == "triton":
            out, _ = triton_hash.probe(mixed, self._table)
            if self._special >= 0:
                out.masked_fill_(mixed == _EMPTY, self._special)
            return out
        out, miss = self._fb_lookup_split(mixed, misses=self._special >= 0)
        if miss is not None:
            self._fb_side(mixed, out, miss)
        return out

    def _fb_insert(self, mixed: torch.Tensor, ids: torch.Tensor) -> None:
        """Inserts absent ``mixed`` keys with slot ``ids`` (the -1 key goes to the side)."""
        if mixed.numel() == 0:
            return
        side = (mixed == _EMPTY).nonzero()
        if side.numel():
            self._special = int(ids[side[0, 0]])
            ids = torch.where(mixed == _EMPTY, -1, ids)  # -1: the kernel skips the entry
        if self.backend == "triton":
            _, bucket, claimed = triton_hash.probe_or_claim(mixed, self._table)
            put = claimed.nonzero().squeeze(1)
            self._table[bucket[put], 1] = ids[put]
            return
        offsets = torch.tensor([0, mixed.numel()], dtype=torch.int64)
        torch.ops.fbgemm.pruned_hashmap_insert(
            mixed, ids, offsets, self._table, self._table_offsets
        )

    def _fb_find_or_insert(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Lookup first (most keys of a batch are present; the lookup runs on all
        # threads), then one insert call for the new keys only. The table holds the
        # keys as they are, so the stored keys are the keys.
        stored = self._stored(keys)
        out, miss = self._fb_lookup_split(stored, misses=True)
        new = self._fb_side(stored, out, miss)  # type: ignore[arg-type]
        inserted = torch.zeros(keys.numel(), dtype=torch.bool)
        if new.numel():
            first = self._size
            ids = torch.arange(first, first + new.numel(), dtype=torch.int64)
            out.index_copy_(0, new, ids)
            inserted.index_fill_(0, new, True)
            new_keys = stored.index_select(0, new)
            self._append_slot_keys(new_keys)
            self._fb_insert(new_keys, ids)
        return out, inserted

    def _tr_find_or_insert(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton: one fused probe-or-claim launch, then the new keys' ids in key order."""
        mixed = mix64_torch(keys)
        out, bucket, claimed = triton_hash.probe_or_claim(mixed, self._table)
        side = mixed == _EMPTY
        if self._special >= 0:
            out = torch.where(side, self._special, out)
            new = claimed
        else:
            new = claimed | side
        rank = torch.cumsum(new, 0)
        first = self._size
        n_new = int(rank[-1]) if keys.numel() else 0
        if n_new:
            out = torch.where(new, first + rank - 1, out)
            put = claimed.nonzero().squeeze(1)
            self._table[bucket[put], 1] = out[put]
            if self._special < 0 and bool(side.any()):
                self._special = int(out[side.nonzero()[0, 0]])
            self._append_slot_keys(keys[new])
        return out, out >= first

    # -- torch backend -----------------------------------------------------------------
    def _probe(
        self,
        keys: torch.Tensor,
        out: torch.Tensor,
        inserted: torch.Tensor,
        fixed_vals: Optional[torch.Tensor],
    ) -> None:
        """Rounds of find-or-insert; ``fixed_vals`` (rehash) gives the slot ids."""
        pending = torch.arange(keys.numel(), device=keys.device)
        pos = self._home(keys)
        while pending.numel():
            k = keys[pending]
            w = _width(pending.numel(), keys.numel())
            hit, hit_val, has_empty, empty_pos = self._scan(pos, k, w)
            out[pending[hit]] = hit_val[hit]
            try_ins = ~hit & has_empty
            cand, cpos = pending[try_ins], empty_pos[try_ins]
            self._claim[cpos] = cand
            won = self._claim[cpos] == cand
            win, wpos = cand[won], cpos[won]
            if win.numel():
                if fixed_vals is None:
                    new_ids = torch.arange(self._size, self._size + win.numel(), device=keys.device)
                    self._append_slot_keys(keys[win])
                    inserted[win] = True
                else:
                    new_ids = fixed_vals[win]
                self._table[wpos] = torch.stack([keys[win], new_ids], dim=1)
                out[win] = new_ids
            # Lost a claim: retry the same window (the winner now fills that bucket).
            # Window full of other keys: move on to the next window.
            full = ~hit & ~has_empty
            lost = torch.zeros_like(hit)
            lost[try_ins] = ~won
            again = full | lost
            pos = torch.where(full, (pos + w) & self._mask, pos)
            pending, pos = pending[again], pos[again]

    def _append_slot_keys(self, new_keys: torch.Tensor) -> None:
        need = self._size + new_keys.numel()
        if need > self._slot_keys.numel():
            grown = torch.empty(
                max(need, 2 * self._slot_keys.numel(), 1024), dtype=torch.int64, device=self.device
            )
            grown[: self._size] = self._slot_keys[: self._size]
            self._slot_keys = grown
        self._slot_keys[self._size : need] = new_keys
        self._size = need

    def append_unindexed(self, keys: torch.Tensor) -> int:
        """Hands out slot ids for ``keys`` without entering them in the buckets.

        For callers that resolve some keys elsewhere (a composite key shared by two
        namespaces); ``keys()`` lists them, ``find`` never returns them. Returns the
        first new slot id.
        """
        first = self._size
        self._append_slot_keys(keys.to(self.device, torch.int64).reshape(-1))
        self._unindexed.extend(range(first, self._size))
        return first

    def _grow(self, needed: int) -> None:
        """Rehashes every key (keeping its slot id) into enough buckets for ``needed``."""
        cap = self._cap
        while needed > self.max_load * cap:
            cap *= 2
        keys = self.keys()
        self._alloc(cap)
        ids = torch.arange(keys.numel(), device=self.device)
        if self._unindexed:
            keep = torch.ones(keys.numel(), dtype=torch.bool, device=self.device)
            keep[torch.tensor(self._unindexed, device=self.device)] = False
            keys, ids = keys[keep], ids[keep]
        if self.backend != "torch":
            self._special = -1
            self._fb_insert(self._stored(keys), ids)
            return
        out = torch.empty_like(keys)
        self._probe(keys, out, torch.zeros(0, dtype=torch.bool, device=self.device), ids)

    def load_keys(self, keys: torch.Tensor) -> None:
        """Rebuilds the index so that slot ``s`` holds ``keys[s]`` (inverse of :meth:`keys`)."""
        keys = keys.to(self.device, torch.int64)
        if torch.unique(keys).numel() != keys.numel():
            raise ValueError("load_keys: keys must be unique")
        self._size = 0
        self._special = -1
        self._unindexed = []
        self._slot_keys = torch.empty(0, dtype=torch.int64, device=self.device)
        self._append_slot_keys(keys)
        self._alloc(16)
        self._grow(keys.numel())

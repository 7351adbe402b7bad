"""Batches from a preprocessed (columnar) dataset: slices of mapped arrays, built by a
pool of threads ahead of the consumer.

Units and sharding. The dataset's chunks are the units: with at least ``world_size``
parts, part ``i`` goes to rank ``i % world_size`` (whole parts); with fewer, every rank
takes the chunks ``c`` (numbered over all parts in order) with ``c % world_size == rank``.

Order. A pass visits this rank's chunks in file order, or with ``shuffle_buffer > 0``
(train split) in an order permuted per pass; consecutive chunks are grouped into
*windows* of at least ``shuffle_buffer`` rows (one chunk without shuffling) and a
window's rows are permuted with an RNG seeded by (seed, pass, window, rank). Batches are
cut from the windows back to back, so a batch may span two windows. Without shuffling
the rows come in exactly the order of the text the dataset was made from.

Position: ``{"kind": "columnar", split, rank, world_size, num_parts, "pass": p,
"window": w, "skip": rows of window w already handed out}``; resuming rebuilds pass
``p``'s window list (a function of the seed and the pass), reloads window ``w`` and drops
``skip`` rows.

Threads. Loading a window (mapping, permuting) and assembling a batch (slicing, one
copy per array, pinning) run on ``workers`` threads; numpy copies and gathers release the
GIL, so the threads run in parallel. Batches are handed out in order; the result does
not depend on ``workers``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.data.batch import Batch
from terarec.data.columnar import Dataset, PartReader
from terarec.data.errors import DataError, logger
from terarec.data.rows import ragged_index
from terarec.data.stream import Counters


@dataclass
class Window:
    """Consecutive chunks of one pass, ready to be cut into batches.

    Attributes:
        labels: float32 ``[n]``; dense: float32 ``[n, D]``; lengths: int32 ``[F, n]``.
        values: int64 ``[V]`` every key of the window (each chunk's keys, feature-major).
        pos: int64 ``[F, n + 1]``: row ``r``'s keys of feature ``f`` start at
            ``values[pos[f, r]]``; column ``n`` ends each feature (one-chunk windows).
            None in the single-key shuffled layout.
        perm: int64 ``[n]`` the order rows are handed out in (None: file order).
        padded: the single-key shuffled layout: when every row has at most one key per
            feature, int64 ``[F, n]`` the key (0 where missing), so a random batch is two
            ``take``s and one mask instead of a ragged gather.
    """

    labels: np.ndarray
    dense: np.ndarray
    lengths: np.ndarray
    values: np.ndarray
    pos: Optional[np.ndarray]
    perm: Optional[np.ndarray] = None
    padded: Optional[np.ndarray] = None

    @staticmethod
    def of_chunks(chunks: list[tuple[np.ndarray, ...]], perm_rng: Optional[np.random.Generator]
                  ) -> Window:
        """Builds a window from ``PartReader.arrays`` tuples (one chunk, file order: no
        copies)."""
        if len(chunks) == 1:
            labels, dense, lengths, values = chunks[0]
        else:
            labels, dense, lengths, values = (
                np.concatenate([c[k] for c in chunks], axis=1 if k == 2 else 0)
                for k in range(4))
        n = len(labels)
        perm = None if perm_rng is None else perm_rng.permutation(n)
        if perm is not None and (len(values) == 0 or int(lengths.max(initial=0)) <= 1):
            padded = np.zeros(lengths.shape, dtype=np.int64)
            start = 0
            for _, _, lc, vc in chunks:  # a chunk's keys: feature by feature, rows in order
                r, v = lc.shape[1], 0
                for f in range(lc.shape[0]):
                    present = lc[f].astype(bool)
                    k = int(np.count_nonzero(present))
                    padded[f, start : start + r][present] = vc[v : v + k]
                    v += k
                start += r
            return Window(labels, dense, lengths, values, None, perm, padded)
        pos_parts, base = [], 0
        for _, _, lc, vc in chunks:
            nf, r = lc.shape
            pos = np.empty((nf, r + 1), dtype=np.int64)
            pos[:, 0] = 0
            np.cumsum(lc, axis=1, out=pos[:, 1:])
            feat_base = np.concatenate([[0], np.cumsum(pos[:, -1])[:-1]])
            pos += (feat_base + base)[:, None]
            pos_parts.append(pos)
            base += len(vc)
        pos = pos_parts[0] if len(chunks) == 1 else np.concatenate(
            [p[:, :-1] for p in pos_parts] + [pos_parts[-1][:, -1:]], axis=1)
        return Window(labels, dense, lengths, values, pos, perm)

    def keys(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``a..b-1`` (in hand-out order): their keys, feature-major, and the
        count per feature ``[F]``."""
        if self.perm is None:
            assert self.pos is not None
            s, e = self.pos[:, a], self.pos[:, b]
            return np.concatenate([self.values[x:y] for x, y in zip(s, e)]), e - s
        idx = self.perm[a:b]
        if self.padded is not None:
            mask = np.take(self.lengths, idx, axis=1).astype(bool)  # [F, B]
            return np.take(self.padded, idx, axis=1)[mask], mask.sum(axis=1)
        assert self.pos is not None
        lens = np.take(self.lengths, idx, axis=1).astype(np.int64)
        starts = np.take(self.pos, idx, axis=1)
        return self.values[ragged_index(starts.ravel(), lens.ravel())], lens.sum(axis=1)

    def rows(self, a: int, b: int, labels: np.ndarray, dense: np.ndarray,
             lengths: np.ndarray) -> None:
        """Writes labels, dense and lengths of rows ``a..b-1`` into the given views."""
        if self.perm is None:
            labels[:] = self.labels[a:b]
            dense[:] = self.dense[a:b]
            lengths[:] = self.lengths[:, a:b]
            return
        idx = self.perm[a:b]
        np.take(self.labels, idx, out=labels, mode="clip")
        np.take(self.dense, idx, axis=0, out=dense, mode="clip")
        np.take(self.lengths, idx, axis=1, out=lengths, mode="clip")


Segment = tuple["Future[Window]", int, int]  # (window, first row, end row)


class _Done(Future):
    """An already-completed future (the synchronous path)."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.set_result(value)


def assemble(segments: list[tuple[Window, int, int]], keys: list[str], pin: bool,
             position: dict[str, Any]) -> Batch:
    """One batch from row ranges of windows, written straight into its output tensors.

    Args:
        segments: ``(window, a, b)``: rows ``a..b-1`` of ``window``, in batch order.
        keys: the KJT keys (feature order of the windows' lengths).
        pin: allocate the batch in pinned host memory (for an async copy to the GPU).
        position: the stream position after this batch.

    Returns:
        The batch: dense ``[B, D]``, KJT feature-major over ``keys``, labels ``[B]``.
    """
    n = sum(b - a for _, a, b in segments)
    first = segments[0][0]
    nf, nd = first.lengths.shape[0], first.dense.shape[1]

    def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    labels, dense, lengths = (empty((n,), torch.float32), empty((n, nd), torch.float32),
                              empty((nf, n), torch.int32))
    ln, dn, lgn = labels.numpy(), dense.numpy(), lengths.numpy()
    parts, i = [], 0
    for w, a, b in segments:
        w.rows(a, b, ln[i : i + b - a], dn[i : i + b - a], lgn[:, i : i + b - a])
        parts.append(w.keys(a, b))
        i += b - a
    if len(parts) == 1 and not pin:
        values = torch.from_numpy(np.ascontiguousarray(parts[0][0]))
    else:
        nvals = sum(int(c.sum()) for _, c in parts)
        values = empty((nvals,), torch.int64)
        vn, j = values.numpy(), 0
        splits = [np.split(k, np.cumsum(c)[:-1]) for k, c in parts]
        for f in range(nf):
            for per_feature in splits:
                x = per_feature[f]
                vn[j : j + len(x)] = x
                j += len(x)
    per_key = lgn.sum(axis=1, dtype=np.int64).tolist()  # on the host: no device sync later
    kjt = KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths.view(-1), stride=n,
                            length_per_key=per_key, offset_per_key=_offsets(per_key))
    return Batch(dense=dense, sparse=kjt, labels=labels, position=position)


def _offsets(per_key: list[int]) -> list[int]:
    out = [0]
    for v in per_key:
        out.append(out[-1] + v)
    return out


class ColumnarStream:
    """Batches of one (split, rank) of a preprocessed dataset.

    Args:
        ds: the dataset.
        split: "train" or "eval" (only the train split shuffles).
        seed, rank, world_size: as in ``build_source``.
        epochs: passes before stopping (fractions: that share of this rank's rows of the
            last pass); None = endless.
        batch_size: rows per batch (the last batch of a finite stream may be short).
        shuffle: ``shuffle_buffer`` rows (0: file order).
        workers: threads loading windows and assembling batches (0: the caller's thread).
        pin: build batches in pinned memory.
        counters: the source's counters.
    """

    def __init__(
        self, ds: Dataset, split: str, seed: int, rank: int, world_size: int,
        epochs: Optional[float], batch_size: int, shuffle: int, workers: int, pin: bool,
        counters: Counters,
    ) -> None:
        self.ds = ds
        self.keys = list(ds.sparse)
        self.split, self.seed, self.rank, self.world = split, seed, rank, world_size
        self.epochs = epochs
        self.passes = None if epochs is None else math.ceil(epochs)
        self.bs = batch_size
        self.shuffle = shuffle if split == "train" else 0
        self.workers = workers
        self.pin = pin
        self.counters = counters
        self.placed = pin
        self.units = self.units_of(rank, world_size)
        self.unit_rows = np.array([ds.parts[p].chunks[c].rows for p, c in self.units],
                                  dtype=np.int64)
        self._readers: dict[int, PartReader] = {}
        # a position carried over from another rank layout (data/reshard.py): in its
        # pass, the chunks done already are skipped
        self._plan: Optional[dict[str, Any]] = None

    def units_of(self, rank: int, world_size: int) -> list[tuple[int, int]]:
        """The ``(part, chunk)`` units ``rank`` of ``world_size`` reads: whole parts
        when there are as many parts as ranks, else every ``world_size``-th chunk."""
        units = [(p, c) for p, part in enumerate(self.ds.parts) for c in range(len(part.chunks))]
        if len(self.ds.parts) >= world_size:
            return [u for u in units if u[0] % world_size == rank]
        return units[rank::world_size]

    # ------------------------------------------------------------------ state
    def _base(self) -> dict[str, Any]:
        return {"kind": "columnar", "split": self.split, "rank": self.rank,
                "world_size": self.world, "num_parts": len(self.ds.parts)}

    def initial_state(self) -> dict[str, Any]:
        return {**self._base(), "pass": 0, "window": 0, "skip": 0}

    def check_state(self, state: dict[str, Any]) -> None:
        want = self._base()
        got = {k: state.get(k) for k in want}
        if got != want:
            raise DataError(f"data state does not match this source: state {got}, source {want}")

    # ------------------------------------------------------------------ plan
    def _windows(self, p: int) -> list[list[int]]:
        """Pass ``p``'s windows: lists of indices into ``self.units``."""
        idx = list(range(len(self.units)))
        if self._plan is not None and int(self._plan["pass"]) == p:
            done = {(int(a), int(b)) for a, b in self._plan["done"]}
            idx = [i for i in idx if self.units[i] not in done]
        wins = self.windows_of([self.units[i] for i in idx], p, self.rank)
        return [[idx[j] for j in win] for win in wins]

    def windows_of(self, units: list[tuple[int, int]], p: int, rank: int) -> list[list[int]]:
        """The windows in which ``rank`` reads ``units`` in pass ``p``: lists of indices
        into ``units``, each window at least ``shuffle`` rows (one unit unshuffled)."""
        rows = [self.ds.parts[a].chunks[c].rows for a, c in units]
        order = np.arange(len(units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, p, rank, 0xC0]).permutation(order)
        out: list[list[int]] = []
        cur: list[int] = []
        n = 0
        for u in order.tolist():
            cur.append(u)
            n += int(rows[u])
            if n >= max(self.shuffle, 1):
                out.append(cur)
                cur, n = [], 0
        if cur:
            out.append(cur)
        return out

    def _pass_limit(self, p: int) -> Optional[int]:
        """Rows of pass ``p`` to hand out (None: all)."""
        if self.epochs is None or p < math.floor(self.epochs):
            return None
        return int(round((self.epochs - math.floor(self.epochs)) * int(self.unit_rows.sum())))

    def _load(self, p: int, w: int, window: list[int]) -> Window:
        parts = []
        for u in window:
            pi, ci = self.units[u]
            r = self._readers.get(pi)
            if r is None:
                r = self._readers.setdefault(pi, self.ds.reader(pi))
            parts.append(r.arrays(ci))
        rng = (np.random.default_rng([self.seed, p, w, self.rank, 0x5B]) if self.shuffle
               else None)
        return Window.of_chunks(parts, rng)

    # ------------------------------------------------------------------ batches
    def batches(self, state: dict[str, Any]) -> Iterator[Batch]:
        self.check_state(state)
        if not self.units:
            raise DataError(f"{self.split} split of rank {self.rank}/{self.world}: no chunks "
                            f"({len(self.ds.parts)} part(s) in {self.ds.root})")
        pool = ThreadPoolExecutor(self.workers, "terarec-columnar") if self.workers else None
        try:
            yield from self._batches(state, pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _batches(self, state: dict[str, Any], pool: Optional[ThreadPoolExecutor]
                 ) -> Iterator[Batch]:
        base = self._base()
        self._plan = state.get("reshard")
        plan = self._plan
        inflight: deque[Future[Batch]] = deque()
        depth = max(2 * self.workers, 1)
        segs: list[Segment] = []
        have = 0
        p, w, skip = int(state["pass"]), int(state["window"]), int(state["skip"])

        def submit(fn: Any, *args: Any) -> Future:
            return pool.submit(fn, *args) if pool is not None else _Done(fn(*args))

        def emit(position: dict[str, Any]) -> Iterator[Batch]:
            nonlocal segs, have
            job, segs, have = segs, [], 0
            inflight.append(submit(self._assemble, job, position))
            self.counters.batches_made += 1
            while len(inflight) > depth or (inflight and inflight[0].done()):
                yield inflight.popleft().result()

        while self.passes is None or p < self.passes:
            wins = self._windows(p)
            limit = self._pass_limit(p)
            before = int(sum(int(self.unit_rows[win].sum()) for win in wins[:w]))
            for wi in range(w, len(wins)):
                full = int(self.unit_rows[wins[wi]].sum())
                n = full if limit is None else min(full, limit - before)
                if n <= skip:
                    break
                last = wi + 1 == len(wins) or (limit is not None and before + n >= limit)
                fut = submit(self._load, p, wi, wins[wi])
                self.counters.rows_read += n - skip
                a = skip
                while a < n:
                    t = min(self.bs - have, n - a)
                    segs.append((fut, a, a + t))
                    have, a = have + t, a + t
                    self.counters.rows_out += t
                    if have == self.bs:
                        pos = ({"pass": p + 1, "window": 0, "skip": 0} if a == n and last
                               else {"pass": p, "window": wi + 1, "skip": 0} if a == n
                               else {"pass": p, "window": wi, "skip": a})
                        if plan is not None and pos["pass"] == int(plan["pass"]):
                            pos["reshard"] = plan
                        yield from emit({**base, **pos})
                before += full
                skip = 0
            p, w, skip = p + 1, 0, 0
        if segs:
            yield from emit({**base, "pass": p, "window": 0, "skip": 0})
        while inflight:
            yield inflight.popleft().result()
        logger.debug("columnar %s rank %d: stream ended after pass %d", self.split, self.rank, p)

    def _assemble(self, job: list[Segment], position: dict[str, Any]) -> Batch:
        return assemble([(f.result(), a, b) for f, a, b in job], self.keys, self.pin, position)

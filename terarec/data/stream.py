"""Deterministic, resumable batch streams (no threads here; see ``source.py``).

A stream turns a *state* (a small dict) into the sequence of batches that follow it.
``Batch.position`` of every batch is the state just after that batch, so restarting a
stream from any batch's position yields exactly the batches that came after it.

File streams (:class:`FileStream`) read *windows*: runs of whole chunks starting at a
file position, at least ``shuffle_buffer`` rows long (one chunk without shuffling). A
window is permuted with an RNG seeded by (seed, pass, window start), so its order is
reproducible from its start alone, and a position is::

    {"pass": p, "file": k, "offset": byte, "line": line, "skip": rows of the window
     already handed out}

Resuming re-reads that one window and drops ``skip`` rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch

from terarec.data.batch import Batch
from terarec.data.errors import DataError, logger
from terarec.data.files import (
    LineChunk,
    data_size,
    iter_line_chunks,
    row_coin,
    shard_files,
)
from terarec.data.rows import Rows
from terarec.data.synthetic import SyntheticGenerator
from terarec.data.synthetic_torch import TorchSyntheticGenerator, batch_seed

_SPLIT_ID = {"train": 0, "eval": 1, "valid": 2}


class LineParser(Protocol):
    features: list[str]

    def start_file(self, path: str) -> int: ...

    def parse(self, chunk: LineChunk, keep: np.ndarray) -> Rows: ...


@dataclass
class Counters:
    """Producer-side counters (written by the producer thread, read by ``stats()``)."""

    rows_read: int = 0  # lines of this rank/split that were parsed
    rows_out: int = 0  # rows put into batches
    batches_made: int = 0


class Stream(Protocol):
    keys: list[str]
    placed: bool  # batches come pinned or on the device already (the source does not pin)

    def initial_state(self) -> dict[str, Any]: ...

    def check_state(self, state: dict[str, Any]) -> None: ...

    def batches(self, state: dict[str, Any]) -> Iterator[Batch]: ...


class Batcher:
    """Cuts a stream of (rows, position-after-each-row) into batches of ``batch_size``."""

    def __init__(self, keys: list[str], batch_size: int, counters: Counters) -> None:
        self.keys = keys
        self.bs = batch_size
        self.counters = counters
        self.pending: list[Rows] = []
        self.n = 0

    def feed(self, rows: Rows, pos_after: Any) -> Iterator[Batch]:
        """Adds ``rows``; ``pos_after(c)`` is the position after the first ``c`` of them."""
        i, m = 0, rows.n
        while i < m:
            t = min(self.bs - self.n, m - i)
            self.pending.append(rows.slice(i, i + t))
            self.n += t
            i += t
            if self.n == self.bs:
                yield self._emit(pos_after(i))

    def flush(self, position: dict[str, Any]) -> Iterator[Batch]:
        if self.n:
            yield self._emit(position)

    def _emit(self, position: dict[str, Any]) -> Batch:
        rows = Rows.concat(self.pending)
        self.pending, self.n = [], 0
        self.counters.rows_out += rows.n
        self.counters.batches_made += 1
        return rows.to_batch(self.keys, dict(position))


def pass_order(mine: list[int], seed: int, p: int, shuffle: bool) -> list[int]:
    """The order in which a rank reads its files ``mine`` in pass ``p``."""
    if shuffle:
        perm = np.random.default_rng([seed, p, 0x5EED]).permutation(len(mine))
        return [mine[i] for i in perm]
    return list(mine)


class FileStream:
    """Batches from line-oriented files for one (split, rank).

    Args:
        files: all files of the split (already expanded, in order).
        parser: turns line chunks into rows (Criteo, CSV or libFM).
        split: "train", "eval" or "valid".
        hold: the band ``[lo, hi)`` of :func:`~terarec.data.files.row_coin` held out of
            each file: a train stream drops those rows (the eval and validation rows),
            an eval or validation stream keeps only them; ``(0, 0)``: every row.
        seed, rank, world_size: as in ``build_source``.
        epochs: passes before stopping; None = endless.
        sizes: (batch_size, chunk_rows, shuffle_buffer) from ``DataConfig``.
        counters: the source's counters.
    """

    placed = False

    def __init__(
        self,
        files: list[str],
        parser: LineParser,
        split: str,
        hold: tuple[float, float],
        seed: int,
        rank: int,
        world_size: int,
        epochs: Optional[float],
        sizes: tuple[int, int, int],
        counters: Counters,
    ) -> None:
        self.files = files
        self.parser = parser
        self.keys = parser.features
        self.split = split
        self.hold = hold
        self.seed = seed
        self.rank = rank
        self.world = world_size
        self.epochs = epochs
        self.batch_size, self.chunk_rows, self.shuffle = sizes
        self.counters = counters
        self.mine, self.strided = shard_files(len(files), rank, world_size)
        self._sizes: Optional[dict[int, int]] = None  # data bytes per file, when needed
        # a position carried over from another rank layout (data/reshard.py): in its
        # pass, files done already are skipped and half-read ones start where noted
        self._plan: Optional[dict[str, Any]] = None
        if epochs is None:
            self.passes: Optional[int] = None
        else:
            self.passes = math.ceil(epochs)

    @property
    def hold_out(self) -> float:
        """A train stream's held-out share: the rows with a coin below it."""
        return self.hold[1] if self.split == "train" else 0.0

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict[str, Any]:
        return {"split": self.split, "rank": self.rank, "world_size": self.world,
                "num_files": len(self.files)}

    def initial_state(self) -> dict[str, Any]:
        return {"kind": "file", **self._fingerprint(), "pass": 0, "file": 0, "offset": 0,
                "line": 0, "skip": 0}

    def check_state(self, state: dict[str, Any]) -> None:
        want = {"kind": "file", **self._fingerprint()}
        got = {k: state.get(k) for k in want}
        if got != want:
            raise DataError(f"data state does not match this source: state {got}, source {want}")

    # ------------------------------------------------------------------ reading
    def _order(self, p: int) -> list[int]:
        order = pass_order(self.mine, self.seed, p, bool(self.shuffle) and self.split == "train")
        if self._plan is not None and int(self._plan["pass"]) == p:
            done = set(self._plan["done"])
            order = [f for f in order if f not in done]
        return order

    def _tag(self, pos: dict[str, Any]) -> dict[str, Any]:
        """A position, with the carried-over plan while in its pass."""
        if self._plan is not None and int(pos["pass"]) == int(self._plan["pass"]):
            return {**pos, "reshard": self._plan}
        return pos

    def _limit(self, p: int, order: list[int]) -> Optional[tuple[int, int]]:
        """(file position k, byte offset) where a fractional last pass stops."""
        if self.epochs is None or p < math.floor(self.epochs):
            return None
        if self._sizes is None:  # a .gz is decompressed once to size it: only here
            size = getattr(self.parser, "size", data_size)  # Parquet: rows, text: bytes
            self._sizes = {i: size(self.files[i]) for i in self.mine}
        sizes = self._sizes
        target = (self.epochs - math.floor(self.epochs)) * sum(sizes.values())
        for k, fi in enumerate(order):
            if target < sizes[fi]:
                return k, int(target)
            target -= sizes[fi]
        return len(order), 0  # pragma: no cover - float rounding at the very end

    def _chunks(self, p: int, k0: int, off0: int, line0: int) -> Iterator[tuple[Rows, tuple]]:
        order = self._order(p)
        limit = self._limit(p, order)
        for k in range(k0, len(order)):
            if limit is not None and k > limit[0]:
                return
            path = self.files[order[k]]
            hdr = self.parser.start_file(path)
            hdr_lines = 1 if hdr else 0
            off, line = (off0, line0) if (k == k0 and off0 > 0) else (hdr, hdr_lines)
            start = self._plan["from"].get(str(order[k])) if (
                self._plan is not None and int(self._plan["pass"]) == p) else None
            if start is not None and not (k == k0 and off0 > 0):
                off, line = int(start[0]), int(start[1])
            stop = limit[1] if limit is not None and k == limit[0] else None
            if stop is not None and stop <= off:
                return
            chunks = getattr(self.parser, "chunks", iter_line_chunks)  # Parquet: by rows
            for chunk in chunks(path, off, line, self.chunk_rows, stop):
                data_idx = chunk.first_line - hdr_lines + np.arange(chunk.n, dtype=np.int64)
                keep = np.ones(chunk.n, dtype=bool)
                if self.strided:
                    keep &= data_idx % self.world == self.rank
                lo, hi = self.hold
                if hi > lo:
                    u = row_coin(path, data_idx)
                    held = (u >= lo) & (u < hi)
                    keep &= ~held if self.split == "train" else held
                self.counters.rows_read += int(keep.sum())
                rows = self.parser.parse(chunk, keep)
                yield rows, (k, chunk.next_offset, chunk.first_line + chunk.n)

    def batches(self, state: dict[str, Any]) -> Iterator[Batch]:
        self.check_state(state)
        self._plan = state.get("reshard")
        base = {"kind": "file", **self._fingerprint()}
        batcher = Batcher(self.keys, self.batch_size, self.counters)
        p, k, off, line, skip = (int(state[x]) for x in ("pass", "file", "offset", "line", "skip"))
        target = max(self.shuffle, 1)
        while self.passes is None or p < self.passes:
            from_start = k == 0 and off == 0 and skip == 0
            pass_rows = 0
            gen = self._chunks(p, k, off, line)
            start = (k, off, line)
            ended = False
            while not ended:
                parts, n, end = [], 0, start
                while n < target:
                    item = next(gen, None)
                    if item is None:
                        ended = True
                        break
                    rows, end = item
                    if rows.n:
                        parts.append(rows)
                        n += rows.n
                if n > skip:
                    window = Rows.concat(parts)
                    if self.shuffle and self.split == "train":
                        rng = np.random.default_rng(
                            [self.seed, p, start[0], start[1], self.rank, 0x5B]
                        )
                        window = window.take(rng.permutation(n))
                    pass_rows += n
                    nxt = {"pass": p + 1, "file": 0, "offset": 0, "line": 0} if ended else {
                        "pass": p, "file": end[0], "offset": end[1], "line": end[2]}
                    here = {"pass": p, "file": start[0], "offset": start[1], "line": start[2]}

                    def pos_after(c: int, s: int = skip, n: int = n, nxt=nxt, here=here) -> dict:
                        if s + c == n:
                            return self._tag({**base, **nxt, "skip": 0})
                        return self._tag({**base, **here, "skip": s + c})

                    yield from batcher.feed(window.slice(skip, n), pos_after)
                skip = 0
                start = end
            if from_start and pass_rows == 0:
                msg = (f"{self.split} split of rank {self.rank}/{self.world}: a whole pass over "
                       f"{len(self.mine)} file(s) gave no rows (filtered or malformed)")
                if self.passes is None:
                    raise DataError(msg)
                logger.warning(msg)
            p, k, off, line = p + 1, 0, 0, 0
        yield from batcher.flush(self._tag(
            {**base, "pass": p, "file": 0, "offset": 0, "line": 0, "skip": 0}))


class SyntheticStream:
    """Endless train batches or the fixed eval set of the synthetic generator.

    placed: batches born on a CUDA device are not pinned by the source.

    With a :class:`~terarec.data.synthetic_torch.TorchSyntheticGenerator` (``device``
    given) batches are drawn with torch ops on that device, batch ``i`` from
    ``torch.Generator(device).manual_seed(batch_seed(...))``; on CUDA on a stream of the
    producer's own, waited for before the batch is handed out (so any stream may read it)
    and recorded on the device's default stream (so its memory outlives the step there).
    """

    def __init__(
        self,
        gen: SyntheticGenerator,
        split: str,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        counters: Counters,
        device_gen: Optional[TorchSyntheticGenerator] = None,
    ) -> None:
        self.gen = gen
        self.device_gen = device_gen
        self.keys = gen.names
        self.split = split
        self.seed = seed
        self.rank = rank
        self.world = world_size
        self.bs = batch_size
        self.counters = counters
        self.placed = device_gen is not None and device_gen.device.type != "cpu"
        self._cuda_stream: Any = None

    def _base(self) -> dict[str, Any]:
        return {"kind": "synthetic", "split": self.split, "rank": self.rank,
                "world_size": self.world}

    def initial_state(self) -> dict[str, Any]:
        return {**self._base(), "batch": 0}

    def check_state(self, state: dict[str, Any]) -> None:
        want = self._base()
        got = {k: state.get(k) for k in want}
        if got != want:
            raise DataError(f"data state does not match this source: state {got}, source {want}")

    def batches(self, state: dict[str, Any]) -> Iterator[Batch]:
        self.check_state(state)
        i = int(state["batch"])
        total = (self.gen.cfg.valid_samples if self.split == "valid"
                 else self.gen.cfg.eval_samples)
        while True:
            if self.split == "train":  # (seed, split, rank, batch), the numpy RNG's seed too
                n, seq = self.bs, (self.seed, 0, self.rank, i)
            else:  # global eval (valid) batch b, dealt round-robin; numpy seeds with
                b = self.rank + i * self.world  # (seed, 1 (2), b)
                n = min(self.bs, total - b * self.bs)
                if n <= 0:
                    return
                seq = (self.seed, _SPLIT_ID[self.split], 0, b)
            i += 1
            self.counters.rows_read += n
            self.counters.rows_out += n
            self.counters.batches_made += 1
            position = {**self._base(), "batch": i}
            if self.device_gen is None:
                rng = np.random.default_rng(list(seq) if seq[1] == 0 else [seq[0], seq[1], seq[3]])
                yield self.gen.rows(rng, n, self.split).to_batch(self.keys, position)
            else:
                yield self._device_batch(seq, n, position)

    def _device_batch(self, seq: tuple[int, int, int, int], n: int,
                      position: dict[str, Any]) -> Batch:
        dg = self.device_gen
        assert dg is not None
        g = torch.Generator(device=dg.device).manual_seed(batch_seed(*seq))
        if dg.device.type != "cuda":
            return dg.batch(g, n, self.keys, position)
        if self._cuda_stream is None:
            self._cuda_stream = torch.cuda.Stream(dg.device)
        with torch.cuda.stream(self._cuda_stream):
            b = dg.batch(g, n, self.keys, position)
        self._cuda_stream.synchronize()
        b.record_stream(torch.cuda.default_stream(dg.device))
        return b

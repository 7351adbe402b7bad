"""The bundle's read-only row store (RocksDB) and the row cache serving reads it through.

Layout: one RocksDB directory, raw bytes, the SSD tier's key encoding (13 bytes:
``b"R" | table id u32 BE | key u64 BE with the sign bit flipped``, so a table is one
key-ordered range) and one stored row per value (``serve/quant.py``: fp32, fp16 or
int8 row-wise). :class:`RowStoreWriter` writes sorted runs of rows as SST files with
RocksDB's ``SstFileWriter``, ingests them into a fresh DB and compacts it: nothing of
the table passes through a memtable or the WAL, and memory holds one run. Serving opens
the DB read-only (:class:`RowStore`); any number of replicas can share one copy.

:class:`CachedRows` puts the training code's row cache
(:class:`~terarec.ps.tiers.cache.CacheTier`, LRU, in RAM or HBM) over a store with a
byte budget: hits skip RocksDB and dequantisation; keys absent from the store read as
zero rows (and are cached as such, so an unseen id costs one miss).
"""

from __future__ import annotations

import shutil
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np
import rocksdict
import torch

from terarec.ps.tiers.cache import CacheTier
from terarec.ps.tiers.ssd_format import encode_keys, not_none, read_buffer
from terarec.serve.overlay import Overlay
from terarec.serve.quant import dequantize, quantize, row_bytes

SST_ROWS = 1 << 20  # rows per SST file the writer sorts and writes at once


def _options() -> rocksdict.Options:
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(10, False)
    table.set_cache_index_and_filter_blocks(True)
    opts.set_block_based_table_factory(table)
    return opts


class RowStoreWriter:
    """Writes rows into a new row store at ``path`` (which must not exist).

    Args:
        path: the DB directory to create.
        dtype: stored row encoding (``fp32`` | ``fp16`` | ``int8``).
        sst_rows: rows buffered per table before one sorted SST file is written.
    """

    def __init__(self, path: Path, dtype: str, sst_rows: int = SST_ROWS) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path}: already exists")
        self.dtype = dtype
        self.sst_rows = sst_rows
        self._runs = self.path.parent / f".{self.path.name}.sst"
        self._runs.mkdir(parents=True)
        self._files: list[str] = []
        self._pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pending_rows: dict[int, int] = {}
        self.rows: dict[int, int] = {}

    def add(self, table_id: int, keys: torch.Tensor, weights: torch.Tensor) -> None:
        """Adds rows ``weights [C, dim]`` of int64 ``keys [C]`` (each key once over all
        calls of a table)."""
        self._pending.setdefault(table_id, []).append((keys.cpu(), weights.cpu()))
        self._pending_rows[table_id] = self._pending_rows.get(table_id, 0) + keys.numel()
        if self._pending_rows[table_id] >= self.sst_rows:
            self._write_run(table_id)

    def _write_run(self, table_id: int) -> None:
        parts = self._pending.pop(table_id, [])
        self._pending_rows.pop(table_id, None)
        if not parts:
            return
        keys = torch.cat([k for k, _ in parts])
        weights = torch.cat([w for _, w in parts])
        order = torch.argsort(keys)
        keys, weights = keys[order], weights[order]
        if keys.numel() > 1 and bool((keys[1:] == keys[:-1]).any()):
            raise ValueError(f"table {table_id}: a key was added twice")
        raw = quantize(weights, self.dtype).numpy()
        vals = raw.view(np.dtype((np.void, raw.shape[1]))).reshape(-1).tolist()
        name = str(self._runs / f"{len(self._files):06d}.sst")
        writer = rocksdict.SstFileWriter(_options())
        writer.open(name)
        deque(map(writer.__setitem__, encode_keys(table_id, keys.numpy()), vals), maxlen=0)
        writer.finish()
        self._files.append(name)
        self.rows[table_id] = self.rows.get(table_id, 0) + keys.numel()

    def finish(self) -> dict[int, int]:
        """Writes what is buffered, builds the DB from the runs, compacts it; returns
        the row count per table id."""
        for table_id in list(self._pending):
            self._write_run(table_id)
        db = rocksdict.Rdict(str(self.path), _options())
        try:
            if self._files:
                opts = rocksdict.IngestExternalFileOptions()
                opts.set_move_files(True)
                db.ingest_external_file(self._files, opts)
                db.compact_range(None, None)
            db.flush()
        finally:
            db.close()
        shutil.rmtree(self._runs, ignore_errors=True)
        return dict(self.rows)


class RowStore:
    """A row store opened read-only.

    Args:
        path: the DB directory.
        dtype: the stored row encoding.
    """

    def __init__(self, path: Path, dtype: str) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self._db = rocksdict.Rdict(str(self.path), _options(),
                                   access_type=rocksdict.AccessType.read_only())

    def read(self, table_id: int, dim: int, keys: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of int64 ``keys [N]``: ``(float32 [N, dim], found bool [N])``; absent
        keys get zero rows."""
        n = keys.numel()
        out = torch.zeros(n, dim)
        if n == 0:
            return out, torch.zeros(0, dtype=torch.bool)
        vals = self._db.get(encode_keys(table_id, keys.cpu().numpy()))
        found = not_none(vals)
        buf = read_buffer()
        buf.writelines(filter(None, vals))
        m, width = int(found.sum()), row_bytes(self.dtype, dim)
        if buf.tell() != m * width:
            raise ValueError(f"{self.path}: table {table_id} holds rows of another size "
                             f"than {self.dtype} dim {dim} (a corrupted or foreign store)")
        if m:
            raw = np.frombuffer(buf.getbuffer(), np.uint8, m * width).reshape(m, width)
            out[torch.from_numpy(found)] = dequantize(torch.from_numpy(raw.copy()),
                                                      self.dtype, dim)
        return out, torch.from_numpy(found)

    def close(self) -> None:
        self._db.close()


class CachedRows:
    """One table's rows through an LRU cache over a :class:`RowStore`.

    Args:
        store: the row store.
        table_id, dim: the table.
        capacity: rows the cache holds (0: no cache).
        device: where cached rows live and where :meth:`lookup` returns them.
        overlay: rows changed since the bundle (live deltas), read before the store.
    """

    def __init__(self, store: RowStore, table_id: int, dim: int, capacity: int,
                 device: torch.device | str = "cpu", overlay: Optional[Overlay] = None
                 ) -> None:
        self.store, self.table_id, self.dim = store, table_id, dim
        self.overlay = overlay
        self.device = torch.device(device)
        self.cache: Optional[CacheTier] = (
            CacheTier(dim, capacity, device=self.device, name="serving cache")
            if capacity > 0 else None)
        self.clock = 0
        self.reads = 0

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, dim]`` rows of int64 ``keys [N]`` (duplicates allowed; zeros:
        absent from the store). Only the missed keys are made unique, read from the
        store and admitted."""
        self.clock += 1
        if self.cache is None:
            uniq, inv = torch.unique(keys, return_inverse=True)
            return self._read(uniq).to(self.device)[inv]
        keys = keys.to(self.device)
        slots = self.cache.lookup(keys)
        hit = slots >= 0
        if bool(hit.all()):
            self.cache.touch(slots, self.clock)
            return self.cache.read(slots)
        out = torch.empty(keys.numel(), self.dim, device=self.device)
        held = slots[hit]
        out[hit] = self.cache.read(held)
        self.cache.touch(held, self.clock)
        missed = (~hit).nonzero().squeeze(1)
        uniq, inv = torch.unique(keys[missed], return_inverse=True)
        rows = self._read(uniq).to(self.device)
        out[missed] = rows[inv]
        room = min(uniq.numel(), self.cache.capacity)  # a request above the budget
        self.cache.admit(uniq[:room], rows[:room], self.clock)
        return out

    def _read(self, keys: torch.Tensor) -> torch.Tensor:
        """Rows of unique ``keys`` below the cache: the overlay's, else the store's."""
        keys = keys.cpu()
        if self.overlay is None or self.overlay.size[self.table_id] == 0:
            self.reads += keys.numel()
            return self.store.read(self.table_id, self.dim, keys)[0]
        held, rows = self.overlay.read(self.table_id, keys)
        out = torch.empty(keys.numel(), self.dim)
        out[held] = rows
        rest = ~held
        self.reads += int(rest.sum())
        out[rest] = self.store.read(self.table_id, self.dim, keys[rest])[0]
        return out

    def invalidate(self, keys: torch.Tensor) -> None:
        """Drops cached copies of ``keys`` (their rows changed)."""
        if self.cache is not None and keys.numel():
            self.cache.evict(keys.to(self.device))

    def stats(self) -> dict[str, float]:
        """hits, misses, rows, bytes of the cache; store reads."""
        out = {"hits": 0.0, "misses": 0.0, "rows": 0.0, "bytes": 0.0}
        if self.cache is not None:
            s = self.cache.stats()
            out = {k: s.get(k, 0.0) for k in out}
        out["store_reads"] = float(self.reads)
        return out

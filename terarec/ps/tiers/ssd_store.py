"""The SSD store: every row ever trained, in one RocksDB (via ``rocksdict``) per rank.

The store holds the rows of every table of a rank; ``ps/tiers/ssd.py`` is the tier of
one table on it.

Layout of one rank's DB (``<config.path>/rank{r}``), one column family, raw bytes::

    b"R" | table u32 BE | key u64 BE  ->  row: row_width float32 LE, then its metadata
                                          (last_step, freq): 2 int64 LE
    b"M" | table u32 BE | b"w" / b"n" ->  int64 LE: row_width / number of rows
    b"M" | table u32 BE | b"m"        ->  b"1": values carry the metadata (tables
                                          written before it existed lack it and b"m")

Keys have the sign bit flipped before the big-endian encoding, so byte order is numeric
order: a table is one contiguous key range and an export comes out sorted. The rows of
an insert and the table's new row count go in one ``WriteBatch``: both or neither.

``len`` is exact: an insert must know which of its keys are new. The store remembers
per table what this process established about recent keys (written, found or missed;
``config.known_keys``), so the common write-backs need no check: a row read from this
tier, and a new row whose lookup here missed. For a table it found empty, it also keeps a
Bloom filter of every key written since (:class:`WrittenKeys`): a key the filter never
saw is certainly new, so a run that starts from an empty SSD tier inserts new keys
without a check too. Other keys cost a multi-get first.

Hot path: no Python loop over floats, none over keys where rocksdict has a batch call:
rows are packed via numpy void views (``tolist``: one ``bytes`` per row) and unpacked
with ``frombuffer``; reads are ``Rdict.get(list)`` multi-gets split over ``num_threads``
(rocksdict releases the GIL there); rocksdict has no multi-put, so ``WriteBatch.put``
runs through ``map`` (no bytecode per key). Batches go in key order: the memtable is a
skip list of ~800-byte nodes, and sorted inserts miss the cache far less.

Durability: the hot path never fsyncs and by default skips the WAL; :meth:`SSDStore.flush`
(at checkpoints) flushes memtables to fsynced SST files, so a reopened DB reads every
flushed row bit-identically. Failures (unwritable directory, full disk, locked or
corrupted DB) raise :class:`SSDTierError` naming the path and what to do; a failed write
stores and counts nothing of its batch. See ``docs/tiers.md``.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import rocksdict
import torch

from terarec.config import SSDCompression as SSDCompression  # re-exported
from terarec.config import SSDConfig
from terarec.ps.tiers.ssd_errors import SSDTierError, is_storage_error
from terarec.ps.tiers.ssd_format import (  # rocksdb_options: also public here
    MAX_TABLE_ID,
    NS_ROW,
    KeyStates,
    WrittenKeys,
    decode_keys,
    encode_keys,
    link_or_copy,
    meta_key,
    not_none,
    pack_rows,
    private_view,
    read_buffer,
    rocksdb_options,
    take_items,
)
from terarec.ps.tiers.sst_check import check_db

PathLike = Union[str, Path]

# Below this many keys per thread, splitting a multi-get costs more than it saves.
_MIN_CHUNK = 2048


class SSDTierConfig(SSDConfig):
    """:class:`~terarec.config.SSDConfig` (the ``ssd`` config section) with ``path``
    required: the options of a store that is opened, for tools and tests that build one
    without a whole config. Same fields, defaults and validation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.path is None:
            raise ValueError("path: required to open an SSD tier")


def rank_dir(root: PathLike, rank: int) -> Path:
    """The DB directory of ``rank`` under the configured root."""
    return Path(root) / f"rank{rank}"


def as_keys(keys: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(keys, torch.Tensor):
        if keys.dtype != torch.int64:
            raise ValueError(f"keys must be int64, got {keys.dtype}")
        keys = keys.detach().cpu().numpy()
    elif not isinstance(keys, np.ndarray) or keys.dtype != np.int64:
        raise ValueError(f"keys must be int64, got {getattr(keys, 'dtype', type(keys))}")
    if keys.ndim != 1:
        raise ValueError(f"keys must be 1-D, got shape {tuple(keys.shape)}")
    return np.ascontiguousarray(keys)


# --------------------------------------------------------------------------- store


class SSDStore:
    """One RocksDB holding the rows of any number of tables (one store per rank).

    Args:
        path: the DB directory (created if missing), e.g. ``rank_dir(config.path, r)``
            or a checkpoint made by :meth:`checkpoint`.
        config: tuning; ``config.path`` is not used here (see :meth:`for_rank`).
        read_only: open a checkpoint to read its rows, through a view of its own
            (``private_view``: its files as they are); every write raises.

    Raises:
        SSDTierError: the directory cannot be created or written, or RocksDB refuses to
            open it (locked by another process, corrupted).
    """

    def __init__(
        self, path: PathLike, config: Optional[SSDTierConfig] = None, read_only: bool = False
    ) -> None:
        self.path = Path(path)
        self.config = config or SSDTierConfig(path=str(path))
        self.read_only = read_only
        self._lock = threading.Lock()  # existence check + write + count are one step
        self._generation = 0  # bumped by every write: a read records states only if unchanged
        self._counts: dict[int, int] = {}
        self._key_states: dict[int, KeyStates] = {}
        self._written: dict[int, Optional[WrittenKeys]] = {}
        self._tables: dict[int, tuple[int, bool]] = {}  # registered: (row width, has meta)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._db: Optional[rocksdict.Rdict] = None
        self._view: Optional[Path] = None  # a read-only store's own copy (private_view)
        self._open()

    def _open(self) -> None:
        if not self.read_only:
            try:
                os.makedirs(self.path, exist_ok=True)
                probe = self.path / ".terarec_write_probe"
                probe.write_bytes(b"")  # rocksdict would only say "Not a directory (os error 20)"
                probe.unlink()
            except OSError as e:
                raise SSDTierError("open", self.path, e) from e
        elif not (self.path / "CURRENT").is_file():
            raise SSDTierError("open", self.path, "no RocksDB here (no CURRENT file)")
        opts, self._cache = rocksdb_options(self.config)
        self._write_opts = rocksdict.WriteOptions()
        self._write_opts.disable_wal = not self.config.wal
        self._write_opts.sync = False
        # Batches arrive sorted: keep a skip-list insert hint per batch (~5% on writes).
        self._write_opts.memtable_insert_hint_per_batch = True
        access = rocksdict.AccessType.read_only() if self.read_only else None
        self._view = (private_view(self.path) or self.path) if self.read_only else None
        with self._guard("open"):
            if access is None:
                self._db = rocksdict.Rdict(str(self.path), opts)
            else:
                self._db = rocksdict.Rdict(str(self._view), opts, access_type=access)
            self._db.set_write_options(self._write_opts)
            damaged = check_db(self._db, self.path) if self.config.verify_filters else None
        if damaged is not None:
            self.close()
            raise SSDTierError("open", self.path, f"Corruption: {damaged}")

    @classmethod
    def for_rank(cls, config: SSDTierConfig, rank: int) -> SSDStore:
        """The store of ``rank``: ``<config.path>/rank{rank}``."""
        return cls(rank_dir(config.path, rank), config)

    # -- lifecycle ---------------------------------------------------------------
    def flush(self) -> None:
        """Makes every write so far durable: memtables to fsynced SST files (+ WAL sync)."""
        with self._guard("flush"):
            if self.config.wal:
                self._db.flush_wal(True)
            self._db.flush(True)

    def flush_soon(self) -> None:
        """Starts flushing the memtables to SST files in RocksDB's background, without
        waiting (ahead of a :meth:`checkpoint`, whose own flush then has less to do)."""
        if not self.read_only:
            with self._guard("flush"):
                self._db.flush(False)

    def checkpoint(self, dest: PathLike) -> None:
        """Flushes, then writes a RocksDB checkpoint (hard links where possible) at ``dest``.

        ``dest`` must not exist; open it later with ``SSDStore(dest, config)``.
        """
        self.flush()
        with self._guard("checkpoint"):
            rocksdict.Checkpoint(self._db).create_checkpoint(str(dest))

    def restore(self, src: PathLike) -> None:
        """Replaces the whole DB with the checkpoint at ``src`` (made by :meth:`checkpoint`).

        The DB is closed, its directory emptied, the checkpoint's SST files (immutable)
        hard-linked into it (copied across file systems) and its other files copied;
        then the DB is reopened there. The checkpoint itself is never opened, so it
        stays as it was. What the store knew of its keys is forgotten.
        """
        src = Path(src)
        if not (src / "CURRENT").is_file():
            raise SSDTierError("restore", src, "not a RocksDB checkpoint (no CURRENT file)")
        self.close()
        try:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            for f in sorted(src.iterdir()):
                if f.is_file():
                    link_or_copy(f, self.path / f.name, link=f.suffix == ".sst")
        except OSError as e:
            raise SSDTierError("restore", self.path, e) from e
        self._reopen()

    def _reopen(self) -> None:  # the DB was replaced: forget what was known of its keys
        self._counts.clear()
        self._key_states.clear()
        self._written.clear()
        self._generation += 1
        self._open()

    def reset(self) -> None:
        """Empties the DB (before a resharded resume writes the rows this rank owns now);
        the tables registered stay registered, with their widths and metadata layout."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._reopen()
        with self._guard("reset"):
            for table_id, (width, meta) in self._tables.items():
                if meta:
                    self._db.put(meta_key(table_id, b"m"), b"1", self._write_opts)
                self._db.put(meta_key(table_id, b"w"), struct.pack("<q", width),
                             self._write_opts)

    def close(self) -> None:
        """Flushes and closes the DB (idempotent). A failed flush is raised after closing."""
        if self._db is None:
            return
        flush_error: Optional[SSDTierError] = None
        try:
            if not self.read_only:
                self.flush()
        except SSDTierError as e:
            flush_error = e
        db, self._db = self._db, None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        try:
            db.close()
            if self._view not in (None, self.path):
                shutil.rmtree(self._view, ignore_errors=True)
        except Exception as e:
            if not is_storage_error(e):
                raise
            if flush_error is None:
                raise SSDTierError("close", self.path, e) from e
        if flush_error is not None:
            raise flush_error

    def __enter__(self) -> SSDStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tables ------------------------------------------------------------------
    def register(self, table_id: int, row_width: int) -> bool:
        """Records ``row_width`` of a table, or checks it against the recorded one.

        Returns whether the table's values carry row metadata (16 bytes after the row):
        always for a new table; not for one written before metadata existed.
        """
        if not 0 <= table_id <= MAX_TABLE_ID:
            raise ValueError(f"table_id must be in [0, {MAX_TABLE_ID}], got {table_id}")
        if row_width < 1:
            raise ValueError(f"row_width must be >= 1, got {row_width}")
        key = meta_key(table_id, b"w")
        with self._lock, self._guard("open table"):
            raw = self._db.get(key)
            if raw is None:
                self._db.put(meta_key(table_id, b"m"), b"1", self._write_opts)
                self._db.put(key, struct.pack("<q", row_width), self._write_opts)
                self._tables[table_id] = (row_width, True)
                return True
            if struct.unpack("<q", raw)[0] != row_width:
                stored = struct.unpack("<q", raw)[0]
                raise SSDTierError(
                    "open table",
                    self.path,
                    f"table {table_id} holds rows of width {stored}, opened with {row_width}",
                    "the DB belongs to another table layout (embedding dim or optimizer state "
                    "changed): point ssd.path elsewhere or restore the matching config",
                )
            meta = self._db.get(meta_key(table_id, b"m")) is not None
            self._tables[table_id] = (row_width, meta)
            return meta

    def count(self, table_id: int) -> int:
        """Exact number of distinct keys of ``table_id``."""
        n = self._counts.get(table_id)
        if n is None:
            with self._guard("read count"):
                raw = self._db.get(meta_key(table_id, b"n"))
            n = self._counts[table_id] = 0 if raw is None else struct.unpack("<q", raw)[0]
        return n

    # -- batched row access --------------------------------------------------------
    def read(
        self, table_id: int, keys: np.ndarray, row_width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Looks up int64 ``keys [N]`` with batched multi-gets.

        Returns:
            ``(hit_pos [H], rows [H, row_width] float32, miss_pos [M])``: positions into
            ``keys`` (``miss_pos`` ascending) and the rows of the hits, in ``hit_pos`` order.
            ``rows`` is a view of a buffer of the calling thread that its next ``read``
            reuses: copy the rows out before then.
        """
        order = np.argsort(keys, kind="stable")  # key-ordered lookups: fewer cache misses
        sk = keys[order]
        generation = self._generation
        # The chunks' multi-gets run on the pool while this thread appends the values of
        # the chunks done to a buffer it reuses (fresh 10 MB buffers cost page faults).
        buf = read_buffer()
        hit = np.ones(sk.shape[0], bool)
        at = 0
        for vals in self._multi_get_chunks(encode_keys(table_id, sk), "read"):
            n = len(vals)
            if None in vals:
                hit[at : at + n] = not_none(vals)
                buf.writelines(filter(None, vals))  # rows are never b"" (row_width >= 1)
            else:
                buf.writelines(vals)
            at += n
        n_found = int(hit.sum())
        hit_pos, miss_pos = order[hit], np.sort(order[~hit])
        self._record(table_id, sk, hit if hit_pos.size < sk.shape[0] else True, generation)
        row_bytes = 4 * row_width
        if buf.tell() != n_found * row_bytes:
            self._raise_bad_row(table_id, keys[hit_pos], row_bytes)
        rows = np.frombuffer(buf.getbuffer(), "<f4", n_found * row_width)
        return hit_pos, rows.reshape(n_found, row_width), miss_pos

    def _raise_bad_row(self, table_id: int, found_keys: np.ndarray, row_bytes: int) -> None:
        """Names the first of ``found_keys`` whose value is not ``row_bytes`` long."""
        with self._guard("read"):
            vals = self._db.get(encode_keys(table_id, found_keys))
        lens = np.fromiter((0 if v is None else len(v) for v in vals), np.int64, len(vals))
        bad = int(np.flatnonzero(lens != row_bytes)[0])
        raise SSDTierError(
            "read",
            self.path,
            f"key {int(found_keys[bad])} of table {table_id} holds {lens[bad]} bytes, "
            f"expected {row_bytes}",
            "corrupted or foreign DB: restore the SSD tier from the last checkpoint",
        )

    def contains(self, table_id: int, keys: np.ndarray) -> np.ndarray:
        """bool ``[N]``: which int64 ``keys`` are held."""
        generation = self._generation
        with self._lock:
            state = self._states(table_id).lookup(keys)
            ask = self._unsure(table_id, keys, np.flatnonzero(state < 0))
        held = state == 1
        if ask.size:
            asked = np.sort(keys[ask])
            found = not_none(self._multi_get(encode_keys(table_id, asked), "contains"))
            held[ask] = found[np.searchsorted(asked, keys[ask])]
            self._record(table_id, asked, found, generation)
        return held

    def write(self, table_id: int, keys: np.ndarray, rows: np.ndarray) -> int:
        """Inserts or overwrites ``rows [N, W]`` at int64 ``keys [N]``; returns #new keys.

        Duplicate keys: the last row wins (as a sequence of single inserts would).
        Atomic: on error nothing is written and the count is unchanged.
        """
        n = keys.shape[0]
        if n == 0:
            return 0
        order = np.argsort(keys, kind="stable")  # stable: the last duplicate is written last
        sk = keys[order]
        db_keys = encode_keys(table_id, sk)
        states = self._states(table_id)
        with self._lock:
            state = states.lookup(sk)
            ask = self._unsure(table_id, sk, np.flatnonzero(state < 0))
            state[state < 0] = 0  # certainly new, unless the check below finds them
            # The existence check runs in RocksDB without the GIL while this thread packs.
            check = self._start_multi_get(take_items(db_keys, ask), "insert") if ask.size else None
            batch = rocksdict.WriteBatch(raw_mode=True)
            deque(map(batch.put, db_keys, pack_rows(rows, order)), maxlen=0)
            new = state == 0
            if check is not None:
                new[ask] = ~not_none(check())
            if n > 1:
                new[1:] &= sk[1:] != sk[:-1]  # a repeated new key counts once
            n_new = int(new.sum())
            total = self.count(table_id) + n_new
            batch.put(meta_key(table_id, b"n"), struct.pack("<q", total))
            with self._guard("insert"):
                self._db.write(batch, self._write_opts)
            self._generation += 1
            self._counts[table_id] = total
            if not (state == 1).all():  # (overwrites of keys known held change nothing)
                states.record(sk, True)
            self._add_written(table_id, sk)
        return n_new

    def delete(self, table_id: int, keys: np.ndarray) -> int:
        """Deletes the rows of int64 ``keys`` that are held; returns how many were."""
        if keys.shape[0] == 0:
            return 0
        uk = np.unique(keys)
        db_keys = encode_keys(table_id, uk)
        states = self._states(table_id)
        with self._lock:
            state = states.lookup(uk)
            ask = self._unsure(table_id, uk, np.flatnonzero(state < 0))
            is_held = state == 1
            if ask.size:
                is_held[ask] = not_none(self._multi_get(take_items(db_keys, ask), "delete"))
            held = np.flatnonzero(is_held)
            if held.size == 0:
                states.record(uk, False)
                return 0
            batch = rocksdict.WriteBatch(raw_mode=True)
            deque(map(batch.delete, take_items(db_keys, held)), maxlen=0)
            total = self.count(table_id) - int(held.size)
            batch.put(meta_key(table_id, b"n"), struct.pack("<q", total))
            with self._guard("delete"):
                self._db.write(batch, self._write_opts)
            self._generation += 1
            self._counts[table_id] = total
            states.record(uk, False)
        return int(held.size)

    def scan(
        self, table_id: int, row_width: int, chunk_rows: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(keys [C], rows [C, row_width])`` chunks of a table in key order."""
        lo = bytes([NS_ROW]) + struct.pack(">I", table_id)
        ro = rocksdict.ReadOptions()
        ro.set_iterate_upper_bound(bytes([NS_ROW]) + struct.pack(">I", table_id + 1))
        with self._guard("scan"):
            items = self._db.items(from_key=lo, read_opt=ro)
            while True:
                chunk = list(islice(items, chunk_rows))
                if not chunk:
                    return
                keys = decode_keys(b"".join(map(itemgetter(0), chunk)))
                raw = bytearray().join(map(itemgetter(1), chunk))
                if len(raw) != len(chunk) * 4 * row_width:
                    raise SSDTierError(
                        "scan",
                        self.path,
                        f"table {table_id} holds rows of another width",
                        "corrupted or foreign DB: restore the SSD tier from the last checkpoint",
                    )
                yield keys, np.frombuffer(raw, "<f4").reshape(len(chunk), row_width)

    def compact(self) -> None:
        """Compacts the whole DB now (offline maintenance, benchmarks)."""
        with self._guard("compact"):
            self._db.compact_range(None, None)

    def forget_key_states(self) -> None:
        """Forgets what is known of which keys are held: every key is checked again."""
        with self._lock:
            self._key_states.clear()
            self._written = dict.fromkeys(self._written)  # None: no filter, checks again

    def stats(self) -> dict[str, float]:
        """DB-wide counters (bytes on disk, in memtables, in the block cache)."""
        props = {
            "db_sst_bytes": "rocksdb.total-sst-files-size",
            "db_memtable_bytes": "rocksdb.cur-size-all-mem-tables",
            "db_pending_compaction_bytes": "rocksdb.estimate-pending-compaction-bytes",
        }
        with self._guard("stats"):
            out = {k: float(self._db.property_int_value(p) or 0) for k, p in props.items()}
        out["db_block_cache_bytes"] = float(self._cache.get_usage()) if self._cache else 0.0
        return out

    # -- internals -----------------------------------------------------------------
    def _record(
        self, table_id: int, sorted_keys: np.ndarray, held: Union[bool, np.ndarray], gen: int
    ) -> None:
        """Records what a lookup that started at write ``gen`` found, unless stale by now."""
        with self._lock:
            if self._generation == gen:
                self._states(table_id).record(sorted_keys, held)

    def _unsure(self, table_id: int, keys: np.ndarray, ask: np.ndarray) -> np.ndarray:
        """The positions ``ask`` of ``keys`` (unknown to the key states) that may be held:
        those the table's written-keys filter may have seen (all, without a filter)."""
        if table_id not in self._written:  # first use: complete only if the table is empty
            empty = self.count(table_id) == 0 and self.config.known_keys > 0
            self._written[table_id] = WrittenKeys(16 * self.config.known_keys) if empty else None
        written = self._written[table_id]
        if written is None or ask.size == 0:
            return ask
        return ask[written.may_hold(keys[ask])]

    def _add_written(self, table_id: int, keys: np.ndarray) -> None:
        written = self._written.get(table_id)
        if written is not None:
            if written.keys + keys.size > written.max_keys:
                self._written[table_id] = None  # too large to keep: checks again
            else:
                written.add(keys)

    def _states(self, table_id: int) -> KeyStates:
        states = self._key_states.get(table_id)
        if states is None:
            states = self._key_states[table_id] = KeyStates(self.config.known_keys)
        return states

    @contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        if op != "open" and getattr(self, "_db", True) is None:
            raise SSDTierError(op, self.path, "the store is closed")
        try:
            yield
        except SSDTierError:
            raise
        except Exception as e:
            if is_storage_error(e):
                raise SSDTierError(op, self.path, e) from e
            raise

    def _start_multi_get(self, keys: list[bytes], op: str) -> Callable[[], list[Any]]:
        """Starts a multi-get on the pool, split over ``num_threads`` key ranges (rocksdict
        releases the GIL there); returns a call that waits for the values (None: absent)."""
        threads = self.config.num_threads
        if threads <= 1 or not keys:
            with self._guard(op):
                vals = self._db.get(keys)
            return lambda: vals
        futs = self._submit_gets(keys, threads)

        def values() -> list[Any]:
            with self._guard(op):
                out = futs[0].result()
                for f in futs[1:]:
                    out.extend(f.result())
            return out

        return values

    def _multi_get_chunks(self, keys: list[bytes], op: str) -> Iterator[list[Any]]:
        """Values of ``keys`` (None: absent), chunk by chunk in order. The chunks' multi-
        gets (``2 * num_threads`` of them) all start on the pool at once, so the caller's
        work on one chunk overlaps the gets of the next."""
        threads = self.config.num_threads
        if threads <= 1 or len(keys) < 2 * _MIN_CHUNK:  # not worth a thread hand-off
            with self._guard(op):
                vals = self._db.get(keys)
            yield vals
            return
        futs = self._submit_gets(keys, 2 * threads)
        try:
            for f in futs:
                with self._guard(op):
                    vals = f.result()
                yield vals
        finally:
            for f in futs:  # the caller stopped early (an error): drop what has not started
                f.cancel()

    def _submit_gets(self, keys: list[bytes], parts: int) -> list[Any]:
        """Multi-gets of ``keys`` in about ``parts`` key ranges, started on the pool."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.num_threads,
                                            thread_name_prefix="terarec-ssd")
        step = max(_MIN_CHUNK, -(-len(keys) // parts))
        return [self._pool.submit(self._db.get, keys[i : i + step])
                for i in range(0, len(keys), step)]

    def _multi_get(self, keys: list[bytes], op: str) -> list[Any]:
        if len(keys) < 2 * _MIN_CHUNK:  # not worth a thread hand-off
            with self._guard(op):
                return self._db.get(keys)
        return self._start_multi_get(keys, op)()

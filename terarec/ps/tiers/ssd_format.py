"""The SSD tier's on-disk format and what it knows of its keys (``ps/tiers/ssd.py``).

* DB keys: 13 bytes, ``ns (1) | table id (u32 BE) | key (u64 BE, sign bit flipped)``,
  so a table's rows are one contiguous, key-ordered range; rows are float32 LE bytes.
* :class:`KeyStates`: which keys of a table this process knows to be held or not.
* :class:`WrittenKeys`: a Bloom filter of the keys written since a table was found empty.
* :func:`rocksdb_options`: the tuned RocksDB options (block cache, blooms, compression).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import struct
import tempfile
import threading
from itertools import repeat
from operator import is_
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import rocksdict
import torch

from terarec.config import SSDConfig
from terarec.hashing import mix64_np
from terarec.ps.index.hash_index import HashIndex

NS_ROW = 0x52  # b"R"
_NS_META = b"M"
MAX_TABLE_ID = 2**32 - 2  # table_id + 1 must fit the u32 upper bound of a range scan
_KEY_DTYPE = np.dtype([("ns", "u1"), ("table", ">u4"), ("key", ">u8")])  # 13 bytes, packed
_KEY_VOID = np.dtype((np.void, _KEY_DTYPE.itemsize))
_SIGN = np.uint64(1 << 63)

# --------------------------------------------------------------------------- encoding


def encode_keys(table_id: int, keys: np.ndarray) -> list[bytes]:
    """Fixed-width (13-byte) DB keys of the rows of int64 ``keys [N]`` of a table."""
    rec = np.empty(keys.shape[0], _KEY_DTYPE)
    rec["ns"] = NS_ROW
    rec["table"] = table_id
    rec["key"] = keys.astype(np.int64, copy=False).view(np.uint64) ^ _SIGN
    return rec.view(_KEY_VOID).tolist()


def decode_keys(raw: bytes) -> np.ndarray:
    """int64 keys ``[N]`` of the concatenated 13-byte DB keys ``raw``."""
    rec = np.frombuffer(raw, _KEY_DTYPE)
    return (rec["key"].astype(np.uint64) ^ _SIGN).view(np.int64)


def pack_rows(rows: np.ndarray, order: Optional[np.ndarray] = None) -> list[bytes]:
    """One ``bytes`` (float32 LE) per row of ``rows [N, W]`` (in ``order`` if given).

    No per-float Python: a void view makes each row one item for ``tolist``.
    """
    rows = np.ascontiguousarray(rows, dtype="<f4")
    flat = rows.view(np.dtype((np.void, rows.shape[1] * 4))).reshape(-1)
    # Rows are gathered into key order before ``tolist``, not the list afterwards: the
    # ``bytes`` then lie in memory in the order ``WriteBatch.put`` reads them (~8%).
    return (flat if order is None else flat.take(order)).tolist()


def meta_key(table_id: int, field: bytes) -> bytes:
    return _NS_META + struct.pack(">I", table_id) + field


def take_items(items: list[Any], idx: np.ndarray) -> list[Any]:
    # list gather in C (map over __getitem__), no bytecode per item
    return list(map(items.__getitem__, idx.tolist()))


_buffers = threading.local()


def read_buffer() -> io.BytesIO:
    """The calling thread's read buffer, rewound (a new one if a view of the last read
    is still alive: a buffer with views cannot be written)."""
    buf = getattr(_buffers, "read", None)
    if buf is not None:
        try:
            buf.write(b"")  # raises while views of the buffer exist
            buf.seek(0)
            return buf
        except BufferError:
            pass
    buf = _buffers.read = io.BytesIO()
    return buf


def not_none(vals: list[Any]) -> np.ndarray:
    """bool ``[N]``: which multi-get results are values (``None``: key absent)."""
    mask = np.fromiter(map(is_, vals, repeat(None)), bool, len(vals))
    return np.logical_not(mask, out=mask)


class KeyStates:
    """What this process knows of one table's keys: held, not held, or unknown.

    Exact: it records only what a successful write, a read or a check established (this
    process is the DB's only writer; RocksDB's lock sees to that), and the store calls
    it under its lock. Bounded: when full it starts over empty; an unknown key just
    costs an existence check again.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._index: Optional[HashIndex] = None
        self._held = np.zeros(0, bool)  # by slot of ``_index``

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """int8 ``[N]``: 1 held, 0 not held, -1 unknown."""
        out = np.full(keys.shape[0], -1, np.int8)
        if self._index is not None and len(self._index):
            slots = self._index.find(torch.from_numpy(keys)).numpy()
            seen = slots >= 0
            out[seen] = self._held[slots[seen]]
        return out

    def record(self, sorted_keys: np.ndarray, held: Union[bool, np.ndarray]) -> None:
        """Records ``held`` for ascending ``sorted_keys`` (duplicates allowed)."""
        if self.capacity == 0 or sorted_keys.size == 0:
            return
        held = np.broadcast_to(np.asarray(held, bool), sorted_keys.shape)
        if sorted_keys.size > 1:
            first = np.empty(sorted_keys.size, bool)
            first[0] = True
            np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
            sorted_keys, held = sorted_keys[first], held[first]
        if sorted_keys.size > self.capacity:
            self.clear()  # cannot record them: what was known of them may be stale now
            return
        if self._index is None or len(self._index) + sorted_keys.size > self.capacity:
            cap = min(2 * self.capacity, 4 * sorted_keys.size + 1024)
            self._index, self._held = HashIndex("cpu", capacity=cap), np.zeros(0, bool)
        slots = self._index.find_or_insert(torch.from_numpy(sorted_keys))[0].numpy()
        if len(self._index) > self._held.size:
            grown = np.zeros(max(len(self._index), 2 * self._held.size), bool)
            grown[: self._held.size] = self._held
            self._held = grown
        self._held[slots] = held

    def clear(self) -> None:
        self._index, self._held = None, np.zeros(0, bool)


# 2**16 masks of 7 random bits each: a key's Bloom bits, all in one 64-bit word.
_BLOOM_MASKS = np.zeros(1 << 16, np.uint64)
for _bits in np.random.default_rng(0x5EED).integers(0, 64, (7, 1 << 16)).astype(np.uint64):
    _BLOOM_MASKS |= np.left_shift(np.uint64(1), _bits)


class WrittenKeys:
    """A Bloom filter of every key written to one table since this process found it
    empty: a key it never saw is certainly not held (exact), one it may have seen needs
    the existence check (~1% of unseen keys). One 64-bit word per key (7 bits from a
    fixed table of masks: one memory access per key and layer); layers of doubling
    capacity at 10 bits per key, ~1.3-2.5 bytes per key written in all. The store
    drops it (back to checks) past ``max_keys`` (16x ``config.known_keys``).
    """

    _BITS_PER_KEY = 10

    def __init__(self, max_keys: int, first: int = 1 << 20) -> None:
        self.max_keys = max_keys
        self.keys = 0  # keys added (duplicates counted): sizes the layers
        self._first = first
        self._layers: list[np.ndarray] = []
        self._room = 0  # keys the last layer takes before the next one starts

    @staticmethod
    def _hash(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = mix64_np(keys)
        return h, _BLOOM_MASKS[(h >> np.uint64(48)).astype(np.intp)]

    def add(self, keys: np.ndarray) -> None:
        """Adds int64 ``keys [N]`` (duplicates allowed)."""
        if keys.size == 0:
            return
        if keys.size > self._room:
            cap = max(self._first << len(self._layers), keys.size)
            words = 1 << max(6, (cap * self._BITS_PER_KEY - 1).bit_length() - 6)
            self._layers.append(np.zeros(words, np.uint64))
            self._room = cap
        h, mask = self._hash(keys)
        words = self._layers[-1]
        np.bitwise_or.at(words, (h & np.uint64(words.size - 1)).astype(np.intp), mask)
        self._room -= keys.size
        self.keys += keys.size

    def may_hold(self, keys: np.ndarray) -> np.ndarray:
        """bool ``[N]``: False where the key was certainly never added."""
        out = np.zeros(keys.size, bool)
        if not self._layers or keys.size == 0:
            return out
        h, mask = self._hash(keys)
        for words in self._layers:
            out |= (words[(h & np.uint64(words.size - 1)).astype(np.intp)] & mask) == mask
        return out


def rocksdb_options(cfg: SSDConfig) -> tuple[rocksdict.Options, Optional[rocksdict.Cache]]:
    """The tuned RocksDB options of ``cfg`` and their block cache (None if disabled)."""
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_max_background_jobs(cfg.background_jobs)
    opts.set_write_buffer_size(cfg.write_buffer_mb << 20)
    opts.set_max_write_buffer_number(cfg.max_write_buffers)
    opts.set_level_compaction_dynamic_level_bytes(True)
    opts.set_compression_type(getattr(rocksdict.DBCompressionType, cfg.compression.value)())
    # A memtable bloom lets lookups of keys that are not in a memtable skip its skip list
    # (new keys on insert; rows long since flushed on read).
    opts.set_memtable_prefix_bloom_ratio(0.05)
    opts.set_memtable_whole_key_filtering(True)
    opts.set_keep_log_file_num(4)
    table = rocksdict.BlockBasedOptions()
    cache = None
    if cfg.block_cache_mb > 0:
        # HyperClockCache: lock-free lookups (the LRU cache's mutex showed in profiles)
        cache = rocksdict.Cache.new_hyper_clock_cache(
            cfg.block_cache_mb << 20, cfg.block_size_kb << 10
        )
        table.set_block_cache(cache)
    else:
        table.disable_cache()
    table.set_block_size(cfg.block_size_kb << 10)
    if cfg.bloom_bits_per_key > 0:
        table.set_bloom_filter(cfg.bloom_bits_per_key, False)  # full (not block-based) filters
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    table.set_pin_top_level_index_and_filter(True)
    opts.set_block_based_table_factory(table)
    return opts, cache


def link_or_copy(src: Path, dest: Path, link: bool = True) -> None:
    """``dest`` as a hard link to ``src`` (when ``link`` and on one file system), else a
    copy; either way fsynced."""
    if link:
        try:
            os.link(src, dest)
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    shutil.copyfile(src, dest)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_view(src: Path) -> Optional[Path]:
    """A directory of ``src``'s files for one reader to open: rocksdict rewrites its
    config file at every open, read-only too, so readers of one checkpoint (and a check
    of its files) must not share it. Made inside ``src`` (one file system: the SST files
    hard-linked, the few others copied); None where ``src`` cannot be written."""
    try:
        view = Path(tempfile.mkdtemp(prefix=".view-", dir=src))
    except OSError:
        return None
    try:
        for f in sorted(src.iterdir()):
            if f.is_file():
                link_or_copy(f, view / f.name, link=f.suffix == ".sst")
    except OSError:
        shutil.rmtree(view, ignore_errors=True)
        return None
    return view

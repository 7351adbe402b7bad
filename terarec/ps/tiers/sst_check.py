"""Checksums of the meta blocks of RocksDB's SST files (filter, index, properties,
metaindex), verified by reading those blocks only.

RocksDB verifies a block's checksum each time it reads the block from a file, and a
damaged data or index block fails the read that needs it. A filter block is different:
when RocksDB cannot load one it reads on as if every key might match (correct rows,
slower reads), so a flipped bit there would never be reported. The SSD tier therefore
checks the meta blocks of every live SST file when it opens an existing DB
(``ssd.verify_filters``); the filters are ~1.3 bytes per row (10 bloom bits per key).

Block-based table layout (RocksDB ``table/format.h``): every block is followed by a
5-byte trailer, its compression type and a 32-bit checksum of the block and that byte.
The 53-byte footer names the checksum type, and locates the metaindex block, whose
entries name each meta block and its *block handle* (offset and size, two varints).
Format version 6 (RocksDB 8.6+) adds a per-file ``base_context_checksum`` to each
block's checksum, mixed with the block's offset, and keeps the index handle in the
metaindex; earlier versions keep both handles in the footer.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import xxhash

MAGIC = bytes.fromhex("f7cff485b741e288")  # kBlockBasedTableMagicNumber, little-endian
EXTENDED_MAGIC = bytes.fromhex("3e007a00")  # format version 6 and later
FOOTER = 53
XXH3 = 4  # ChecksumType::kXXH3 (RocksDB's default); other types are not checked here
_LAST_BYTE_PRIME = 0x6B9083D9
_M32 = 0xFFFFFFFF


class SstDamaged(ValueError):
    """A meta block whose checksum does not match (the message names file and block)."""


def _varint(b: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        x = b[i]
        i += 1
        out |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return out, i


def _xxh3_checksum(block: bytes, last: int, base: int, offset: int) -> int:
    """RocksDB's stored checksum of a block: the low 32 bits of XXH3-64 of the block,
    the trailer's type byte folded in, plus the context modifier (format 6)."""
    v = (xxhash.xxh3_64_intdigest(block) & _M32) ^ ((last * _LAST_BYTE_PRIME) & _M32)
    modifier = (base ^ (((offset & _M32) + (offset >> 32)) & _M32)) if base else 0
    return (v + modifier) & _M32


def _entries(block: bytes) -> dict[bytes, bytes]:
    """Key -> value of a block's entries (prefix-compressed; restart array at the end)."""
    restarts = int.from_bytes(block[-4:], "little") & 0x7FFFFFFF
    end = len(block) - 4 * (restarts + 1)
    out: dict[bytes, bytes] = {}
    i, key = 0, b""
    while i < end:
        shared, i = _varint(block, i)
        fresh, i = _varint(block, i)
        size, i = _varint(block, i)
        key = key[:shared] + block[i:i + fresh]
        out[key] = block[i + fresh:i + fresh + size]
        i += fresh + size
    return out


def _handle(value: bytes, i: int = 0) -> tuple[int, int, int]:
    off, i = _varint(value, i)
    size, i = _varint(value, i)
    return off, size, i


def check_sst(path: Path) -> Optional[str]:
    """Verifies the checksums of the metaindex, filter, index and properties blocks of
    the SST file ``path``; returns None when they hold (or the file uses a checksum type
    this module does not compute), else what is damaged.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        if size < FOOTER:
            return f"{path}: {size} bytes, shorter than an SST footer"
        f.seek(size - FOOTER)
        foot = f.read(FOOTER)
        if foot[-8:] != MAGIC:
            return f"{path}: footer magic number damaged"
        ctype = foot[0]
        if foot[1:5] == EXTENDED_MAGIC:  # format 6: base checksum, metaindex size
            base = int.from_bytes(foot[9:13], "little")
            msize = int.from_bytes(foot[13:17], "little")
            blocks = {"metaindex": (size - FOOTER - msize - 5, msize)}
        else:
            base = 0
            moff, msize, i = _handle(foot, 1)
            ioff, isize, _ = _handle(foot, i)
            blocks = {"metaindex": (moff, msize), "index": (ioff, isize)}
        if ctype != XXH3:
            return None

        def read(name: str, off: int, n: int) -> bytes:
            if off < 0 or off + n + 5 > size:
                raise SstDamaged(f"{path}: the {name} block's handle points outside the file")
            f.seek(off)
            raw = f.read(n + 5)
            stored = int.from_bytes(raw[n + 1:], "little")
            if _xxh3_checksum(raw[:n], raw[n], base, off) != stored:
                raise SstDamaged(f"{path}: {name} block at offset {off} (checksum mismatch)")
            return raw[:n]

        try:
            meta = _entries(read("metaindex", *blocks["metaindex"]))
            for key, value in meta.items():
                name = key.decode("ascii", "replace")
                if key.startswith((b"fullfilter.", b"filter.", b"partitionedfilter.")):
                    name = "filter"
                off, n, _ = _handle(value)
                blocks[name] = (off, n)
            for name, (off, n) in blocks.items():
                if name != "metaindex":
                    read(name, off, n)
        except SstDamaged as e:
            return str(e)
        except (IndexError, ValueError) as e:  # unparsable: a damaged handle or entry
            return f"{path}: metaindex block unreadable ({e})"
    return None


def check_db(db: Any, path: Path) -> Optional[str]:
    """:func:`check_sst` over the live SST files of the open ``rocksdict.Rdict`` ``db``
    at ``path``: the first damage found, or None."""
    for f in db.live_files():
        damaged = check_sst(path / f["name"].lstrip("/"))
        if damaged is not None:
            return damaged
    return None

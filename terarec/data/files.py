"""Finding input files, sharding them over ranks, the eval split, line chunking, and
reading plain or compressed (gzip, zstd) files as bytes."""

from __future__ import annotations

import functools
import glob
import gzip
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np
import pyarrow as pa

from terarec.data.errors import DataError
from terarec.data.remote import buffered, is_url, list_url, open_url, url_head, url_size
from terarec.hashing import mix64_np, salt_for


def expand_paths(entries: list[str]) -> list[str]:
    """Files named by ``entries``: files, directories (their files, sorted) or globs;
    local paths or URLs (``scheme://``, read through ``pyarrow.fs``: ``data/remote.py``).

    Hidden files (``.name``) inside directories are ignored. Duplicates are dropped,
    first occurrence kept.

    Raises:
        DataError: naming the entry, if it does not exist or matches no file.
    """
    out: list[str] = []
    for e in entries:
        p = Path(e)
        if is_url(e):
            found = list_url(e)
        elif p.is_dir():
            found = sorted(
                str(x) for x in p.iterdir() if x.is_file() and not x.name.startswith(".")
            )
            if not found:
                raise DataError(f"{e}: directory contains no files")
        elif p.is_file():
            found = [str(p)]
        elif glob.has_magic(e):
            found = sorted(x for x in glob.glob(e) if os.path.isfile(x))
            if not found:
                raise DataError(f"{e}: glob matches no files")
        else:
            raise DataError(f"{e}: no such file or directory")
        out.extend(found)
    return list(dict.fromkeys(out))


def shard_files(n_files: int, rank: int, world_size: int) -> tuple[list[int], bool]:
    """Which files a rank reads, and whether rows must be strided instead.

    With at least ``world_size`` files, file ``i`` goes to rank ``i % world_size`` and every
    rank reads whole files. With fewer files every rank reads every file and keeps the
    rows ``j`` with ``j % world_size == rank`` (``strided=True``).

    Returns:
        (file indices for this rank, strided)
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, {world_size})")
    if n_files >= world_size:
        return list(range(rank, n_files, world_size)), False
    return list(range(n_files)), world_size > 1


def row_coin(path: str, rows: np.ndarray) -> np.ndarray:
    """A deterministic coin in ``[0, 1)`` per data row of ``path``: ``mix64(salt(file
    name) ^ row) / 2^64``, independent of chunking, rank and of the directory the file
    sits in. Rows with a coin below ``eval_fraction`` are eval rows, the next
    ``valid_fraction`` validation rows, the rest train rows.

    Args:
        path: the file; only its base name enters the hash, without a ``.gz`` or
            ``.zst`` suffix (``x.tsv``, ``x.tsv.gz`` and ``x.tsv.zst`` split alike).
        rows: int64 ``[n]`` 0-based data row indices (header excluded).

    Returns:
        float64 ``[n]``.
    """
    name = os.path.basename(path)
    for suffix in (GZIP_SUFFIX, ZSTD_SUFFIX):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    salt = np.uint64(salt_for("split:" + name) & ((1 << 64) - 1))
    h = mix64_np(rows.astype(np.uint64) ^ salt)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def eval_mask(path: str, rows: np.ndarray, fraction: float) -> np.ndarray:
    """True (bool ``[n]``) for the data rows of ``path`` whose :func:`row_coin` is below
    ``fraction`` (the eval rows of ``eval_fraction``)."""
    return row_coin(path, rows) < fraction


@dataclass
class LineChunk:
    """Up to ``chunk_rows`` consecutive lines of one file.

    Attributes:
        path: the file.
        buf: uint8 ``[nbytes]`` the raw bytes of the lines, newlines included.
        bounds: int64 ``[n + 1]``; line ``i`` occupies ``buf[bounds[i]:bounds[i+1]]``.
        ends: int64 ``[n]`` end of line ``i``'s content (``\\n`` / ``\\r\\n`` stripped).
        first_line: 0-based file line index of line 0.
        next_offset: file byte offset just after this chunk.
    """

    path: str
    buf: np.ndarray
    bounds: np.ndarray
    ends: np.ndarray
    first_line: int
    next_offset: int

    @property
    def n(self) -> int:
        return len(self.ends)


def _make_chunk(path: str, arr: np.ndarray, nls: np.ndarray, first: int, nxt: int) -> LineChunk:
    bounds = np.concatenate([[0], nls + 1]).astype(np.int64)
    if bounds[-1] != len(arr):  # last line of the file without a newline
        bounds = np.append(bounds, len(arr))
    ends = bounds[1:].copy()
    has_nl = arr[ends - 1] == 10
    ends -= has_nl
    cr = (ends > bounds[:-1]) & (arr[np.maximum(ends - 1, 0)] == 13)
    ends -= cr
    return LineChunk(path, arr, bounds, ends, first, nxt)


# --------------------------------------------------------------------------- raw bytes

GZIP_SUFFIX = ".gz"
ZSTD_SUFFIX = ".zst"
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
_MIN_READ = 1 << 20
_MAX_READ = 64 << 20
_SKIP_BLOCK = 16 << 20
_GZIP_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile, pyarrow's errors: OSError


def compression(path: str) -> Optional[str]:
    """How ``path`` is compressed: ``"gzip"`` or ``"zstd"`` by its name (``.gz``,
    ``.zst``) or, whatever its name, by its first bytes (the formats' magic numbers);
    None for a plain file (or one that cannot be read: opening it says why)."""
    if path.endswith(GZIP_SUFFIX):
        return "gzip"
    if path.endswith(ZSTD_SUFFIX):
        return "zstd"
    if is_url(path):
        head = url_head(path, 4)
    else:
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            return None
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def is_compressed(path: str) -> bool:
    """Whether ``path`` is read decompressed (gzip or zstd: :func:`compression`)."""
    return compression(path) is not None


def _open_raw(path: str, kind: Optional[str]) -> BinaryIO:
    if is_url(path):  # gzip through Python's reader: several members, CRCs checked
        if kind == "gzip":
            return gzip.GzipFile(fileobj=open_url(path), mode="rb")  # type: ignore[return-value]
        return open_url(path, kind)  # type: ignore[return-value]
    if kind == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if kind == "zstd":  # pyarrow's codec: no extra dependency
        return buffered(pa.CompressedInputStream(pa.OSFile(path), "zstd"))  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115


def open_data(path: str, offset: int = 0) -> BinaryIO:
    """Opens ``path`` for reading its data bytes, positioned at byte ``offset``.

    A compressed file (gzip or zstd, by its name or its first bytes: :func:`compression`)
    is decompressed transparently (gzip: one member or several, as from ``cat a.gz
    b.gz``; each member's CRC is checked). For such a file every offset --
    this one, ``LineChunk.next_offset``, the resume positions built from it,
    :func:`header_bytes`, :func:`data_size` -- counts *decompressed* bytes, so a position
    names the same line whether the file is compressed or not. gzip has no random
    access: starting at ``offset > 0`` decompresses and discards everything before it
    (resuming deep into a big ``.gz`` costs reading the file up to there).

    Raises:
        DataError: naming the file, if it cannot be opened or is not valid gzip.
    """
    kind = compression(path)  # (looks at the first bytes: once per open)
    try:
        f = _open_raw(path, kind)
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        if kind is None:
            f.seek(offset)
        elif offset > 0:
            buf = bytearray(min(offset, _SKIP_BLOCK))
            left = offset
            while left > 0:
                n = f.readinto(memoryview(buf)[: min(left, len(buf))])
                if not n:
                    break  # past the end: reads return nothing, like a plain file
                left -= n
    except _GZIP_ERRORS as e:
        f.close()
        raise DataError(f"{path}: cannot read: {e}") from None
    except BaseException:
        f.close()
        raise
    return f


def _read(f: BinaryIO, n: int, path: str) -> bytes:
    try:
        return f.read(n)
    except _GZIP_ERRORS as e:
        raise DataError(f"{path}: cannot read: {e}") from None


def _first_line(path: str) -> bytes:
    with open_data(path) as f:
        try:
            return f.readline()
        except _GZIP_ERRORS as e:
            raise DataError(f"{path}: cannot read: {e}") from None


def read_first_line(path: str) -> bytes:
    """The first line of a file without its line terminator (b'' for an empty file);
    compressed files are decompressed."""
    return _first_line(path).rstrip(b"\r\n")


def header_bytes(path: str) -> int:
    """Size in bytes of the first line of ``path`` including its line terminator
    (decompressed bytes for a compressed file)."""
    return len(_first_line(path))


def data_size(path: str) -> int:
    """Bytes of data in ``path``: its size, or for a compressed file its decompressed size.

    This is the unit of every offset (see :func:`open_data`). For gzip the size is
    counted by decompressing the whole file once (the gzip ISIZE trailer holds only the
    last member's size modulo 2^32: wrong for multi-member files and files of 4 GiB or
    more), and cached in this process per (path, file size, mtime). That costs one read of
    the file: call it only where the size is needed.
    """
    if is_url(path):
        size = url_size(path)
        return _decompressed_size(path, size, 0) if is_compressed(path) else size
    if not is_compressed(path):
        return os.path.getsize(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from None
    return _decompressed_size(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _decompressed_size(path: str, size: int, mtime_ns: int) -> int:
    del size, mtime_ns  # cache key only
    total = 0
    buf = bytearray(_SKIP_BLOCK)
    with open_data(path) as f:
        try:
            while n := f.readinto(buf):
                total += n
        except _GZIP_ERRORS as e:
            raise DataError(f"{path}: cannot read: {e}") from None
    return total


def iter_line_chunks(
    path: str,
    offset: int,
    first_line: int,
    chunk_rows: int,
    stop_offset: Optional[int] = None,
) -> Iterator[LineChunk]:
    """Streams ``path`` from byte ``offset`` in chunks of ``chunk_rows`` lines.

    Chunk boundaries depend only on the start position, so re-reading from a saved
    position reproduces the same chunks (this is what makes resume exact). ``.gz`` files
    are decompressed and offsets count decompressed bytes (see :func:`open_data`).

    Each byte is scanned for newlines once: the file is read in blocks sized from the
    mean line length seen so far (about one chunk), and a chunk is a view of a block
    unless it spans several blocks (then only those are joined).

    Args:
        path: the file.
        offset: byte offset of the first line to read (a line start).
        first_line: 0-based line index of that line (for ``file:line`` messages).
        chunk_rows: lines per chunk (the last may be shorter).
        stop_offset: lines starting at or after this byte offset are not returned.
    """
    f = open_data(path, offset)
    try:
        blocks: list[np.ndarray] = []  # bytes not yet in a chunk; blocks[0][0] is at `offset`
        block_nls: list[np.ndarray] = []  # newline positions within each block
        have = 0  # newlines in `blocks`
        seen_bytes = seen_lines = reads = 0
        eof = False
        while True:
            while have < chunk_rows and not eof:
                if seen_lines:
                    want = int((chunk_rows - have) * seen_bytes / seen_lines * 1.1) + 4096
                else:
                    want = _MIN_READ << min(reads, 6)
                data = _read(f, min(max(want, _MIN_READ), _MAX_READ), path)
                reads += 1
                if not data:
                    eof = True
                    break
                a = np.frombuffer(data, dtype=np.uint8)
                nl = np.flatnonzero(a == 10)
                blocks.append(a)
                block_nls.append(nl)
                have += len(nl)
                seen_bytes += len(a)
                seen_lines += len(nl)
            if not blocks:
                return
            if len(blocks) == 1:
                arr, nls = blocks[0], block_nls[0]
            else:
                base = np.cumsum([0] + [len(b) for b in blocks[:-1]])
                nls = np.concatenate([x + b for x, b in zip(block_nls, base)])
                arr = np.concatenate(blocks)
            k = min(len(nls), chunk_rows)
            cut = int(nls[k - 1]) + 1 if k == chunk_rows else len(arr)
            chunk = _make_chunk(path, arr[:cut], nls[:k], first_line, offset + cut)
            if stop_offset is not None and offset + int(chunk.bounds[-2]) >= stop_offset:
                keep = int(np.searchsorted(offset + chunk.bounds[:-1], stop_offset))
                if keep > 0:
                    b = chunk.bounds[: keep + 1]
                    yield LineChunk(path, arr[: b[-1]], b, chunk.ends[:keep], first_line,
                                    offset + int(b[-1]))
                return
            yield chunk
            offset += cut
            first_line += chunk.n
            if cut < len(arr):
                blocks, block_nls = [arr[cut:]], [nls[k:] - cut]
            else:
                blocks, block_nls = [], []
            have = len(nls) - k
    finally:
        f.close()

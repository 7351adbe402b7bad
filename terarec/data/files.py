"""Finding input files, sharding them over ranks, the eval split, and line chunking."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from terarec.data.errors import DataError
from terarec.hashing import mix64_np, salt_for


def expand_paths(entries: list[str]) -> list[str]:
    """Files named by ``entries``: files, directories (their files, sorted) or globs.

    Hidden files (``.name``) inside directories are ignored. Duplicates are dropped,
    first occurrence kept.

    Raises:
        DataError: naming the entry, if it does not exist or matches no file.
    """
    out: list[str] = []
    for e in entries:
        p = Path(e)
        if p.is_dir():
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


def eval_mask(path: str, rows: np.ndarray, fraction: float) -> np.ndarray:
    """True for the data rows of ``path`` held out for eval.

    A row is held out iff ``mix64(salt(file name) ^ row) / 2^64 < fraction``: a
    deterministic coin per (file name, data row index), independent of chunking, rank
    and of the directory the file sits in.

    Args:
        path: the file; only its base name enters the hash.
        rows: int64 ``[n]`` 0-based data row indices (header excluded).
        fraction: the eval fraction in [0, 1).

    Returns:
        bool ``[n]``.
    """
    salt = np.uint64(salt_for("split:" + os.path.basename(path)) & ((1 << 64) - 1))
    h = mix64_np(rows.astype(np.uint64) ^ salt)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return u < fraction


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


def read_first_line(path: str) -> bytes:
    """The first line of a file without its line terminator (b'' for an empty file)."""
    with open(path, "rb") as f:
        return f.readline().rstrip(b"\r\n")


def header_bytes(path: str) -> int:
    """Size in bytes of the first line of ``path`` including its line terminator."""
    with open(path, "rb") as f:
        return len(f.readline())


def iter_line_chunks(
    path: str,
    offset: int,
    first_line: int,
    chunk_rows: int,
    stop_offset: Optional[int] = None,
) -> Iterator[LineChunk]:
    """Streams ``path`` from byte ``offset`` in chunks of ``chunk_rows`` lines.

    Chunk boundaries depend only on the start position, so re-reading from a saved
    position reproduces the same chunks (this is what makes resume exact).

    Args:
        path: the file.
        offset: byte offset of the first line to read (a line start).
        first_line: 0-based line index of that line (for ``file:line`` messages).
        chunk_rows: lines per chunk (the last may be shorter).
        stop_offset: lines starting at or after this byte offset are not returned.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed in finally across yields
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror}") from None
    try:
        f.seek(offset)
        pending: list[bytes] = []
        newlines = 0
        read_size = 1 << 20
        eof = False
        while True:
            while newlines < chunk_rows and not eof:
                data = f.read(read_size)
                if not data:
                    eof = True
                    break
                pending.append(data)
                newlines += data.count(b"\n")
                read_size = min(read_size * 2, 64 << 20)
            if not pending:
                return
            buf = b"".join(pending) if len(pending) > 1 else pending[0]
            arr = np.frombuffer(buf, dtype=np.uint8)
            nls = np.flatnonzero(arr == 10)
            cut = int(nls[chunk_rows - 1]) + 1 if len(nls) >= chunk_rows else len(buf)
            nls = nls[: min(len(nls), chunk_rows)]
            chunk = _make_chunk(path, arr[:cut], nls, first_line, offset + cut)
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
            rest = buf[cut:]
            pending = [rest] if rest else []
            newlines = rest.count(b"\n")
    finally:
        f.close()

"""Data files named by URL (``scheme://...``), read through ``pyarrow.fs``.

Any file system pyarrow knows serves: ``file://`` (a local path as a URL), ``s3://``,
``gs://``, ``hdfs://`` (as far as the pyarrow build and its credentials allow). A URL
may name a file or a directory (its files, sorted, hidden ones left out) or end in a
glob over file names (``s3://bucket/criteo/day_*.gz``). Reading is sequential, through
a buffer; a plain file opens with random access, so resuming seeks instead of reading
up to the position.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from terarec.data.errors import DataError

_BUFFER = 1 << 20


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in path


def _fs(url: str) -> tuple[pafs.FileSystem, str, str]:
    """``(file system, path inside it, prefix)``: ``prefix + inner`` gives the URL back."""
    try:
        fs, inner = pafs.FileSystem.from_uri(url)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise DataError(f"{url}: cannot open this URL: {e}") from None
    return fs, inner, url[: len(url) - len(inner)] if url.endswith(inner) else ""


def _url(prefix: str, inner: str, like: str) -> str:
    if prefix:
        return prefix + inner
    scheme = like.split("://", 1)[0]
    return f"{scheme}://{inner}"


def list_url(entry: str) -> list[str]:
    """The files an URL entry names (see the module docstring), sorted.

    Raises:
        DataError: naming the entry, if it names nothing.
    """
    pattern = None
    if glob.has_magic(entry):
        entry, pattern = entry.rsplit("/", 1)
    fs, inner, prefix = _fs(entry)
    info = fs.get_file_info(inner)
    if pattern is None and info.type == pafs.FileType.File:
        return [_url(prefix, inner, entry)]
    if info.type != pafs.FileType.Directory:
        raise DataError(f"{entry}: no such file or directory")
    found = sorted(
        _url(prefix, f.path, entry)
        for f in fs.get_file_info(pafs.FileSelector(inner))
        if f.type == pafs.FileType.File and not f.base_name.startswith(".")
        and (pattern is None or fnmatch.fnmatch(f.base_name, pattern))
    )
    if not found:
        what = f"no file matches {pattern!r}" if pattern else "directory contains no files"
        raise DataError(f"{entry}: {what}")
    return found


class _Raw(io.RawIOBase):
    """A pyarrow input stream as a raw binary file (for ``io.BufferedReader``)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._stream.readinto(b)

    def seekable(self) -> bool:
        return bool(self._stream.seekable())

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


def buffered(stream: Any) -> io.BufferedReader:
    """A pyarrow stream (``NativeFile``) as a buffered binary file."""
    return io.BufferedReader(_Raw(stream), _BUFFER)


def open_url(url: str, codec: str | None = None) -> io.BufferedReader:
    """The bytes of ``url``: with ``codec`` (``"gzip"`` / ``"zstd"``) decompressed."""
    fs, inner, _ = _fs(url)
    try:
        if codec is None:
            return buffered(fs.open_input_file(inner))  # random access: seek to resume
        return buffered(pa.CompressedInputStream(fs.open_input_stream(inner), codec))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{url}: cannot open: {e}") from None


def url_head(url: str, n: int) -> bytes:
    """The first ``n`` bytes of ``url`` as stored (b'' when it cannot be read)."""
    try:
        fs, inner, _ = _fs(url)
        with fs.open_input_stream(inner) as f:
            return f.read(n)
    except (DataError, pa.ArrowInvalid, OSError):
        return b""


def url_size(url: str) -> int:
    """The stored size of ``url`` in bytes."""
    fs, inner, _ = _fs(url)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise DataError(f"{url}: no such file")
    return int(info.size)


def base_name(path: str) -> str:
    """The file name of a local path or URL."""
    return posixpath.basename(path.rstrip("/"))

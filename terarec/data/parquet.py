"""Parquet files read through a column schema, streamed by row group.

``data.kind: parquet`` reads the columns ``data.csv`` names (label, dense, categorical:
the same schema as delimited text) and nothing else (column projection), a row group
at a time, in chunks of ``chunk_rows`` rows. Each column is cast to text and handed to
the delimited parser's converter, so a value means in Parquet what it means in a CSV
or Criteo TSV file: the same validation, counted skips, and the same keys (an
``int64`` 123 and the text ``"123"`` hash alike; a null is a missing value). A Criteo
day written to Parquet trains exactly as its TSV (``tests/data/test_parquet.py``).

Positions count *rows* of the file (the text formats count bytes), so a resume state
is exact, and a run resumes at a row group without reading the groups before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from terarec.data.delimited import DelimitedParser
from terarec.data.errors import DataError
from terarec.data.remote import is_url, open_url
from terarec.data.rows import Rows, empty_rows


@dataclass
class RowChunk:
    """Rows ``first_line .. first_line + n`` of a Parquet file (``next_offset``: the row
    after them), as a table of text columns."""

    table: pa.Table
    first_line: int
    n: int
    next_offset: int


def _open(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(open_url(path) if is_url(path) else path)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None


class ParquetParser:
    """Chunks (:meth:`chunks`) and parses (:meth:`parse`) Parquet files for a
    ``FileStream``; the conversion is ``inner``'s (a schema's delimited parser)."""

    def __init__(self, inner: DelimitedParser) -> None:
        self.inner = inner
        self.path = ""
        self._file: Optional[pq.ParquetFile] = None  # start_file's, read by chunks

    def _open(self, path: str) -> pq.ParquetFile:
        """The file start_file opened (its footer read once), else a new one."""
        return self._file if self._file is not None and path == self.path else _open(path)

    @property
    def features(self) -> list[str]:
        return self.inner.features

    @property
    def columns(self) -> list[str]:
        return self.inner.columns

    def start_file(self, path: str) -> int:
        """Checks that ``path`` has the schema's columns; no header: returns 0."""
        self.path = self.inner.path = path
        self._file = _open(path)
        names = self._file.schema_arrow.names
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise DataError(f"{path}: column(s) {missing} not in the file's columns "
                            f"{names[:50]}")
        return 0

    def size(self, path: str) -> int:
        """Rows in ``path`` (the unit of its positions)."""
        return int(self._open(path).metadata.num_rows)

    def chunks(self, path: str, offset: int, first_line: int, rows: int,
               stop: Optional[int] = None) -> Iterator[RowChunk]:
        """Rows ``offset`` (a row index) up to ``stop`` (exclusive; None: the end), in
        chunks of at most ``rows``, starting at the row group that holds ``offset``."""
        f = self._open(path)
        meta = f.metadata
        end = meta.num_rows if stop is None else min(stop, meta.num_rows)
        group_start = 0
        for g in range(meta.num_row_groups):
            n_g = meta.row_group(g).num_rows
            if group_start + n_g <= offset:
                group_start += n_g
                continue
            if group_start >= end:
                return
            table = f.read_row_group(g, columns=self.columns)
            at = max(offset - group_start, 0)
            while at < n_g and group_start + at < end:
                n = min(rows, n_g - at, end - group_start - at)
                yield RowChunk(table.slice(at, n), group_start + at, n, group_start + at + n)
                at += n
            group_start += n_g

    def parse(self, chunk: RowChunk, keep: np.ndarray) -> Rows:
        """The rows ``keep`` (bool ``[n]``) of ``chunk``; bad ones are reported."""
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            return empty_rows(len(self.inner.dense), len(self.inner.cats))
        t = chunk.table if idx.size == chunk.n else chunk.table.take(pa.array(idx))
        text = pa.table({c: _as_text(t.column(c)) for c in self.columns})
        rows, bad_idx, reasons, details = self.inner.convert(text)
        self.inner.report([chunk.first_line + int(idx[i]) + 1 for i in bad_idx],
                           reasons, details)
        return rows


def _as_text(col: Any) -> pa.Array:
    """A column as text, nulls kept (missing): what the delimited reader makes of a
    file's fields."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    return col

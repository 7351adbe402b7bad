"""Delimited text (Criteo TSV, generic CSV) → :class:`Rows`, vectorised with pyarrow.

One :class:`DelimitedParser` serves both formats: Criteo is a fixed schema
(:func:`criteo_parser`), a generic CSV is described by ``CsvSchema`` (:func:`csv_parser`).
Per chunk: the column count of every line is checked with numpy on the raw bytes
(quoting is not supported, so a delimiter always separates columns), good lines are
parsed by ``pyarrow.csv`` with every column as a string, and values are validated with
``pyarrow.compute`` regexes. Bad rows are skipped and reported with ``file:line``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from terarec.config import CsvSchema, DenseTransform
from terarec.data.errors import BadRows, DataError
from terarec.data.files import LineChunk, header_bytes, read_first_line
from terarec.data.keys import string_keys
from terarec.data.rows import Rows, empty_rows

INT_RE = r"^[-+]?[0-9]+$"
FLOAT_RE = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
HEX_RE = r"^[0-9a-fA-F]{1,16}$"

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]


@dataclass
class CatColumn:
    column: str  # column name in the file (or c<k> without a header)
    feature: str  # KJT key
    sep: Optional[str] = None  # multi-valued cell separator
    pattern: Optional[str] = None  # regex every non-empty value must match


class DelimitedParser:
    """Parses chunks of delimited lines into :class:`Rows`.

    Args:
        delimiter: one character.
        header: first line of every file holds the column names; else ``names`` or
            ``c0, c1, ...`` (count taken from each file's first line).
        names: fixed column names when there is no header (Criteo).
        label: label column; label = 1 iff value > ``label_threshold``.
        dense: dense columns; empty = missing = 0.
        dense_pattern: regex a non-empty dense value must match.
        categorical: categorical columns.
        transform: dense transform.
        bad: the source's malformed-row policy.
    """

    def __init__(
        self,
        delimiter: str,
        header: bool,
        names: Optional[list[str]],
        label: str,
        label_threshold: float,
        dense: list[str],
        dense_pattern: str,
        categorical: list[CatColumn],
        transform: DenseTransform,
        bad: BadRows,
    ) -> None:
        self.delim = delimiter
        self.header = header
        self.fixed_names = names
        self.label = label
        self.threshold = label_threshold
        self.dense = dense
        self.dense_pattern = dense_pattern
        self.cats = categorical
        self.transform = transform
        self.bad = bad
        self.names: list[str] = []
        self.path = ""

    @property
    def features(self) -> list[str]:
        return [c.feature for c in self.cats]

    def start_file(self, path: str) -> int:
        """Reads the column names of ``path``; returns the header's size in bytes (or 0)."""
        self.path = path
        if self.fixed_names is not None:
            self.names = self.fixed_names
        else:
            first = read_first_line(path).decode("utf-8", errors="replace")
            cols = first.split(self.delim)
            self.names = cols if self.header else [f"c{i}" for i in range(len(cols))]
            if self.header and len(set(cols)) != len(cols):
                raise DataError(f"{path}:1: duplicate column names in header {cols}")
        need = [self.label, *self.dense, *(c.column for c in self.cats)]
        missing = [c for c in need if c not in self.names]
        if missing:
            raise DataError(
                f"{path}: column(s) {missing} not in the file's columns {self.names[:50]}"
            )
        return header_bytes(path) if self.header else 0

    def parse(self, chunk: LineChunk, keep: np.ndarray) -> Rows:
        """Parses the lines ``keep`` (bool ``[n]``) of ``chunk``; bad ones are reported."""
        lines, reasons, details = [], [], []
        buf, starts, ends = chunk.buf, chunk.bounds[:-1], chunk.ends
        empty = keep & (ends == starts)
        self.bad.count("empty_line", int(empty.sum()))
        cand = np.flatnonzero(keep & ~empty)
        ncols = len(self.names)
        d = np.flatnonzero(buf == ord(self.delim))
        cnt = np.searchsorted(d, ends[cand]) - np.searchsorted(d, starts[cand]) + 1
        wrong = cnt != ncols
        if wrong.any():
            for i, c in zip(cand[wrong], cnt[wrong]):
                lines.append(chunk.first_line + int(i) + 1)
                reasons.append("wrong_column_count")
                details.append(f"expected {ncols} columns, got {int(c)}")
        good = cand[~wrong]
        if len(good) == 0:
            self._report(lines, reasons, details)
            return empty_rows(len(self.dense), len(self.cats))
        if len(good) == chunk.n:
            data = buf
        else:
            span = np.diff(chunk.bounds)
            mask = np.zeros(chunk.n, dtype=bool)
            mask[good] = True
            data = buf[np.repeat(mask, span)]
            if data[-1] != 10:
                data = np.append(data, np.uint8(10))
        table = self._read(data)
        if table.num_rows != len(good):
            raise DataError(
                f"{self.path}:{chunk.first_line + 1}: parsed {table.num_rows} rows from "
                f"{len(good)} lines (a stray carriage return or NUL inside a line?)"
            )
        line_no = chunk.first_line + good + 1
        rows, bad_idx, bad_reason, bad_detail = self._convert(table)
        for i, r, det in zip(bad_idx, bad_reason, bad_detail):
            lines.append(int(line_no[i]))
            reasons.append(r)
            details.append(det)
        self._report(lines, reasons, details)
        return rows

    def _report(self, lines: list[int], reasons: list[str], details: list[Any]) -> None:
        if not lines:
            return
        order = np.argsort(np.asarray(lines), kind="stable")
        self.bad.report(
            self.path,
            np.asarray(lines)[order],
            [reasons[i] for i in order],
            [details[i] for i in order],
        )

    def _read(self, data: np.ndarray) -> pa.Table:
        need = list(dict.fromkeys([self.label, *self.dense, *(c.column for c in self.cats)]))
        return pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=self.names, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(
                delimiter=self.delim,
                quote_char=False,
                escape_char=False,
                ignore_empty_lines=False,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in need},
                include_columns=need,
                strings_can_be_null=False,
            ),
        )

    def _convert(self, t: pa.Table) -> tuple[Rows, list[int], list[str], list[Any]]:
        n = t.num_rows
        bad = np.zeros(n, dtype=bool)
        bad_idx: list[int] = []
        bad_reason: list[str] = []
        bad_detail: list[Any] = []

        def check(col: pa.Array, ok: np.ndarray, reason: str, what: Callable[[str], str]) -> None:
            new = np.flatnonzero(~ok & ~bad)
            bad[new] = True
            for i in new:
                bad_idx.append(int(i))
                bad_reason.append(reason)
                bad_detail.append(lambda i=i, col=col: what(col[int(i)].as_py()))

        lab = t.column(self.label).combine_chunks()
        check(lab, _matches(lab, FLOAT_RE), "bad_label",
              lambda v: f"{self.label}={v!r} is not a number")
        dense_cols = []
        for name in self.dense:
            col = t.column(name).combine_chunks()
            present = pc.greater(pc.binary_length(col), 0).to_numpy(zero_copy_only=False)
            ok = ~present | _matches(col, self.dense_pattern)
            check(col, ok, "bad_dense", lambda v, name=name: f"dense {name}={v!r} is not numeric")
            dense_cols.append((col, present & ok))
        cat_cols = []
        for c in self.cats:
            col = t.column(c.column).combine_chunks()
            if c.pattern is not None and c.sep is None:
                present = pc.greater(pc.binary_length(col), 0).to_numpy(zero_copy_only=False)
                ok = ~present | _matches(col, c.pattern)
                check(col, ok, "bad_categorical",
                      lambda v, c=c: f"categorical {c.column}={v!r} does not match {c.pattern}")
            cat_cols.append(col)

        keep = np.flatnonzero(~bad)
        sel = None if len(keep) == n else pa.array(keep)

        def take(col: pa.Array) -> pa.Array:
            return col if sel is None else col.take(sel)

        labels = _to_float(take(lab), np.ones(len(keep), bool)) > self.threshold
        dense = np.zeros((len(keep), len(self.dense)), dtype=np.float32)
        for j, (col, ok) in enumerate(dense_cols):
            dense[:, j] = _to_float(take(col), ok[keep])
        if self.transform == DenseTransform.LOG1P:
            dense = np.log1p(np.maximum(dense, 0.0, out=dense), out=dense)
        lengths = np.zeros((len(self.cats), len(keep)), dtype=np.int32)
        values = []
        for f, (c, col) in enumerate(zip(self.cats, cat_cols)):
            col = take(col)
            if c.sep is None:
                present, keys = string_keys(col, c.feature)
                lengths[f] = present
            else:
                lengths[f], keys = _multi_keys(col, c.sep, c.feature)
            values.append(keys)
        rows = Rows(labels=labels.astype(np.float32), dense=dense, lengths=lengths, values=values)
        return rows, bad_idx, bad_reason, bad_detail


def _matches(col: pa.Array, pattern: str) -> np.ndarray:
    return pc.match_substring_regex(col, pattern).to_numpy(zero_copy_only=False)


def _to_float(col: pa.Array, ok: np.ndarray) -> np.ndarray:
    """float64 ``[n]`` of the strings marked ``ok`` (validated), 0 elsewhere."""
    if ok.all():
        return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    masked = pc.if_else(pa.array(ok), col, pa.scalar(None, pa.string()))
    return pc.fill_null(pc.cast(masked, pa.float64()), 0.0).to_numpy(zero_copy_only=False)


def _multi_keys(col: pa.Array, sep: str, feature: str) -> tuple[np.ndarray, np.ndarray]:
    """Splits cells on ``sep``; empty tokens are dropped. Returns lengths, keys."""
    lists = pc.split_pattern(col, sep)
    n = len(lists)
    list_len = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    tokens = lists.flatten()
    present, keys = string_keys(tokens, feature)
    row = np.repeat(np.arange(n), list_len)
    lengths = np.bincount(row[present], minlength=n).astype(np.int32)
    return lengths, keys


def criteo_parser(transform: DenseTransform, bad: BadRows) -> DelimitedParser:
    """Criteo TSV: label, I1..I13 (integers), C1..C26 (hex), no header, empty = missing."""
    return DelimitedParser(
        delimiter="\t",
        header=False,
        names=["label", *CRITEO_DENSE, *CRITEO_SPARSE],
        label="label",
        label_threshold=0.5,
        dense=CRITEO_DENSE,
        dense_pattern=INT_RE,
        categorical=[CatColumn(c, c, None, HEX_RE) for c in CRITEO_SPARSE],
        transform=transform,
        bad=bad,
    )


def csv_parser(schema: CsvSchema, transform: DenseTransform, bad: BadRows) -> DelimitedParser:
    """A delimited file described by a :class:`CsvSchema`; categoricals are free strings."""
    return DelimitedParser(
        delimiter=schema.delimiter,
        header=schema.header,
        names=None,
        label=schema.label,
        label_threshold=schema.label_threshold,
        dense=list(schema.dense),
        dense_pattern=FLOAT_RE,
        categorical=[CatColumn(c.column, c.name or c.column, c.sep) for c in schema.categorical],
        transform=transform,
        bad=bad,
    )

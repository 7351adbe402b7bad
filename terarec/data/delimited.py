"""Delimited text (Criteo TSV, generic CSV) → :class:`Rows`, vectorised with pyarrow.

One :class:`DelimitedParser` serves both formats: Criteo is a fixed schema
(:func:`criteo_parser`), a generic CSV is described by ``CsvSchema`` (:func:`csv_parser`).
Per chunk: ``pyarrow.csv`` parses the lines with every column as a string (with a
``quote_char``, quoted fields may hold the delimiter and doubled quotes; a field never
spans lines). If it meets a line with the wrong column count, the chunk is redone
exactly: column counts are checked per line with numpy on the raw bytes (delimiters
inside quotes not counted) and only good lines are parsed. Numbers are converted by one
arrow cast per column, falling back to a per-row regex (``pyarrow.compute``) when a
value is invalid; Criteo hex is validated while hashing. Bad rows are skipped and
reported with ``file:line``.
"""

from __future__ import annotations

import csv as pycsv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from terarec.config import CsvSchema, DenseTransform
from terarec.data.errors import BadRows, DataError
from terarec.data.files import LineChunk, header_bytes, read_first_line
from terarec.data.keys import semantic_id_keys, string_keys
from terarec.data.rows import Rows, empty_rows

INT_RE = r"^-?[0-9]+$"
FLOAT_RE = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
_F32_MAX = float(np.finfo(np.float32).max)
_HEX = np.zeros(256, dtype=bool)
_HEX[np.frombuffer(b"0123456789abcdefABCDEF", np.uint8)] = True

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]


@dataclass
class CatColumn:
    column: str  # column name in the file (or c<k> without a header)
    feature: str  # KJT key
    sep: Optional[str] = None  # multi-valued cell separator
    hex_only: bool = False  # values must be 1-16 hex digits (Criteo)
    levels: int = 0  # > 0: a semantic id of at most ``levels`` integer tokens


class DelimitedParser:
    """Parses chunks of delimited lines into :class:`Rows`.

    Args:
        delimiter: one character.
        header: first line of every file holds the column names; else ``names`` or
            ``c0, c1, ...`` (count taken from each file's first line).
        names: fixed column names when there is no header (Criteo).
        label: label column; label = 1 iff value > ``label_threshold``.
        extra_labels: more label columns, one task each: then ``Rows.labels`` is
            ``[n, 1 + len(extra_labels)]`` (``label`` first).
        dense: dense columns; empty = missing = 0.
        dense_pattern: regex a non-empty dense value must match.
        categorical: categorical columns.
        transform: dense transform.
        bad: the source's malformed-row policy.
        quote: the quote character (None: no quoting).
        weight: a column of sample weights (numbers >= 0; else a ``bad_weight`` row).
        header_file: with ``header``, each file's file with the header line (the first
            of its list; the others continue it); None: every file has its own.
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
        quote: Optional[str] = None,
        header_file: Optional[dict[str, str]] = None,
        weight: Optional[str] = None,
        extra_labels: Sequence[str] = (),
    ) -> None:
        self.delim = delimiter
        self.extra_labels = list(extra_labels)
        self.weight = weight
        self.quote = quote
        self.header_file = header_file
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

    @property
    def columns(self) -> list[str]:
        """The columns read: labels, dense, categorical, weight."""
        return list(dict.fromkeys([self.label, *self.extra_labels, *self.dense,
                                   *(c.column for c in self.cats),
                                   *([self.weight] if self.weight else [])]))

    def start_file(self, path: str) -> int:
        """Reads the column names of ``path``; returns the header's size in bytes (or 0)."""
        self.path = path
        where = path if self.header_file is None else self.header_file.get(path, path)
        own_header = self.header and where == path
        if self.fixed_names is not None:
            self.names = self.fixed_names
        else:
            first = read_first_line(where).decode("utf-8", errors="replace")
            cols = (next(pycsv.reader([first], delimiter=self.delim, quotechar=self.quote))
                    if self.quote else first.split(self.delim))
            self.names = cols if self.header else [f"c{i}" for i in range(len(cols))]
            if self.header and len(set(cols)) != len(cols):
                raise DataError(f"{where}:1: duplicate column names in header {cols}")
        missing = [c for c in self.columns if c not in self.names]
        if missing:
            raise DataError(
                f"{path}: column(s) {missing} not in the file's columns {self.names[:50]}"
            )
        return header_bytes(path) if own_header else 0

    def parse(self, chunk: LineChunk, keep: np.ndarray) -> Rows:
        """Parses the lines ``keep`` (bool ``[n]``) of ``chunk``; bad ones are reported."""
        lines: list[int] = []
        reasons: list[str] = []
        details: list[Any] = []
        starts, ends = chunk.bounds[:-1], chunk.ends
        table = None
        if keep.all() and not (ends == starts).any():
            # Fast path: let pyarrow check the column counts; fall back on any trouble.
            table = self._read(chunk.buf, fail_fast=True)
            if table is not None and table.num_rows != chunk.n:
                table = None
            good = np.arange(chunk.n)
        if table is None:
            good = self._check_columns(chunk, keep, lines, reasons, details)
            if len(good) == 0:
                self.report(lines, reasons, details)
                return empty_rows(len(self.dense), len(self.cats))
            if len(good) == chunk.n:
                data = chunk.buf
            else:
                mask = np.zeros(chunk.n, dtype=bool)
                mask[good] = True
                data = chunk.buf[np.repeat(mask, np.diff(chunk.bounds))]
                if data[-1] != 10:
                    data = np.append(data, np.uint8(10))
            table = self._read(data, fail_fast=False)
            assert table is not None
            if table.num_rows != len(good):
                raise DataError(
                    f"{self.path}:{chunk.first_line + 1}: parsed {table.num_rows} rows from "
                    f"{len(good)} lines (a stray carriage return inside a line?)"
                )
        line_no = chunk.first_line + good + 1
        rows, bad_idx, bad_reason, bad_detail = self.convert(table)
        for i, r, det in zip(bad_idx, bad_reason, bad_detail):
            lines.append(int(line_no[i]))
            reasons.append(r)
            details.append(det)
        self.report(lines, reasons, details)
        return rows

    def _check_columns(
        self, chunk: LineChunk, keep: np.ndarray, lines: list, reasons: list, details: list
    ) -> np.ndarray:
        """Indices of the kept, non-empty lines with the right column count."""
        buf, starts, ends = chunk.buf, chunk.bounds[:-1], chunk.ends
        empty = keep & (ends == starts)
        self.bad.count("empty_line", int(empty.sum()))
        cand = np.flatnonzero(keep & ~empty)
        ncols = len(self.names)
        d = np.flatnonzero(buf == ord(self.delim))
        open_quote = np.zeros(len(cand), dtype=bool)
        if self.quote:  # a delimiter inside quotes separates nothing
            q = np.cumsum(buf == ord(self.quote))
            line_q = np.concatenate([[0], q])[starts]  # quotes before each line
            line = np.searchsorted(starts, d, side="right") - 1
            d = d[(q[d] - line_q[line]) % 2 == 0]
            open_quote = (np.concatenate([[0], q])[ends[cand]] - line_q[cand]) % 2 == 1
        cnt = np.searchsorted(d, ends[cand]) - np.searchsorted(d, starts[cand]) + 1
        wrong = (cnt != ncols) | open_quote
        for i, c, oq in zip(cand[wrong], cnt[wrong], open_quote[wrong]):
            lines.append(chunk.first_line + int(i) + 1)
            reasons.append("wrong_column_count")
            details.append(f"an unclosed {self.quote} (a field never spans lines)" if oq
                           else f"expected {ncols} columns, got {int(c)}")
        return cand[~wrong]

    def report(self, lines: list[int], reasons: list[str], details: list[Any]) -> None:
        if not lines:
            return
        order = np.argsort(np.asarray(lines), kind="stable")
        self.bad.report(
            self.path,
            np.asarray(lines)[order],
            [reasons[i] for i in order],
            [details[i] for i in order],
        )

    def _read(self, data: np.ndarray, fail_fast: bool) -> Optional[pa.Table]:
        """All needed columns as strings ("" = null); None if ``fail_fast`` and a row is
        invalid (wrong column count)."""
        need = self.columns
        invalid = []

        def on_invalid(row: Any) -> str:
            invalid.append(row)
            return "skip"

        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=self.names, block_size=1 << 22),
            parse_options=pacsv.ParseOptions(
                delimiter=self.delim,
                quote_char=self.quote or False,
                double_quote=True,
                newlines_in_values=False,
                escape_char=False,
                ignore_empty_lines=False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in need},
                include_columns=need,
                strings_can_be_null=True,
                null_values=[""],
            ),
        )
        if invalid and fail_fast:
            return None
        if invalid:  # pragma: no cover - column counts were checked before
            raise DataError(f"{self.path}: unexpected invalid row {invalid[0].text[:80]!r}")
        return table

    def convert(self, t: pa.Table) -> tuple[Rows, list[int], list[str], list[Any]]:
        n = t.num_rows
        bad = np.zeros(n, dtype=bool)
        bad_idx: list[int] = []
        bad_reason: list[str] = []
        bad_detail: list[Any] = []

        def flag(col: pa.Array, ok: np.ndarray, reason: str, what: Callable[[Any], str]) -> None:
            new = np.flatnonzero(~ok & ~bad)
            bad[new] = True
            for i in new:
                bad_idx.append(int(i))
                bad_reason.append(reason)
                bad_detail.append(lambda i=i, col=col: what(col[int(i)].as_py()))

        lab_vs = []
        for name in [self.label, *self.extra_labels]:
            lab = t.column(name).combine_chunks()
            lab_v, lab_ok, _ = _numbers(lab, FLOAT_RE, missing_ok=False)
            flag(lab, lab_ok, "bad_label", lambda v, name=name: f"{name}={v!r} is not a number")
            flag(lab, (lab_v >= 0.0) & (lab_v <= 1.0), "bad_label",
                 lambda v, name=name: f"{name}={v!r} is outside [0, 1]")
            lab_vs.append(lab_v)
        dense = np.zeros((n, len(self.dense)), dtype=np.float32)
        for j, name in enumerate(self.dense):
            col = t.column(name).combine_chunks()
            dense[:, j], ok, big = _numbers(col, self.dense_pattern, missing_ok=True)
            flag(col, ~big, "bad_dense", lambda v, name=name:
                 f"dense {name}={v!r} is beyond float32 (|x| > 3.4e38)")
            flag(col, ok, "bad_dense", lambda v, name=name: f"dense {name}={v!r} is not numeric")
        sparse = []
        for c in self.cats:
            col = t.column(c.column).combine_chunks()
            if c.sep is None:
                if c.hex_only:
                    present, keys, ok = string_keys(col, c.feature, _HEX, max_len=16)
                    flag(col, ok, "bad_categorical",
                         lambda v, c=c: f"categorical {c.column}={v!r} is not 1-16 hex digits")
                else:
                    present, keys, _ = string_keys(col, c.feature)
                sparse.append((present.astype(np.int32), keys))
            elif c.levels:
                lengths, keys, ok, many = _semantic_keys(col, c.sep or "", c.feature, c.levels)
                flag(col, ~many, "bad_categorical", lambda v, c=c:
                     f"semantic id {c.column}={v!r} has more than {c.levels} tokens")
                flag(col, ok, "bad_categorical", lambda v, c=c:
                     f"semantic id {c.column}={v!r} is not non-negative integer tokens "
                     f"split by {c.sep!r}")
                sparse.append((lengths, keys))
            else:
                sparse.append(_multi_keys(col, c.sep, c.feature))

        weights = None
        if self.weight:
            col = t.column(self.weight).combine_chunks()
            w, ok, _ = _numbers(col, FLOAT_RE, missing_ok=False)
            flag(col, ok, "bad_weight", lambda v: f"weight {self.weight}={v!r} is not a number")
            flag(col, w >= 0, "bad_weight", lambda v: f"weight {self.weight}={v!r} is < 0")
            weights = w.astype(np.float32)
        labels = ((lab_vs[0] if len(lab_vs) == 1 else np.stack(lab_vs, axis=1))
                  > self.threshold).astype(np.float32)
        if self.transform == DenseTransform.LOG1P:
            dense = np.log1p(np.maximum(dense, 0.0, out=dense), out=dense)
        lengths = np.stack([ln for ln, _ in sparse]) if sparse else np.zeros((0, n), np.int32)
        values = [k for _, k in sparse]
        if bad.any():
            keep = ~bad
            values = [k[np.repeat(keep, ln)] for ln, k in sparse]
            labels, dense, lengths = labels[keep], dense[keep], lengths[:, keep]
            weights = None if weights is None else weights[keep]
        rows = Rows(labels=labels, dense=dense, lengths=lengths, values=values, weights=weights)
        return rows, bad_idx, bad_reason, bad_detail


def _numbers(col: pa.Array, pattern: str, missing_ok: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 values (missing and invalid = 0), bool validity and bool "out of range"
    of a string column ``[n]``.

    A value is valid when it matches ``pattern`` (decimal only: no hex, no inf/nan) and
    is finite in float32 (the dtype it trains in); ``big`` marks the values that match
    but are beyond float32 or not finite. Fast path: one arrow cast of the whole column
    (to int64 for integer columns, so "1.5" is not an integer), used when every value
    casts and none has an ``x`` (arrow reads ``0x10`` as 16; the pattern does not);
    otherwise the regex decides row by row, so a value's fate never depends on the
    other values of its chunk.
    """
    n = len(col)
    present = col.is_valid().to_numpy(zero_copy_only=False)
    v: Optional[np.ndarray] = None
    try:
        if not pc.any(pc.match_substring(col, "x", ignore_case=True)).as_py():
            if pattern == INT_RE:
                # the cast's values buffer as is (undefined under nulls, zeroed here)
                ints = pc.cast(col, pa.int64())
                v = np.frombuffer(ints.buffers()[1], dtype=np.int64, count=n,
                                  offset=ints.offset * 8).astype(np.float64)
                if not present.all():
                    v[~present] = 0.0
            else:
                v = pc.fill_null(pc.cast(col, pa.float64()), 0).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        v = None
    if v is not None:
        big = ~(np.abs(v) <= _F32_MAX)  # NaN too
        if not big.any():
            return v, present | missing_ok, big
    ok = pc.fill_null(pc.match_substring_regex(col, pattern), False)
    ok = ok.to_numpy(zero_copy_only=False)
    good = pa.array(ok)
    vals = pc.fill_null(pc.cast(pc.if_else(good, col, pa.scalar(None, pa.string())),
                                pa.float64()), 0.0).to_numpy(zero_copy_only=False)
    big = ok & ~(np.abs(vals) <= _F32_MAX)
    ok &= ~big
    if missing_ok:
        ok = ok | ~present
    return (np.where(ok, vals, 0.0) if n else vals), ok, big


def _lengths(col: pa.Array) -> np.ndarray:
    """int64 ``[n]`` string or list lengths, 0 for nulls."""
    fn = pc.list_value_length if pa.types.is_list(col.type) else pc.binary_length
    return pc.fill_null(fn(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _multi_keys(col: pa.Array, sep: str, feature: str) -> tuple[np.ndarray, np.ndarray]:
    """Splits cells on ``sep``; empty tokens are dropped. Returns lengths, keys."""
    lists = pc.split_pattern(col, sep)
    n = len(lists)
    list_len = _lengths(lists)
    tokens = lists.flatten()
    present, keys, _ = string_keys(tokens, feature)
    row = np.repeat(np.arange(n), list_len)
    lengths = np.bincount(row[present], minlength=n).astype(np.int32)
    return lengths, keys


def _semantic_keys(col: pa.Array, sep: str, feature: str, levels: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A semantic-id column: cells of integer tokens split by ``sep`` (empty cell =
    missing), keyed by prefix (``keys.semantic_id_keys``).

    Returns int32 lengths ``[n]``, int64 keys ``[sum(lengths)]``, bool ``[n]`` "every
    token is an integer in [0, 2^63)" and bool ``[n]`` "more than ``levels`` tokens"
    (a bad row's tokens read as 0, so its keys are there to be dropped)."""
    n = len(col)
    empty = pc.fill_null(pc.equal(col, ""), True).to_numpy(zero_copy_only=False)
    lists = pc.split_pattern(pc.if_else(pa.array(empty), pa.scalar(None, pa.string()), col),
                             sep)
    lengths = _lengths(lists)
    tokens = lists.flatten()
    good = pc.fill_null(pc.match_substring_regex(tokens, r"^[0-9]{1,19}$"), False)
    good = good.to_numpy(zero_copy_only=False)
    vals = pc.cast(pc.if_else(pa.array(good), tokens, "0"), pa.uint64()).to_numpy()
    good &= vals < (1 << 63)
    row = np.repeat(np.arange(n), lengths)
    ok = np.bincount(row[~good], minlength=n) == 0
    vals = np.where(good, vals, 0).astype(np.int64)
    keys = semantic_id_keys(vals, lengths, feature)
    return lengths.astype(np.int32), keys, ok, lengths > levels


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
        categorical=[CatColumn(c, c, None, hex_only=True) for c in CRITEO_SPARSE],
        transform=transform,
        bad=bad,
    )


def csv_parser(schema: CsvSchema, transform: DenseTransform, bad: BadRows,
               first_files: Optional[dict[str, str]] = None) -> DelimitedParser:
    """A delimited file described by a :class:`CsvSchema`; categoricals are free strings.
    ``first_files``: each file's file with the header, for ``header_in_first_file_only``."""
    return DelimitedParser(
        delimiter=schema.delimiter,
        header=schema.header,
        names=None,
        label=schema.label,
        label_threshold=schema.label_threshold,
        dense=list(schema.dense),
        dense_pattern=FLOAT_RE,
        categorical=[CatColumn(c.column, c.name or c.column, c.sep,
                               levels=(c.levels or 0) if c.semantic_id else 0)
                     for c in schema.categorical],
        transform=transform,
        bad=bad,
        quote=schema.quote_char,
        header_file=first_files if schema.header_in_first_file_only else None,
        weight=schema.weight,
        extra_labels=schema.extra_labels,
    )

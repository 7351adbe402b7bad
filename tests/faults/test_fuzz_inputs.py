"""Fuzzing the text readers and the config loader (hypothesis, derandomised and bounded):
no exception but the documented ones, every line accounted for."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from terarec.config import (
    CategoricalColumn,
    ConfigError,
    CsvSchema,
    DataConfig,
    DataKind,
    DenseTransform,
    LibfmConfig,
    config_from_dict,
)
from terarec.data import DataError, build_source

FUZZ = settings(derandomize=True, max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# cell values meant to hit every path: valid, missing, huge, hex, non-finite, junk
NUMBERS = st.one_of(st.integers(-10**6, 10**6).map(str), st.just(""), st.just("1" * 40),
                    st.sampled_from(["0x10", "nan", "inf", "-inf", "1e400", "1.5", " 7",
                                     "-", "+3", "1_0", "٣"]),
                    st.text(max_size=4).filter(lambda t: "\t" not in t and "\n" not in t
                                               and "\r" not in t))
HEX = st.one_of(st.integers(0, 2**32 - 1).map(lambda v: f"{v:08x}"), st.just(""),
                st.sampled_from(["zz", "0" * 17, "ABCDEF12", "é"]))
LABELS = st.sampled_from(["0", "1", "2", "-1", "0.5", "x", "", "1e400"])


@st.composite
def criteo_lines(draw: Any) -> list[str]:
    lines = []
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.integers(0, 9))
        if kind == 0:  # a wrong number of columns
            lines.append("\t".join(draw(st.lists(NUMBERS, max_size=45))))
        elif kind == 1:
            lines.append("")
        else:
            lines.append("\t".join([draw(LABELS)] + [draw(NUMBERS) for _ in range(13)]
                                   + [draw(HEX) for _ in range(26)]))
    return lines


def one_pass(cfg: DataConfig) -> tuple[int, dict[str, Any], list[np.ndarray]]:
    src = build_source(cfg, "train", seed=0, epochs=1)
    try:
        batches = list(src)
    finally:
        src.close()
    return sum(b.batch_size for b in batches), src.stats(), [b.dense.numpy() for b in batches]


@FUZZ
@given(lines=criteo_lines(), strict=st.booleans())
def test_criteo_reader_accounts_for_every_line(tmp_path: Path, lines: list[str],
                                               strict: bool) -> None:
    p = tmp_path / "f.tsv"
    p.write_text("".join(x + "\n" for x in lines))
    cfg = DataConfig(kind=DataKind.CRITEO, path=[str(p)], batch_size=7, chunk_rows=5,
                     prefetch_batches=0, strict=strict, dense_transform=DenseTransform.LOG1P)
    try:
        rows, stats, dense = one_pass(cfg)
    except DataError as e:  # strict: the first malformed row, named by file and line
        assert strict and f"{p}:" in str(e), str(e)
        return
    assert rows + stats["rows_skipped_total"] == len(lines), stats
    assert all(np.isfinite(d).all() for d in dense)


@FUZZ
@given(rows=st.lists(st.tuples(LABELS, NUMBERS, st.text(max_size=6)), max_size=25))
def test_csv_reader_accounts_for_every_row(tmp_path: Path, rows: list[tuple[str, ...]]) -> None:
    bad_chars = (",", "\n", "\r", '"')
    rows = [r for r in rows if not any(c in x for x in r for c in bad_chars)]
    p = tmp_path / "f.csv"
    p.write_text("label,price,tags\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    schema = CsvSchema(label="label", dense=["price"],
                       categorical=[CategoricalColumn("tags", sep="|")])
    cfg = DataConfig(kind=DataKind.CSV, path=[str(p)], csv=schema, batch_size=4,
                     chunk_rows=3, prefetch_batches=0)
    n, stats, dense = one_pass(cfg)
    assert n + stats["rows_skipped_total"] == len(rows), stats
    assert all(np.isfinite(d).all() for d in dense)


GOOD_TOKEN = st.tuples(st.integers(0, 10**18 - 1), st.integers(-9, 9)).map(
    lambda t: f"{t[0]}:{t[1]}")
BAD_TOKEN = st.one_of(
    st.tuples(st.integers(0, 10**18 - 1), NUMBERS).map(lambda t: f"{t[0]}:{t[1]}"),
    st.sampled_from(["1:", ":1", "1:2:3", "9" * 19 + ":1", "-1:1", "x:1", "1:nan", "1:1e400",
                     "1:0x10", "１:1"]),
    st.text(max_size=5).filter(lambda t: "\n" not in t and "\r" not in t),
)


@st.composite
def libfm_lines(draw: Any, width: int) -> list[str]:
    """Rows of ``width`` tokens mostly (some another count), with hostile labels/tokens."""
    lines = []
    for _ in range(draw(st.integers(0, 30))):
        n = width if draw(st.integers(0, 3)) else draw(st.integers(0, width + 2))
        label = draw(st.sampled_from(["0", "1", "-1"])) if draw(st.booleans()) else draw(LABELS)
        toks = [draw(GOOD_TOKEN) if draw(st.integers(0, 5)) else draw(BAD_TOKEN)
                for _ in range(n)]
        lines.append(" ".join([label] + toks))
    return lines


@FUZZ
@given(lines=libfm_lines(3), named=st.booleans(), strict=st.booleans())
def test_libfm_reader_accounts_for_every_line(tmp_path: Path, lines: list[str], named: bool,
                                              strict: bool) -> None:
    p = tmp_path / "f.libfm"
    p.write_text("".join(x + "\n" for x in lines))
    cfg = DataConfig(kind=DataKind.LIBFM, path=[str(p)], batch_size=4, chunk_rows=3,
                     prefetch_batches=0, strict=strict,
                     libfm=LibfmConfig(fields=["a", "b", "c"] if named else None))
    try:
        n, stats, _ = one_pass(cfg)
    except DataError as e:
        assert strict and f"{p}:" in str(e), str(e)
        return
    assert n + stats["rows_skipped_total"] == len(lines), stats
    assert n >= sum(_good_libfm(x, 3 if named else None) for x in lines)


def _good_libfm(line: str, width: Optional[int]) -> bool:
    """A line every libFM reader must accept: a decimal label, ``width`` (any count when
    None, at least one) tokens of decimal ``idx:int``."""
    label, *toks = line.split(" ")
    ok_label = label.lstrip("-").isdecimal() and label.isascii()
    ok_toks = all(t.count(":") == 1 and all(p.lstrip("-").isdecimal() and p.isascii()
                                            for p in t.split(":")) and not t.startswith("-")
                  and len(t.split(":")[0]) <= 18 for t in toks)
    return ok_label and ok_toks and len(toks) >= 1 and (width is None or len(toks) == width)


YAMLISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10**7), st.floats(allow_nan=True),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
SECTIONS = ["name", "seed", "data", "tables", "model", "optimizer", "train", "ssd", "sync",
            "dist"]


@FUZZ
@given(data=st.dictionaries(st.sampled_from(SECTIONS), YAMLISH, max_size=5))
def test_config_loader_raises_config_errors_only(data: dict[str, Any]) -> None:
    try:
        cfg = config_from_dict(data, "<fuzz>")
    except ConfigError as e:
        assert str(e).startswith("<fuzz>"), str(e)
        return
    assert cfg.name and not math.isnan(float(cfg.seed))


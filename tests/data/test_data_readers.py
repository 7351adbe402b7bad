"""Criteo, CSV and libFM readers on tiny files: layout, missing values, malformed rows."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from terarec.config import (
    CategoricalColumn,
    CsvSchema,
    DataConfig,
    DataKind,
    DenseTransform,
    LibfmConfig,
)
from terarec.data import DataError, build_source, dense_feature_names, sparse_feature_names
from terarec.data.keys import int_keys, str_key
from tests.numerics import assert_close, f32_tol

FRAPPE_FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost",
                 "weather", "country", "city"]


def one_pass(cfg: DataConfig) -> tuple[list, dict]:
    src = build_source(cfg, "train", seed=0, epochs=1)
    batches = list(src)
    return batches, src.stats()


def criteo_cfg(*paths: Path, **kw) -> DataConfig:
    kw.setdefault("batch_size", 4)
    kw.setdefault("prefetch_batches", 0)
    return DataConfig(kind=DataKind.CRITEO, path=[str(p) for p in paths], **kw)


# ------------------------------------------------------------------------- criteo


def test_criteo_layout_missing_and_transform(tmp_path: Path) -> None:
    cats = [f"{j:08x}" for j in range(26)]
    row0 = "\t".join(["1", "3", "", "-5", *["1"] * 10, *cats])
    cats1 = list(cats)
    cats1[0] = ""
    cats1[25] = ""
    row1 = "\t".join(["0", *["0"] * 13, *cats1])
    p = tmp_path / "a.tsv"
    p.write_text(row0 + "\r\n" + row1)  # CRLF and no trailing newline
    cfg = criteo_cfg(p, dense_transform=DenseTransform.LOG1P)
    (b,), stats = one_pass(cfg)
    assert stats["rows_skipped_total"] == 0
    assert b.labels.tolist() == [1.0, 0.0]
    assert b.dense.shape == (2, 13)
    # float32 log1p against numpy's float64 one: one float32 rounding of its size
    assert_close(b.dense[0, :3], [np.log1p(3), 0.0, 0.0], f32_tol(np.log1p(3)),
                 "log1p")  # missing, <0
    kjt = b.sparse
    assert kjt.keys() == sparse_feature_names(cfg) == [f"C{i}" for i in range(1, 27)]
    assert dense_feature_names(cfg) == [f"I{i}" for i in range(1, 14)]
    lengths = kjt.lengths().view(26, 2)  # feature-major
    assert lengths[0].tolist() == [1, 0] and lengths[25].tolist() == [1, 0]
    assert lengths[1:25].eq(1).all()
    vals = kjt.values().tolist()
    assert vals[0] == str_key(cats[0], "C1")  # C1 row0; row1 missing
    assert vals[1] == str_key(cats[1], "C2") == vals[2]  # C2 of row0 and row1
    assert kjt["C26"].values().tolist() == [str_key(cats[25], "C26")]



def test_criteo_malformed_rows(write_criteo, caplog: pytest.LogCaptureFixture) -> None:
    good = range(10)
    bad = {
        2: "0\t1\t2",  # line 3: wrong column count
        5: "\t".join(["0", "x1", *["1"] * 12, *["0a"] * 26]),  # line 6: non-numeric dense
        7: "\t".join(["0", *["1"] * 13, "zz", *["0a"] * 25]),  # line 8: bad hex
        9: "\t".join(["yes", *["1"] * 13, *["0a"] * 26]),  # line 10: bad label
        11: "",  # line 12: empty line (skipped, not an error)
    }
    p = write_criteo("bad.tsv", good, bad)
    with caplog.at_level(logging.WARNING, logger="terarec.data"):
        batches, stats = one_pass(criteo_cfg(p, log_bad_rows=2))
    assert sum(b.batch_size for b in batches) == 10
    assert sorted(b.dense[:, 0].tolist() for b in batches) and sorted(
        x for b in batches for x in b.dense[:, 0].tolist()) == list(range(10))
    assert stats["rows_skipped"] == {"wrong_column_count": 1, "bad_dense": 1,
                                     "bad_categorical": 1, "bad_label": 1, "empty_line": 1}
    msgs = [r.getMessage() for r in caplog.records]
    assert f"{p}:3: wrong_column_count: expected 40 columns, got 3" in msgs[0]
    assert f"{p}:6: bad_dense: dense I1='x1' is not numeric" in msgs[1]
    assert len(msgs) == 3 and "further malformed rows" in msgs[2]


def _criteo_row(label: str = "0", i1: str = "1") -> str:
    return "\t".join([label, i1, *["1"] * 12, *["0a"] * 26])


@pytest.mark.parametrize("others_valid", [True, False])
def test_criteo_dense_beyond_float32_and_hex_are_counted_skips(
        write_criteo, others_valid: bool) -> None:
    """A 40-digit dense value (beyond float32), a hex one (0x10) and a label of 2 are
    counted skips, whatever the other rows of their chunk hold (a chunk where every other
    value casts once took a different path that accepted 0x10), with no numpy warning."""
    extra = {1: _criteo_row(i1="1" * 40), 3: _criteo_row(i1="0x10"), 4: _criteo_row("2")}
    if not others_valid:
        extra[6] = _criteo_row(i1="x1")
    p = write_criteo("big.tsv", range(8), extra)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches, stats = one_pass(criteo_cfg(p, dense_transform=DenseTransform.LOG1P))
    assert sum(b.batch_size for b in batches) == 8
    assert all(bool(np.isfinite(b.dense.numpy()).all()) for b in batches)
    assert stats["rows_skipped"] == {"bad_dense": 3 if not others_valid else 2,
                                     "bad_label": 1}
    with pytest.raises(DataError, match=rf"{p}:2: bad_dense: dense I1='1{{40}}' is "
                                        r"beyond float32"):
        one_pass(criteo_cfg(p, strict=True))


def test_criteo_strict_names_file_and_line(write_criteo) -> None:
    p = write_criteo("s.tsv", range(6), {4: "\t".join(["0", *["1"] * 13, "g", *["0a"] * 25])})
    with pytest.raises(DataError, match=rf"{p}:5: bad_categorical: categorical C1='g'"):
        one_pass(criteo_cfg(p, strict=True, prefetch_batches=2))


def test_criteo_small_chunks_same_as_one_chunk(write_criteo, as_tuple) -> None:
    p = write_criteo("c.tsv", range(50), {7: "bad", 30: "x\ty"})
    a, _ = one_pass(criteo_cfg(p, chunk_rows=3, batch_size=7))
    b, _ = one_pass(criteo_cfg(p, chunk_rows=1000, batch_size=7))
    assert [as_tuple(x) for x in a] == [as_tuple(x) for x in b]
    assert [x.batch_size for x in a] == [7] * 7 + [1]


def test_criteo_real_head(shared_data: Path) -> None:
    cfg = criteo_cfg(shared_data / "criteo_kaggle_head10k.tsv", batch_size=4096,
                     dense_transform=DenseTransform.LOG1P, chunk_rows=3000)
    batches, stats = one_pass(cfg)
    assert stats["rows_skipped_total"] == 0
    n = sum(b.batch_size for b in batches)
    assert n == 10_000
    pos = sum(b.labels.sum().item() for b in batches) / n
    assert 0.20 < pos < 0.24  # README: 21.8 % positives
    assert all(b.sparse.lengths().max() <= 1 for b in batches)
    assert all(np.isfinite(b.dense.numpy()).all() and (b.dense >= 0).all() for b in batches)


# ------------------------------------------------------------------------- csv


def test_csv_header_multivalue_and_threshold(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text(
        "id,click,price,tags,city\n"
        "1,0.9,2.5,a|b||c,paris\n"
        "2,0.1,,,\n"
        "3,0.7,1e2,b,rome\n"
        "4,nope,1,a,x\n"
        "5,1,abc,a,x\n"
    )
    schema = CsvSchema(
        label="click", dense=["price"],
        categorical=[CategoricalColumn("tags", sep="|"), CategoricalColumn("city", name="town")],
        label_threshold=0.5,
    )
    cfg = DataConfig(kind=DataKind.CSV, path=[str(p)], csv=schema, batch_size=10,
                     prefetch_batches=0)
    assert sparse_feature_names(cfg) == ["tags", "town"]
    assert dense_feature_names(cfg) == ["price"]
    (b,), stats = one_pass(cfg)
    assert stats["rows_skipped"] == {"bad_label": 1, "bad_dense": 1}
    assert b.labels.tolist() == [1.0, 0.0, 1.0]
    assert b.dense[:, 0].tolist() == [2.5, 0.0, 100.0]
    assert b.sparse["tags"].lengths().tolist() == [3, 0, 1]
    assert b.sparse["tags"].values().tolist() == [str_key(t, "tags") for t in "abcb"]
    assert b.sparse["town"].values().tolist() == [str_key("paris", "town"),
                                                  str_key("rome", "town")]
    # labels outside [0, 1] and dense values that are not finite float32 are skips
    # (soft labels in [0, 1] stay valid)
    q = tmp_path / "e.csv"
    q.write_text("id,click,price,tags,city\n1,2,1,a,x\n2,-0.5,1,a,x\n3,0.3,1e400,a,x\n"
                 "4,0.3,inf,a,x\n5,0.3,nan,a,x\n6,0.3,-1e39,a,x\n7,0.6,3e38,a,x\n")
    cfg = DataConfig(kind=DataKind.CSV, path=[str(q)], csv=schema, batch_size=10,
                     prefetch_batches=0)
    (b,), stats = one_pass(cfg)
    assert stats["rows_skipped"] == {"bad_label": 2, "bad_dense": 4}
    assert b.labels.tolist() == [1.0] and b.dense[:, 0].tolist() == [np.float32(3e38)]


def test_csv_without_header_and_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "d.tsv"
    p.write_text("1;u1;9\n0;u2;8\n")
    schema = CsvSchema(label="c0", dense=["c2"], categorical=[CategoricalColumn("c1")],
                       delimiter=";", header=False)
    cfg = DataConfig(kind=DataKind.CSV, path=[str(p)], csv=schema, prefetch_batches=0)
    (b,), _ = one_pass(cfg)
    assert b.labels.tolist() == [1.0, 0.0] and b.dense[:, 0].tolist() == [9.0, 8.0]
    bad = CsvSchema(label="c0", categorical=[CategoricalColumn("c7")], header=False,
                    delimiter=";")
    with pytest.raises(DataError, match=r"d.tsv: column\(s\) \['c7'\] not in"):
        one_pass(DataConfig(kind=DataKind.CSV, path=[str(p)], csv=bad, prefetch_batches=0))


# ------------------------------------------------------------------------- libfm


def test_libfm_fields_and_malformed(tmp_path: Path) -> None:
    p = tmp_path / "f.libfm"
    p.write_text(
        "1 3:1 7:1\n"
        "-1 4:1 8:1.0 \n"
        "1 3:1\n"  # line 3: wrong token count
        "x 3:1 7:1\n"  # line 4: bad label
        "0 3:1 a:1\n"  # line 5: bad token
        "\n"
        "0 5:1 9:1"
    )
    cfg = DataConfig(kind=DataKind.LIBFM, path=[str(p)], libfm=LibfmConfig(["u", "i"]),
                     prefetch_batches=0)
    (b,), stats = one_pass(cfg)
    assert stats["rows_skipped"] == {"wrong_token_count": 1, "bad_label": 1, "bad_token": 1,
                                     "empty_line": 1}
    assert b.labels.tolist() == [1.0, 0.0, 0.0]
    assert b.sparse.keys() == ["u", "i"]
    assert b.sparse.lengths().tolist() == [1] * 6
    assert b.sparse["u"].values().tolist() == int_keys(np.array([3, 4, 5]), "u").tolist()
    assert b.sparse["i"].values().tolist() == int_keys(np.array([7, 8, 9]), "i").tolist()
    with pytest.raises(DataError, match=rf"{p}:3: wrong_token_count: expected 2 .* got 1"):
        one_pass(DataConfig(kind=DataKind.LIBFM, path=[str(p)], libfm=LibfmConfig(["u", "i"]),
                            strict=True))


def test_libfm_single_multivalued_feature(tmp_path: Path) -> None:
    p = tmp_path / "g.libfm"
    p.write_text("1 3:1 7:1 9:1\n0\n-1 2:1\n")
    cfg = DataConfig(kind=DataKind.LIBFM, path=[str(p)], prefetch_batches=0)
    assert sparse_feature_names(cfg) == ["features"]
    (b,), _ = one_pass(cfg)
    assert b.sparse.lengths().tolist() == [3, 0, 1]
    assert b.sparse.values().tolist() == int_keys(np.array([3, 7, 9, 2]), "features").tolist()
    assert b.dense.shape == (3, 0)


def test_frappe_real(shared_data: Path) -> None:
    cfg = DataConfig(kind=DataKind.LIBFM, path=[str(shared_data / "frappe_validation.libfm")],
                     libfm=LibfmConfig(FRAPPE_FIELDS), batch_size=8192)
    batches, stats = one_pass(cfg)
    assert stats["rows_skipped_total"] == 0
    assert sum(b.batch_size for b in batches) == 57_722
    assert all(b.sparse.keys() == FRAPPE_FIELDS for b in batches)
    assert all(b.sparse.lengths().eq(1).all() for b in batches)
    pos = sum(b.labels.sum().item() for b in batches) / 57_722
    assert 0.32 < pos < 0.34


def test_csv_quoted_fields_hold_the_delimiter_and_quotes(tmp_path: Path) -> None:
    p = tmp_path / "q.csv"
    p.write_text('click,"price, eur",city\n'
                 '1,2.5,"Paris, FR"\n'
                 '0,"3","say ""hi"""\n'
                 '1,4,"open quote\n'          # an unclosed quote: a bad line, counted
                 '0,5,plain\n'
                 '1,6,a,b\n')                  # too many columns
    schema = CsvSchema(label="click", dense=["price, eur"],
                       categorical=[CategoricalColumn("city")], quote_char='"')
    cfg = DataConfig(kind=DataKind.CSV, path=[str(p)], csv=schema, batch_size=10,
                     prefetch_batches=0)
    (b,), stats = one_pass(cfg)
    assert stats["rows_skipped"] == {"wrong_column_count": 2}
    assert b.dense[:, 0].tolist() == [2.5, 3.0, 5.0]
    assert b.sparse["city"].values().tolist() == [
        str_key(v, "city") for v in ("Paris, FR", 'say "hi"', "plain")]
    # without quote_char the same file splits at every comma: the quoted lines are bad
    plain = DataConfig(kind=DataKind.CSV, path=[str(p)], batch_size=10, prefetch_batches=0,
                       csv=CsvSchema(label="click", dense=[],
                                     categorical=[CategoricalColumn("city")]))
    assert one_pass(plain)[1]["rows_skipped"] == {"wrong_column_count": 3}


def test_csv_header_in_the_first_file_only(tmp_path: Path) -> None:
    """A CSV split into pieces: the header is in the first one; every piece's rows are
    read with its columns (sharded readers included)."""
    first, second = tmp_path / "part0.csv", tmp_path / "part1.csv"
    first.write_text("id,click,price\n1,1,1.0\n2,0,2.0\n")
    second.write_text("3,1,3.0\n4,0,4.0\n")
    schema = CsvSchema(label="click", dense=["price"], categorical=[CategoricalColumn("id")],
                       header_in_first_file_only=True)
    cfg = DataConfig(kind=DataKind.CSV, path=[str(first), str(second)], csv=schema,
                     batch_size=10, prefetch_batches=0)
    (b,), stats = one_pass(cfg)
    assert sorted(b.dense[:, 0].tolist()) == [1.0, 2.0, 3.0, 4.0]
    assert stats["rows_skipped"] == {}
    for rank in (0, 1):  # rank 1 reads only the second file, with the first's header
        src = build_source(cfg, "train", seed=0, epochs=1, rank=rank, world_size=2)
        got = [v for batch in src for v in batch.dense[:, 0].tolist()]
        assert sorted(got) == ([1.0, 2.0] if rank == 0 else [3.0, 4.0])

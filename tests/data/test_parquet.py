"""Parquet through a column schema: the same rows, keys, skips and training as the same
data in a Criteo TSV; row-group streaming, column projection and exact resume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from terarec.config import CategoricalColumn, CsvSchema, DataConfig, DataKind, DenseTransform
from terarec.data import DataError, build_source
from terarec.data.delimited import CRITEO_DENSE, CRITEO_SPARSE

SCHEMA = CsvSchema(label="label", dense=list(CRITEO_DENSE),
                   categorical=[CategoricalColumn(c) for c in CRITEO_SPARSE])


def to_parquet(tsv: Path, out: Path, row_group: int, extra_column: bool = True) -> Path:
    """The TSV as Parquet: integer dense columns (nulls where missing), hex string
    categoricals, an unused column (left unread), several row groups."""
    names = ["label", *CRITEO_DENSE, *CRITEO_SPARSE]
    types = {"label": pa.int64(), **{d: pa.int64() for d in CRITEO_DENSE},
             **{c: pa.string() for c in CRITEO_SPARSE}}
    t = pacsv.read_csv(tsv, read_options=pacsv.ReadOptions(column_names=names),
                       parse_options=pacsv.ParseOptions(delimiter="\t"),
                       convert_options=pacsv.ConvertOptions(column_types=types,
                                                            strings_can_be_null=True))
    if extra_column:
        t = t.append_column("unused", pa.array(np.arange(t.num_rows)))
    pq.write_table(t, out, row_group_size=row_group)
    return out


def batches(cfg: DataConfig, state: dict | None = None) -> list[tuple[dict, Any]]:
    src = build_source(cfg, "train", seed=0, epochs=1)
    if state is not None:
        src.load_state_dict(state)
    try:
        return [(b.position, b) for b in src]
    finally:
        src.close()


def same_rows(a: Any, b: Any) -> bool:
    return (torch.equal(a.labels, b.labels) and torch.equal(a.dense, b.dense)
            and torch.equal(a.sparse.values(), b.sparse.values())
            and torch.equal(a.sparse.lengths(), b.sparse.lengths()))


def test_parquet_gives_the_tsv_rows_and_resumes_exactly(
        tmp_path: Path, write_criteo: Callable[..., Path]) -> None:
    tsv = write_criteo("day.tsv", range(230))
    pqt = to_parquet(tsv, tmp_path / "day.parquet", row_group=50)
    kw = dict(batch_size=16, chunk_rows=20, prefetch_batches=0,
              dense_transform=DenseTransform.LOG1P)
    want = batches(DataConfig(kind=DataKind.CRITEO, path=[str(tsv)], **kw))
    got = batches(DataConfig(kind=DataKind.PARQUET, path=[str(pqt)], csv=SCHEMA, **kw))
    assert len(got) == len(want)
    assert all(same_rows(g, w) for (_, g), (_, w) in zip(got, want))
    mid = len(got) // 2  # resume mid-file: positions are rows, inside a row group
    assert 0 < got[mid][0]["offset"] < 230
    rest = batches(DataConfig(kind=DataKind.PARQUET, path=[str(pqt)], csv=SCHEMA, **kw),
                   state=got[mid][0])
    assert len(rest) == len(got) - mid - 1
    assert all(same_rows(g, w) for (_, g), (_, w) in zip(rest, got[mid + 1:]))


def test_parquet_trains_exactly_as_the_tsv(tmp_path: Path,
                                           write_criteo: Callable[..., Path]) -> None:
    """(Without shuffling: a shuffle window is seeded by its start position, which
    counts bytes in a text file and rows in Parquet, so shuffled orders differ.)"""
    from terarec.config import config_from_dict
    from terarec.trainer.checkpoint import read_tables
    from terarec.trainer.loop import train

    tsv = write_criteo("day.tsv", range(300))
    ev = write_criteo("eval.tsv", range(300, 400))
    pqt = to_parquet(tsv, tmp_path / "day.parquet", row_group=64)
    out = {}
    for name, data in (("tsv", {"kind": "criteo", "path": [str(tsv)]}),
                       ("parquet", {"kind": "parquet", "path": [str(pqt)],
                                    "csv": {"label": "label", "dense": list(CRITEO_DENSE),
                                            "categorical": [{"column": c}
                                                            for c in CRITEO_SPARSE]}})):
        cfg = config_from_dict({
            "name": name, "seed": 0,
            "data": {**data, "eval_path": [str(ev)] if name == "tsv" else
                     [str(to_parquet(ev, tmp_path / "eval.parquet", 40))],
                     "batch_size": 16, "chunk_rows": 32, "dense_transform": "log1p"},
            "tables": [{"name": "sparse", "dim": 4}],
            "model": {"kind": "dlrm", "bottom_mlp": [8, 4], "top_mlp": [8]},
            "train": {"steps": 12, "device": "cpu", "threads": 1, "progress": False,
                      "runs_dir": str(tmp_path / "runs")}}, f"<{name}>")
        train(cfg)
        ckpt = tmp_path / "runs" / name / "checkpoint"
        out[name] = (read_tables(ckpt)["sparse"],
                     torch.load(ckpt / "dense.pt", weights_only=True)["model"])
    (a, da), (b, db) = out["tsv"], out["parquet"]
    assert all(torch.equal(da[k], db[k]) for k in da)
    oa, ob = torch.argsort(a["keys"]), torch.argsort(b["keys"])
    assert torch.equal(a["keys"][oa], b["keys"][ob])
    assert torch.equal(a["rows"][oa], b["rows"][ob])


def test_a_bad_value_is_a_counted_skip_and_a_missing_column_is_named(tmp_path: Path) -> None:
    t = pa.table({"y": ["1", "x", "0"], "price": [1.5, None, 2.0], "tag": ["a", "b", None]})
    p = tmp_path / "f.parquet"
    pq.write_table(t, p)
    schema = CsvSchema(label="y", dense=["price"], categorical=[CategoricalColumn("tag")])
    cfg = DataConfig(kind=DataKind.PARQUET, path=[str(p)], csv=schema, batch_size=8,
                     prefetch_batches=0)
    src = build_source(cfg, "train", seed=0, epochs=1)
    rows = sum(b.batch_size for b in src)
    assert rows == 2 and src.stats()["rows_skipped"] == {"bad_label": 1}
    src.close()
    bad = CsvSchema(label="y", dense=["cost"], categorical=[CategoricalColumn("tag")])
    with pytest.raises(DataError, match=r"column\(s\) \['cost'\] not in"):
        list(build_source(DataConfig(kind=DataKind.PARQUET, path=[str(p)], csv=bad,
                                     prefetch_batches=0), "train", seed=0, epochs=1))

"""The validation split: rows held out of the train files by the same row hash as the
eval split (the three splits partition the rows), validation files of their own, the
synthetic validation stream, and the errors of a split that is not there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from terarec.config import (
    CategoricalColumn,
    ConfigError,
    CsvSchema,
    DataConfig,
    DataKind,
    SyntheticConfig,
    config_from_dict,
)
from terarec.data import DataError, build_source, check_eval_data
from terarec.data.files import row_coin


def write_csv(path: Path, n: int) -> None:
    """Rows whose dense value is their row number: each row is findable."""
    path.write_text("click,row,id\n" + "".join(f"{i % 2},{i},k{i % 7}\n" for i in range(n)))


def csv_cfg(path: Path, **kw: object) -> DataConfig:
    return DataConfig(kind=DataKind.CSV, path=[str(path)], batch_size=64, eval_batch_size=64,
                      prefetch_batches=0, csv=CsvSchema(label="click", dense=["row"],
                                                        categorical=[CategoricalColumn("id")]),
                      **kw)


def rows_of(cfg: DataConfig, split: str) -> list[int]:
    src = build_source(cfg, split, seed=0, epochs=1)
    try:
        return sorted(int(v) for b in src for v in b.dense[:, 0].tolist())
    finally:
        src.close()


def test_fractions_partition_the_rows_by_row_hash(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    write_csv(p, 2000)
    cfg = csv_cfg(p, eval_fraction=0.1, valid_fraction=0.2)
    train, ev, valid = (rows_of(cfg, s) for s in ("train", "eval", "valid"))
    assert sorted(train + ev + valid) == list(range(2000))  # each row in one split
    u = row_coin(str(p), np.arange(2000))
    assert ev == np.flatnonzero(u < 0.1).tolist()
    assert valid == np.flatnonzero((u >= 0.1) & (u < 0.3)).tolist()
    assert 300 < len(valid) < 500 and 120 < len(ev) < 280
    # the eval rows do not move when a validation share is added
    assert rows_of(csv_cfg(p, eval_fraction=0.1), "eval") == ev


def test_valid_files_of_their_own(tmp_path: Path) -> None:
    p, v = tmp_path / "train.csv", tmp_path / "valid.csv"
    write_csv(p, 300)
    write_csv(v, 50)
    cfg = csv_cfg(p, eval_fraction=0.1, valid_path=[str(v)])
    assert rows_of(cfg, "valid") == list(range(50))
    assert len(rows_of(cfg, "train")) + len(rows_of(cfg, "eval")) == 300
    with pytest.raises(DataError, match="no validation data"):
        rows_of(csv_cfg(p, eval_fraction=0.1), "valid")
    # a bad validation file fails before training, naming it
    v.write_text("click,row,id\nnope,1,x\n")
    with pytest.raises(DataError, match=r"valid\.csv: valid data without one valid row"):
        check_eval_data(cfg, 0)


def test_synthetic_validation_stream() -> None:
    syn = SyntheticConfig(num_dense=2, num_sparse=2, vocab_size=50, eval_samples=300,
                          valid_samples=200)
    cfg = DataConfig(kind=DataKind.SYNTHETIC, synthetic=syn, eval_batch_size=128,
                     prefetch_batches=0)
    valid = list(build_source(cfg, "valid", seed=3))
    ev = list(build_source(cfg, "eval", seed=3))
    assert sum(b.batch_size for b in valid) == 200 and sum(b.batch_size for b in ev) == 300
    assert not np.array_equal(valid[0].dense.numpy(), ev[0].dense[:128].numpy())
    again = list(build_source(cfg, "valid", seed=3))  # a fixed set, as eval's
    assert all(np.array_equal(a.dense.numpy(), b.dense.numpy()) for a, b in zip(valid, again))
    none = DataConfig(kind=DataKind.SYNTHETIC, synthetic=SyntheticConfig(), prefetch_batches=0)
    with pytest.raises(DataError, match="synthetic.valid_samples"):
        build_source(none, "valid", seed=0)


@pytest.mark.parametrize("data, message", [
    ({"eval_fraction": 0.6, "valid_fraction": 0.5}, "must be < 1"),
    ({"valid_fraction": 0.1, "valid_path": ["v.csv"]}, "not both"),
])
def test_validation_config_errors(data: dict, message: str) -> None:
    raw = {"name": "t", "tables": [{"name": "s", "dim": 4}],
           "data": {"kind": "csv", "path": ["x.csv"],
                    "csv": {"label": "click", "categorical": [{"column": "id"}]}, **data}}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, "<t>")


def test_preprocess_refuses_a_validation_split_it_would_put_in_train(tmp_path: Path) -> None:
    from terarec.data.preprocess import preprocess

    p = tmp_path / "d.csv"
    write_csv(p, 20)
    with pytest.raises(DataError, match="preprocess writes a train and an eval split only"):
        preprocess(csv_cfg(p, valid_fraction=0.2), tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out" / "train").exists()

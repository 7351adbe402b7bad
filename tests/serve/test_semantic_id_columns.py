"""Semantic ids from a CSV column (``semantic_id: true``): parsed into prefix keys like
the synthetic ads', bad cells counted, preprocessed data keeps the marking, and an
exported bundle keys request tokens exactly as training keyed the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from serve_helpers import trained

from terarec.config import (
    CategoricalColumn,
    ConfigError,
    CsvSchema,
    DataConfig,
    DataKind,
    config_from_dict,
)
from terarec.data import build_source, semantic_id_features
from terarec.data.keys import semantic_id_keys, str_key
from terarec.data.preprocess import preprocess
from terarec.serve.export import export_bundle
from terarec.serve.scorer import Request, Scorer
from terarec.trainer.checkpoint import load_checkpoint
from terarec.trainer.loop import build_components

SCHEMA = {"label": "click", "dense": ["price"],
          "categorical": [{"column": "user"}, {"column": "ad"},
                          {"column": "sid", "sep": "/", "semantic_id": True, "levels": 3}]}


def sid_keys(cells: list[list[int]]) -> list[int]:
    """The reference keys: each cell's tokens keyed by prefix."""
    flat = np.array([t for c in cells for t in c], dtype=np.int64)
    return semantic_id_keys(flat, np.array([len(c) for c in cells]), "sid").tolist()


def csv_cfg(path: Path, **kw: object) -> DataConfig:
    return DataConfig(kind=DataKind.CSV, path=[str(path)], batch_size=100,
                      prefetch_batches=0, csv=CsvSchema(
                          label="click", dense=["price"],
                          categorical=[CategoricalColumn("user"), CategoricalColumn("ad"),
                                       CategoricalColumn("sid", sep="/", semantic_id=True,
                                                         levels=3)]), **kw)


def test_csv_semantic_id_column_keys_prefixes_and_counts_bad_cells(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("click,price,user,ad,sid\n"
                 "1,1.0,u1,a1,3/1/4\n"
                 "0,2.0,u2,a2,3/1\n"        # a shorter path: fine
                 "1,3.0,u3,a3,\n"           # missing
                 "0,4.0,u4,a4,3/x/4\n"      # not an integer
                 "0,5.0,u5,a5,3/-1/4\n"     # negative
                 "0,6.0,u6,a6,3//4\n"       # empty token
                 "1,7.0,u7,a7,3/1/4/1\n"    # more than levels
                 "1,8.0,u8,a8,9223372036854775808\n"  # 2^63: beyond int64
                 "0,9.0,u9,a9,7/0/9223372036854775807\n")
    cfg = csv_cfg(p)
    assert semantic_id_features(cfg) == {"sid": 3}
    src = build_source(cfg, "train", seed=0, epochs=1)
    (b,) = list(src)
    assert src.stats()["rows_skipped"] == {"bad_categorical": 5}
    assert b.dense[:, 0].tolist() == [1.0, 2.0, 3.0, 9.0]
    assert b.sparse["sid"].lengths().tolist() == [3, 2, 0, 3]
    assert b.sparse["sid"].values().tolist() == sid_keys(
        [[3, 1, 4], [3, 1], [7, 0, 2**63 - 1]])
    # shared prefixes share keys: "3/1/4" and "3/1" agree on their first two
    v = b.sparse["sid"].values().tolist()
    assert v[:2] == v[3:5] and v[2] != v[5]
    assert b.sparse["ad"].values().tolist() == [str_key(a, "ad") for a in ("a1", "a2", "a3", "a9")]


@pytest.mark.parametrize("column, message", [
    ({"column": "sid", "semantic_id": True, "levels": 3}, "sep: a semantic_id column needs"),
    ({"column": "sid", "sep": "/", "semantic_id": True}, "levels: a semantic_id column needs"),
    ({"column": "tags", "sep": "|", "levels": 2}, "levels: only for semantic_id"),
])
def test_csv_semantic_id_column_config_errors(column: dict, message: str) -> None:
    raw = {"name": "t", "tables": [{"name": "s", "dim": 4}],
           "data": {"kind": "csv", "path": ["x.csv"],
                    "csv": {"label": "click", "categorical": [column]}}}
    with pytest.raises(ConfigError, match=f"<t>.*categorical.*{message}"):
        config_from_dict(raw, "<t>")


def test_preprocessed_csv_keeps_its_semantic_id_features(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("click,price,user,ad,sid\n1,1.0,u1,a1,3/1/4\n0,2.0,u2,a2,5/2\n")
    out = tmp_path / "pre"
    preprocess(csv_cfg(p), out, workers=1, show_progress=False)
    cfg = DataConfig(kind=DataKind.COLUMNAR, path=[str(out / "train")], batch_size=100,
                     prefetch_batches=0)
    assert semantic_id_features(cfg) == {"sid": 3}
    (b,) = list(build_source(cfg, "train", seed=0, epochs=1))
    assert b.sparse["sid"].values().tolist() == sid_keys([[3, 1, 4], [5, 2]])


def write_ads_csv(path: Path, n: int, seed: int) -> None:
    """Rows whose click depends on the user and on the ad's semantic-id path."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 50, n)
    tok = rng.integers(0, 4, (n, 3))
    logit = 0.8 * np.sin(user) + 1.2 * (tok[:, 0] - 1.5) / 1.5 + 0.5 * (tok[:, 1] == 2)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    with open(path, "w") as f:
        f.write("click,price,user,ad,sid\n")
        for i in range(n):
            ad = f"ad{tok[i, 0]}{tok[i, 1]}{tok[i, 2]}"
            f.write(f"{click[i]},{rng.random():.3f},u{user[i]},{ad},"
                    f"{tok[i, 0]}/{tok[i, 1]}/{tok[i, 2]}\n")


@pytest.mark.numerics
def test_bundle_of_a_csv_model_keys_request_tokens_like_the_file(tmp_path: Path) -> None:
    """A model trained on a CSV with a semantic-id column: the bundle's manifest lists
    it, and a request sending the tokens scores as the training model does on the
    file's rows (fp32 bundle: within a few float32 ulps of the probability)."""
    train_csv, eval_csv = tmp_path / "train.csv", tmp_path / "eval.csv"
    write_ads_csv(train_csv, 3000, 0)
    write_ads_csv(eval_csv, 64, 1)
    data = {"kind": "csv", "path": [str(train_csv)], "eval_path": [str(eval_csv)],
            "batch_size": 64, "eval_batch_size": 64, "csv": SCHEMA}
    model = {"user_features": ["user"], "user_dense": True}
    cfg, run = trained(tmp_path, data=data, model=model, train={"steps": 40})
    manifest = export_bundle(run / "checkpoint", tmp_path / "b")
    assert manifest["features"]["semantic_ids"] == {"sid": 3}
    assert manifest["features"]["candidate"] == ["ad", "sid"]
    parts = build_components(cfg)
    load_checkpoint(run / "checkpoint", parts)
    parts.model.eval()
    (batch,) = list(build_source(cfg.data, "eval", seed=cfg.seed))
    with torch.no_grad():
        want = torch.sigmoid(parts.model(batch.dense, batch.sparse))
    lines = eval_csv.read_text().splitlines()[1:]
    scorer = Scorer.from_bundle(tmp_path / "b")
    try:
        for i in range(0, 64, 7):  # each row its own request of one candidate
            _, price, user, ad, sid = lines[i].split(",")
            got = scorer.score(Request(
                user={"user": user}, dense=[float(price)],
                candidates={"ad": [ad], "sid": [[int(t) for t in sid.split("/")]]})).scores
            assert abs(float(got[0]) - float(want[i])) <= 1e-5
    finally:
        scorer.close()

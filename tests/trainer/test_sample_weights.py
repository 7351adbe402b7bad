"""Sample weights: a CSV weight column reaches the loss (the mean of weight x loss), bad
weights are counted skips, and data formats that cannot carry them say so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from terarec.config import config_from_dict
from terarec.data import DataError, build_source
from terarec.data.preprocess import preprocess
from terarec.trainer.checkpoint import load_checkpoint
from terarec.trainer.loop import build_components, train
from terarec.trainer.pipeline import ctr_loss
from tests.numerics import assert_close, train_tol


def write(path: Path, n: int, weight: str | None) -> None:
    rng = np.random.default_rng(0)
    head = "click,x,u,a" + (",w" if weight is not None else "")
    lines = [head]
    for _ in range(n):
        u, a = rng.integers(0, 30), rng.integers(0, 10)
        click = int(rng.random() < 1 / (1 + np.exp(-(np.sin(u) + 0.3 * a - 1.5))))
        row = f"{click},{rng.random():.3f},u{u},a{a}"
        lines.append(row + (f",{weight}" if weight is not None else ""))
    path.write_text("\n".join(lines) + "\n")


def cfg_for(tmp: Path, name: str, data: Path, lr: float, weighted: bool):
    csv = {"label": "click", "dense": ["x"], "categorical": [{"column": "u"}, {"column": "a"}]}
    if weighted:
        csv["weight"] = "w"
    return config_from_dict({
        "name": name, "seed": 0,
        "data": {"kind": "csv", "path": [str(data)], "eval_fraction": 0.2, "batch_size": 32,
                 "prefetch_batches": 0, "csv": csv},
        "tables": [{"name": "t", "dim": 4, "init": {"kind": "normal", "scale": 0.1}}],
        "model": {"kind": "dlrm", "bottom_mlp": [4], "top_mlp": [8]},
        "optimizer": {"sparse": {"kind": "sgd", "lr": lr}, "dense": {"kind": "sgd", "lr": lr}},
        "train": {"steps": 20, "log_every": 10, "device": "cpu", "threads": 1,
                  "progress": False, "tensorboard": False, "runs_dir": str(tmp / "runs")},
    }, "<w>")


def test_weighted_loss_is_the_mean_of_weight_times_loss() -> None:
    logits, labels = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.0, 0.0])
    w = torch.tensor([2.0, 0.0, 0.5])
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    assert torch.allclose(ctr_loss(logits, labels, w), (w * per).mean())
    assert torch.equal(ctr_loss(logits, labels), per.mean())


@pytest.mark.numerics
def test_weight_two_trains_as_twice_the_learning_rate(tmp_path: Path) -> None:
    """SGD on loss x 2 moves every weight as SGD with lr x 2: the same model."""
    (tmp_path / "p").mkdir()
    (tmp_path / "w").mkdir()
    # one file name: the eval rows are drawn by a hash of the name and the row
    plain, doubled = tmp_path / "p" / "d.csv", tmp_path / "w" / "d.csv"
    write(plain, 800, None)
    write(doubled, 800, "2.0")
    a = cfg_for(tmp_path, "a", plain, 0.1, weighted=False)
    b = cfg_for(tmp_path, "b", doubled, 0.05, weighted=True)
    train(a)
    train(b)
    pa, pb = build_components(a), build_components(b)
    load_checkpoint(tmp_path / "runs" / "a" / "checkpoint", pa)
    load_checkpoint(tmp_path / "runs" / "b" / "checkpoint", pb)
    tol = train_tol(0.1, 20, terms=32, magnitude=1.0, grad=10.0)
    for (n, x), (_, y) in zip(pa.model.state_dict().items(), pb.model.state_dict().items()):
        if x.dtype.is_floating_point:
            assert_close(y, x, tol, n)
    ka, ra = pa.embedding.tables[0].export()
    kb, rb = pb.embedding.tables[0].export()
    ia, ib = torch.argsort(ka), torch.argsort(kb)
    assert torch.equal(ka[ia], kb[ib])
    assert_close(rb[ib][:, :4], ra[ia][:, :4], tol, "rows")


def test_bad_weights_are_counted_and_preprocess_refuses_weights(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("click,x,u,a,w\n1,0.1,u1,a1,1.5\n0,0.2,u2,a2,-1\n1,0.3,u3,a3,heavy\n"
                 "0,0.4,u4,a4,\n1,0.5,u5,a5,0\n")
    cfg = cfg_for(tmp_path, "c", p, 0.1, weighted=True)
    src = build_source(dataclasses.replace(cfg.data, eval_fraction=0.0), "train", seed=0,
                       epochs=1)
    batches = list(src)
    got = torch.cat([b.weights for b in batches]).tolist()
    assert sorted(got) == [0.0, 1.5]  # -1, "heavy" and a missing weight are skipped
    assert src.stats()["rows_skipped"] == {"bad_weight": 3}
    with pytest.raises(DataError, match="csv.weight: the preprocessed format"):
        preprocess(cfg.data, tmp_path / "out", show_progress=False)

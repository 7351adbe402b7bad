"""Multi-task heads: a synthetic stream with click and conversion labels, CSV label
columns, the summed per-task loss, one head per task in every model, per-task metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import ConfigError, SyntheticConfig, config_from_dict
from terarec.data import DataError, build_source, task_names
from terarec.data.preprocess import preprocess
from terarec.data.synthetic import SyntheticGenerator
from terarec.models.factory import build_model
from terarec.trainer.loop import train
from terarec.trainer.metrics import auc_of
from terarec.trainer.pipeline import ctr_loss
from terarec.trainer.summary import describe_final

TWO = {"data": {"synthetic": {"tasks": 2}}}


def test_conversion_stream_keeps_the_click_stream_and_follows_clicks() -> None:
    cfg = SyntheticConfig(num_sparse=6, vocab_size=500)
    two = SyntheticConfig(num_sparse=6, vocab_size=500, tasks=2)
    one = SyntheticGenerator(cfg, 0).rows(np.random.default_rng(3), 20_000)
    both = SyntheticGenerator(two, 0).rows(np.random.default_rng(3), 20_000)
    assert both.labels.shape == (20_000, 2) and both.teacher.shape == (20_000, 2)
    np.testing.assert_array_equal(both.labels[:, 0], one.labels)  # the opt-in adds a task
    np.testing.assert_array_equal(both.teacher[:, 0], one.teacher)
    assert (both.labels[:, 1] <= both.labels[:, 0]).all()  # a conversion follows a click
    assert (both.teacher[:, 1] <= both.teacher[:, 0]).all()
    assert 0 < both.labels[:, 1].sum() < both.labels[:, 0].sum()
    # the planted P(conversion) ranks conversions well: there is something to learn
    assert auc_of(both.teacher[:, 1], both.labels[:, 1]) > 0.75


def test_task_names_of_each_source(tmp_path: Path) -> None:
    base = {"name": "t", "tables": [{"name": "t", "dim": 4}]}
    syn = config_from_dict({**base, "data": {"synthetic": {"tasks": 2}}})
    assert task_names(syn.data) == ["click", "conversion"]
    assert task_names(config_from_dict(base).data) == ["click"]
    csv = config_from_dict({**base, "data": {"kind": "csv", "path": ["x.csv"], "csv": {
        "label": "clk", "extra_labels": ["buy"], "categorical": [{"column": "u"}]}}})
    assert task_names(csv.data) == ["clk", "buy"]


def test_multi_task_loss_sums_each_tasks_weighted_mean() -> None:
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.3], [-0.2, 0.1]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    w = torch.tensor([2.0, 0.0, 0.5])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    per = [bce(logits[:, t], labels[:, t], weight=w) for t in range(2)]
    torch.testing.assert_close(ctr_loss(logits, labels, w), per[0] + per[1])
    torch.testing.assert_close(ctr_loss(logits, labels, w, [1.0, 3.0]), per[0] + 3 * per[1])
    unweighted = [bce(logits[:, t], labels[:, t]) for t in range(2)]
    torch.testing.assert_close(ctr_loss(logits, labels), unweighted[0] + unweighted[1])
    one = bce(logits[:, 0], labels[:, 0])  # one task: its weight scales the loss
    torch.testing.assert_close(ctr_loss(logits[:, 0], labels[:, 0], None, [2.0]), 2 * one)


class _Pool(torch.nn.Module):
    """Sum-pools every feature with one fixed random table (a stand-in embedding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.table = torch.nn.EmbeddingBag(50, dim, mode="sum", include_last_offset=True)

    def forward(self, kjt: KeyedJaggedTensor):  # noqa: ANN201 - a KeyedTensor
        from torchrec.sparse.jagged_tensor import KeyedTensor

        pooled = [self.table(kjt[f].values(), kjt[f].offsets()) for f in kjt.keys()]
        return KeyedTensor(kjt.keys(), [p.shape[1] for p in pooled], torch.cat(pooled, 1))


@pytest.mark.parametrize("kind", ["dlrm", "dcn", "deepfm", "wide_deep"])
def test_every_model_has_one_head_per_task(kind: str) -> None:
    cfg = config_from_dict({"name": "m", "tables": [{"name": "t", "dim": 8}],
                            "model": {"kind": kind, "bottom_mlp": [8], "top_mlp": [6]}}).model
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b"], torch.arange(10) % 50, torch.tensor([1, 2, 2, 1, 2, 2]))
    dense = torch.randn(3, 2)
    torch.manual_seed(0)
    m1 = build_model(cfg, _Pool(8), ["a", "b"], [8, 8], 2)
    m3 = build_model(cfg, _Pool(8), ["a", "b"], [8, 8], 2, num_tasks=3)
    assert m1(dense, kjt).shape == (3,)
    out = m3(dense, kjt)
    assert out.shape == (3, 3)
    # each task learns on its own head: a task's loss moves no other task's head
    out[:, 1].sum().backward()
    towers = [p for n, p in m3.named_parameters() if ".towers.0." in n]
    assert towers and all(p.grad is None or not p.grad.any() for p in towers)


def test_task_weights_must_match_the_data(tmp_path: Path, tiny_config) -> None:
    with pytest.raises(ConfigError, match="task_weights: 3 weights for 2 task"):
        train(tiny_config(**TWO, model={"task_weights": [1.0, 1.0, 1.0]}))


def test_two_task_run_learns_both_and_reports_each(tmp_path: Path, tiny_config) -> None:
    """Click and conversion from one shared-bottom model: each task's AUC is reported,
    well above chance and below its planted oracle; the unprefixed metrics are the
    first task's (model selection follows them)."""
    cfg = tiny_config(**TWO, train={"steps": 200, "eval_every": 100})
    summary = train(cfg)
    ev = summary["final_eval"]
    for task in ("click", "conversion"):
        assert 0.65 < ev[f"{task}_auc"] < ev[f"{task}_oracle_auc"], (task, ev)
        assert ev[f"{task}_logloss"] > 0
    assert ev["auc"] == ev["click_auc"] and ev["logloss"] == ev["click_logloss"]
    assert ev["conversion_ctr"] < ev["click_ctr"]
    text = describe_final(summary, cfg)
    assert f"task conversion: AUC {ev['conversion_auc']:.4f}" in text


def write_two_label_csv(path: Path, rows: list[str]) -> None:
    path.write_text("clk,buy,x,u\n" + "\n".join(rows) + "\n")


def test_csv_extra_label_columns(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    write_two_label_csv(f, ["1,0,0.5,a", "1,1,0.1,b", "0,0,0.2,c", "0,x,0.3,d", "1,2,0.1,e"])
    csv = {"label": "clk", "extra_labels": ["buy"], "dense": ["x"],
           "categorical": [{"column": "u"}]}
    cfg = config_from_dict({"name": "c", "tables": [{"name": "t", "dim": 4}], "data": {
        "kind": "csv", "path": [str(f)], "batch_size": 8, "csv": csv,
        "log_bad_rows": 0}})
    src = build_source(cfg.data, "train", seed=0, epochs=1)
    labels = torch.cat([b.labels for b in src])
    got = sorted(map(tuple, labels.tolist()))
    assert got == [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]
    assert src.stats()["rows_skipped"] == {"bad_label": 2}  # "x", 2 (outside [0, 1])
    with pytest.raises(DataError, match="extra_labels: the preprocessed format"):
        preprocess(cfg.data, tmp_path / "pre", show_progress=False)

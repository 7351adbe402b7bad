"""A model trained from the preprocessed data equals the one trained from the text.

Same rows, same order, same batches: the loss curve, every embedding row (with its Adam
state) and every dense weight are bitwise equal on CPU, and so is the final eval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from terarec.config import DataConfig, DataKind, DenseTransform, config_from_dict
from terarec.data.criteo_writer import write_criteo
from terarec.data.preprocess import preprocess
from terarec.trainer.checkpoint import read_tables
from terarec.trainer.loop import train


def run(tmp: Path, name: str, data: dict[str, Any]) -> dict[str, Any]:
    cfg = config_from_dict({
        "name": name, "seed": 3,
        "data": {"batch_size": 48, "eval_batch_size": 96, "prefetch_batches": 2, **data},
        "tables": [{"name": "sparse", "dim": 8, "features": None,
                    "init": {"kind": "uniform", "scale": 0.05}}],
        "model": {"kind": "dlrm", "bottom_mlp": [16, 8], "top_mlp": [16]},
        "optimizer": {"sparse": {"kind": "adam", "lr": 0.05},
                      "dense": {"kind": "adam", "lr": 0.01}},
        "train": {"epochs": 2, "log_every": 1, "device": "cpu", "threads": 1,
                  "progress": False, "runs_dir": str(tmp / "runs")},
    }, "<test>")
    summary = train(cfg)
    run_dir = tmp / "runs" / name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "summary": summary,
        "losses": [r["loss"] for r in lines if r.get("split") == "train"],
        "tables": read_tables(run_dir / "checkpoint"),
        "dense": torch.load(run_dir / "checkpoint" / "dense.pt", weights_only=True)["model"],
    }


def test_training_from_preprocessed_data_is_bitwise_the_text_run(tmp_path: Path) -> None:
    tsv = write_criteo(tmp_path / "train.tsv", 700, seed=1)
    with open(tsv, "a") as f:
        f.write("1\tnot-a-number\n\n")  # skipped by both paths alike
    text = {"kind": "criteo", "path": [str(tsv)], "eval_fraction": 0.2,
            "dense_transform": "log1p"}
    out = tmp_path / "prep"
    preprocess(DataConfig(kind=DataKind.CRITEO, path=[str(tsv)], eval_fraction=0.2,
                          dense_transform=DenseTransform.LOG1P),
               out, chunk_rows=100, show_progress=False)
    a = run(tmp_path, "text", text)
    b = run(tmp_path, "columnar", {"kind": "columnar", "path": [str(out / "train")],
                                   "eval_path": [str(out / "eval")], "read_workers": 2})
    assert len(a["losses"]) == len(b["losses"]) > 20
    assert a["losses"] == b["losses"]
    assert a["summary"]["final_eval"]["auc"] == b["summary"]["final_eval"]["auc"]
    for name, t in a["tables"].items():
        assert torch.equal(t["keys"], b["tables"][name]["keys"])
        assert torch.equal(t["rows"], b["tables"][name]["rows"])
    assert a["dense"].keys() == b["dense"].keys()
    for k, v in a["dense"].items():
        assert torch.equal(v, b["dense"][k]), k

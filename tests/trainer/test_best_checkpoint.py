"""Model selection on the validation split: the periodic evals score it, the best
checkpoint is kept (also past keep_checkpoints) and scored on the test split at the
end, early stopping ends the run after N evals without improvement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from terarec.config import ConfigError
from terarec.trainer.checkpoint import load_checkpoint
from terarec.trainer.evaluate import run_eval
from terarec.trainer.loop import build_components, train
from terarec.trainer.report import read_jsonl

VALID = {"synthetic": {"valid_samples": 2048}}


def lines(run: Path, split: str) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == split]


def test_best_checkpoint_is_kept_and_scored_on_the_test_split(tiny_config) -> None:
    cfg = tiny_config(name="best", data=VALID, train={
        "steps": 60, "eval_every": 10, "keep_best": "logloss", "keep_checkpoints": 1})
    summary = train(cfg)
    run = Path(cfg.train.runs_dir) / "best"
    valid = lines(run, "valid")
    assert [r["step"] for r in valid] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in lines(run, "eval")] == [60]  # the test split: at the end
    want = min(valid, key=lambda r: r["logloss"])
    best = json.loads((run / "best.json").read_text())
    assert (best["step"], best["metric"]) == (want["step"], "logloss")
    assert best["value"] == pytest.approx(want["logloss"], rel=1e-12)
    assert summary["best"]["step"] == want["step"]
    # the best checkpoint outlives keep_checkpoints: 1, and scores on the test split
    # what the summary says
    path = Path(summary["best"]["checkpoint"])
    if want["step"] != 60:
        assert path == run / "checkpoints" / f"step{want['step']}"
    parts = build_components(cfg)
    assert load_checkpoint(path, parts) == want["step"]
    assert run_eval(cfg, parts) == summary["best"]["test"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == (
        [] if want["step"] == 60 else [f"step{want['step']}"])


def test_early_stopping_ends_after_patience_evals_without_improvement(tiny_config) -> None:
    """A learning rate that overfits the tiny vocabulary: validation AUC peaks early."""
    cfg = tiny_config(name="early", data=VALID, optimizer={"sparse": {"kind": "adam",
                                                                      "lr": 0.5}},
                      train={"steps": 400, "eval_every": 10, "keep_best": "auc",
                             "early_stopping": 2})
    summary = train(cfg)
    run = Path(cfg.train.runs_dir) / "early"
    valid = lines(run, "valid")
    aucs = [r["auc"] for r in valid]
    best_at = max(range(len(aucs)), key=lambda i: (aucs[i], -i))  # the first best
    assert summary["stopped_by"] == "early_stopping"
    assert len(valid) == best_at + 3  # the best, then two evals without improvement
    assert summary["steps"] == valid[-1]["step"]
    assert summary["best"]["step"] == valid[best_at]["step"]


def test_keep_best_needs_a_validation_split(tiny_config) -> None:
    cfg = tiny_config(name="nov", train={"eval_every": 10, "keep_best": "auc"})
    with pytest.raises(ConfigError, match="needs a validation split"):
        train(cfg)
    assert not (Path(cfg.train.runs_dir) / "nov").exists()


def test_a_resumed_run_keeps_choosing_the_same_best(tiny_config) -> None:
    """Resumed from step 20 of a finished run, the run replays steps 21-60 bit for bit:
    the best of the abandoned future is dropped and found again, the same."""
    cfg = tiny_config(name="rb", data=VALID, train={
        "steps": 60, "eval_every": 10, "checkpoint_every": 10, "keep_checkpoints": 10,
        "keep_best": "logloss"})
    first = train(cfg)
    run = Path(cfg.train.runs_dir) / "rb"
    best = json.loads((run / "best.json").read_text())
    again = train(cfg, resume=run / "checkpoints" / "step20")
    assert json.loads((run / "best.json").read_text())["step"] == best["step"]
    assert again["best"]["test"] == first["best"]["test"]
    assert [r["step"] for r in lines(run, "valid")] == [10, 20, 30, 40, 50, 60]


def test_a_new_run_under_an_old_name_replaces_its_checkpoints_and_best(tiny_config) -> None:
    """The earlier run's checkpoints (and best) are gone at the new run's first save:
    its later steps must not outrank the new run's checkpoints when they are pruned."""
    common = {"eval_every": 10, "keep_best": "logloss", "checkpoint_every": 10,
              "keep_checkpoints": 2}
    train(tiny_config(name="again", data=VALID, train={**common, "steps": 60}))
    cfg = tiny_config(name="again", data=VALID, train={**common, "steps": 30})
    summary = train(cfg)
    run = Path(cfg.train.runs_dir) / "again"
    steps = sorted(json.loads((p / "manifest.json").read_text())["step"]
                   for p in [run / "checkpoint", *(run / "checkpoints").iterdir()])
    assert max(steps) == 30 and all(s <= 30 for s in steps)
    assert json.loads((run / "best.json").read_text())["step"] == summary["best"]["step"] <= 30

"""TensorBoard event files beside metrics.jsonl: read back with TensorBoard's own reader,
the same numbers; a resumed run's events are logged once; curves.png draws train AUC
and tier hit rates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from terarec.trainer.loop import train
from terarec.trainer.report import read_jsonl


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's events: ``[(step, value)]`` as TensorBoard reads
    them (purged events left out)."""
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def logged(run: Path, split: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` in the run's metrics.jsonl lines of ``split``, as
    float32 (TensorBoard stores scalars in float32)."""
    return [(r["step"], float(np.float32(r[key]))) for r in read_jsonl(run / "metrics.jsonl")
            if r["split"] == split and r.get(key) is not None]


def test_event_files_hold_the_logged_metrics(tiny_config) -> None:
    cfg = tiny_config(name="tb", train={"eval_every": 20},
                      tables=[{"name": "sparse", "dim": 8, "device_rows": 400}])
    train(cfg)
    run = Path(cfg.train.runs_dir) / "tb"
    tags = scalars(run)
    for split, key in [("train", "loss"), ("train", "auc"), ("train", "samples_per_s"),
                       ("eval", "auc"), ("eval", "logloss")]:
        assert tags[f"{split}/{key}"] == logged(run, split, key), (split, key)
    assert [s for s, _ in tags["train/loss"]] == [10, 20, 30, 40]
    assert [s for s, _ in tags["eval/auc"]] == [20, 40]
    # nested records are flattened: the tier figures of the train lines
    hit = [t for t in tags if t.startswith("train/tiers/sparse/") and t.endswith("_hit_rate")]
    assert hit
    assert (run / "curves.png").stat().st_size > 0


def test_a_resumed_run_logs_each_step_once(tiny_config) -> None:
    """A run that died after its step-20 checkpoint had logged steps 30 and 40; resumed
    from step 20 it logs them again, and TensorBoard reads each step once, with the
    resumed run's values (those of metrics.jsonl)."""
    cfg = tiny_config(name="tbr", train={"checkpoint_every": 20, "keep_checkpoints": 2})
    train(cfg)
    run = Path(cfg.train.runs_dir) / "tbr"
    train(cfg, resume=run / "checkpoints" / "step20")
    tags = scalars(run)
    assert [s for s, _ in tags["train/loss"]] == [10, 20, 30, 40]
    assert tags["train/loss"] == logged(run, "train", "loss")


def test_tensorboard_off_writes_no_events(tiny_config) -> None:
    cfg = tiny_config(name="notb", train={"tensorboard": False})
    train(cfg)
    run = Path(cfg.train.runs_dir) / "notb"
    assert (run / "metrics.jsonl").exists() and not (run / "tensorboard").exists()


def test_a_new_run_under_an_old_name_replaces_its_events(tiny_config) -> None:
    train(tiny_config(name="again", train={"steps": 40}))
    cfg = tiny_config(name="again", train={"steps": 20})
    train(cfg)
    tags = scalars(Path(cfg.train.runs_dir) / "again")
    assert [s for s, _ in tags["train/loss"]] == [10, 20]

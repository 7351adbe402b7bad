"""Learning-rate schedules: the factor by step, the rates a run's optimizers get, and a
resumed run that continues the schedule bit for bit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from terarec.config import ConfigError
from terarec.trainer.loop import train
from terarec.trainer.report import read_jsonl
from terarec.trainer.schedule import LRSchedule


def schedule(tiny_config, **s) -> LRSchedule:
    return LRSchedule(tiny_config(optimizer={"schedule": s}, train={"steps": 100}))


def test_factors(tiny_config) -> None:
    warm = schedule(tiny_config, warmup_steps=4, warmup_start=0.2)
    assert [warm.factor(t) for t in range(6)] == pytest.approx([0.4, 0.6, 0.8, 1, 1, 1])
    lin = schedule(tiny_config, warmup_steps=10, decay="linear", min_ratio=0.1)
    assert lin.decay_steps == 90  # the steps after warm-up
    assert lin.factor(10) == 1.0 and lin.factor(55) == pytest.approx(0.55)
    assert lin.factor(100) == pytest.approx(0.1) and lin.factor(500) == pytest.approx(0.1)
    cos = schedule(tiny_config, decay="cosine", decay_steps=40)
    assert cos.factor(20) == pytest.approx(0.5) and cos.factor(10) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4)))
    step = schedule(tiny_config, decay="step", step_every=30, gamma=0.5)
    assert [step.factor(t) for t in (0, 29, 30, 61)] == [1.0, 1.0, 0.5, 0.25]
    assert not schedule(tiny_config).active


def test_a_run_sets_both_rates_each_step(tiny_config, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """The dense optimizer's lr and every row optimizer's lr of each step, as the
    schedule says; logged in the train lines."""
    cfg = tiny_config(name="sched", optimizer={"schedule": {
        "warmup_steps": 10, "decay": "cosine"}}, train={"steps": 40})
    seen: list[tuple[float, float]] = []
    from terarec.trainer import pipeline

    real = pipeline.TrainPipeline.progress

    def spy(self, it):  # the rates in force when the step runs
        seen.append((self.optimizer.param_groups[0]["lr"],
                     self.embedding.groups[0].optimizer.lr))
        return real(self, it)

    monkeypatch.setattr(pipeline.TrainPipeline, "progress", spy)
    train(cfg)
    sched = LRSchedule(cfg)
    dense, sparse = cfg.optimizer.dense.lr, cfg.optimizer.sparse.lr
    want = [(dense * sched.factor(t), sparse * sched.factor(t)) for t in range(40)]
    assert seen[:40] == want
    logged = [r["lr"] for r in read_jsonl(Path(cfg.train.runs_dir) / "sched" / "metrics.jsonl")
              if r["split"] == "train"]
    assert logged == [want[t][0] for t in (9, 19, 29, 39)]


def test_a_resumed_run_continues_the_schedule(tiny_config) -> None:
    over = {"optimizer": {"schedule": {"warmup_steps": 8, "decay": "linear"}},
            "train": {"steps": 30, "checkpoint_every": 10, "keep_checkpoints": 5}}
    cfg = tiny_config(name="rs", **over)
    straight = train(cfg)
    run = Path(cfg.train.runs_dir) / "rs"
    resumed = train(cfg, resume=run / "checkpoints" / "step10")
    # every step after 10 ran with the rates of the straight run: the same model
    assert resumed["final_eval"] == straight["final_eval"]


def test_decay_without_a_length_is_a_config_error(tiny_config) -> None:
    cfg = tiny_config(name="bad", optimizer={"schedule": {"decay": "linear"}},
                      train={"steps": None, "epochs": 1, "max_minutes": 1})
    with pytest.raises(ConfigError, match="decay_steps: required"):
        train(cfg)
    assert not (Path(cfg.train.runs_dir) / "bad").exists()

"""One run per run directory at a time; a resume never mixes two runs' logs."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from terarec.config import Config, ConfigError
from terarec.trainer.loop import train
from terarec.trainer.report import read_jsonl
from terarec.trainer.rundir import RunDirInUse, owned

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_under_the_same_name_is_refused(
    tiny_config: Callable[..., Config]
) -> None:
    cfg = tiny_config(name="busy", train={"steps": 5, "save_checkpoint": False})
    run_dir = Path(cfg.train.runs_dir) / "busy"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match="another run is training there"):
            train(cfg)
        assert list(run_dir.iterdir()) == []  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()
    train(cfg)  # the holder is gone (killed: no stale lock) and the run goes ahead
    assert (run_dir / "summary.json").is_file()


def test_the_lock_is_released_after_a_run(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(name="again", train={"steps": 5, "save_checkpoint": False})
    train(cfg)
    with owned(Path(cfg.train.runs_dir) / "again"):  # free again
        pass


def test_resume_from_another_runs_checkpoint_into_an_existing_run_is_refused(
    tiny_config: Callable[..., Config]
) -> None:
    a = tiny_config(name="a", train={"steps": 10})
    train(a)
    b = tiny_config(name="b", train={"steps": 10})
    train(b)
    before = read_jsonl(Path(b.train.runs_dir) / "b" / "metrics.jsonl")
    ckpt_a = Path(a.train.runs_dir) / "a" / "checkpoint"
    with pytest.raises(ConfigError, match="another run's"):
        train(tiny_config(name="b", train={"steps": 20}), resume=ckpt_a)
    assert read_jsonl(Path(b.train.runs_dir) / "b" / "metrics.jsonl") == before  # untouched
    # into a new directory: a new run that starts from a's checkpoint
    forked = train(tiny_config(name="c", train={"steps": 20}), resume=ckpt_a)
    assert forked["steps"] == 20
    # and continuing a itself is a resume as before
    assert train(tiny_config(name="a", train={"steps": 20}), resume=ckpt_a)["steps"] == 20


def test_resuming_with_other_data_settings_warns(
    tiny_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    """Another seed, batch size or vocabulary on resume is allowed but said, each with
    the value trained with and the new one; an unchanged resume says nothing."""
    cfg = tiny_config(train={"steps": 10})
    train(cfg)
    ckpt = Path(cfg.train.runs_dir) / cfg.name / "checkpoint"
    with caplog.at_level(logging.WARNING, logger="terarec.trainer"):
        train(tiny_config(train={"steps": 12}), resume=ckpt)
    assert not [r for r in caplog.records if "other settings" in r.getMessage()]
    changed = tiny_config(seed=7, data={"batch_size": 32, "synthetic": {"vocab_size": 300}},
                          train={"steps": 14})
    with caplog.at_level(logging.WARNING, logger="terarec.trainer"):
        train(changed, resume=ckpt)
    said = [r.getMessage() for r in caplog.records if "other settings" in r.getMessage()]
    assert any("seed: 0 -> 7" in m for m in said), said
    assert any("data.batch_size: 64 -> 32" in m for m in said), said
    assert any("data.synthetic.vocab_size: 200 -> 300" in m for m in said), said

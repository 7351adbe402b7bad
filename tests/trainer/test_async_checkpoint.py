"""Checkpoints written on a background thread (``train.async_checkpoint``).

The loop takes each periodic checkpoint (caches written through, SSD tier snapshotted,
rows and dense state copied) and trains on while a thread writes it. What lands on disk
must be what a synchronous save of the same step writes, bit for bit, although the
state it was taken from has moved on meanwhile; a run resumed from it ends like a
straight run (``test_delta.py``: killed after a delta, and kill -9 during one); a
failed write stops the run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from test_delta import LAYOUTS, assert_same_end, dense_of, with_train
from test_loop import assert_same, comparable, tables_by_key

from terarec.config import Config, ConfigError
from terarec.trainer.checkpoint import CheckpointError, files, latest_valid
from terarec.trainer.loop import train
from terarec.trainer.report import read_jsonl

PERIODIC = {"checkpoint_every": 20, "delta_every": 5, "keep_checkpoints": 2}


def _saved(run: Path) -> dict[str, Path]:
    """Every checkpoint of a run by where it is: ``checkpoint``, ``checkpoints/step<N>``,
    ``deltas/step<N>``."""
    out = {"checkpoint": run / "checkpoint"}
    for sub in ("checkpoints", "deltas"):
        if (run / sub).is_dir():
            out.update({f"{sub}/{p.name}": p for p in (run / sub).iterdir()})
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["memory", "ssd", "ttl-ssd"])
def test_async_checkpoints_are_the_synchronous_ones(
    tiny_config: Callable[..., Config], layout: str
) -> None:
    over = with_train(LAYOUTS[layout], eval_every=20, log_every=5, **PERIODIC)
    runs = Path(tiny_config().train.runs_dir)
    sync = train(tiny_config(name="sync", **over))
    background = train(tiny_config(name="async", **with_train(over, async_checkpoint=True)))
    assert_same_end(runs / "sync", sync, runs / "async", background)
    a, b = _saved(runs / "sync"), _saved(runs / "async")
    assert a.keys() == b.keys() and len(a) >= 4
    for where in a:
        assert_same(tables_by_key(a[where]), tables_by_key(b[where]), where)
        assert_same(dense_of(a[where]), dense_of(b[where]), where)
        assert (a[where] / "data.json").read_text() == (b[where] / "data.json").read_text()
        if where.startswith("deltas"):
            assert_same(load_file(a[where] / "rows.safetensors"),
                        load_file(b[where] / "rows.safetensors"), where)
    saves = [r for r in read_jsonl(runs / "async" / "metrics.jsonl")
             if r["split"] == "checkpoint"]
    assert [r["step"] for r in saves] == [5, 10, 15, 20, 25, 30, 35]
    assert all(r["async"] and r["write_s"] >= 0 and r["pause_s"] >= 0 for r in saves)
    assert [r["kind"] for r in saves] == ["full", "delta", "delta", "full", "delta", "delta",
                                          "delta"]


def test_a_failed_background_write_stops_the_run(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up while the delta of step 10 is written: the run stops with the
    error once it sees the write failed, and the full checkpoint of step 5 is intact."""
    real = files.describe
    calls = {"n": 0}

    def full_disk(root: Path, names: list[str]) -> dict[str, Any]:
        if "deltas" in str(root):
            calls["n"] += 1
            raise OSError(28, "No space left on device")
        return real(root, names)

    monkeypatch.setattr(files, "describe", full_disk)
    # the first save (step 5) is a full one: a delta needs a parent
    cfg = tiny_config(name="full-disk", **with_train(
        LAYOUTS["ssd"], async_checkpoint=True, checkpoint_every=20, delta_every=5))
    with pytest.raises(CheckpointError, match="No space left on device"):
        train(cfg)
    assert calls["n"] == 1
    run = Path(cfg.train.runs_dir) / "full-disk"
    assert latest_valid(run) == run / "checkpoint"
    assert not (run / "deltas" / "step10").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")
            if r["split"] == "checkpoint"] == [5]
    assert comparable(read_jsonl(run / "metrics.jsonl"))  # the log up to the failure


def test_async_checkpoint_needs_checkpoints(tiny_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match="async_checkpoint: needs save_checkpoint"):
        tiny_config(train={"save_checkpoint": False, "async_checkpoint": True})

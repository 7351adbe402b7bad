"""Delta checkpoints: a chain full + deltas restores exactly, keep-last-K, damage, kill -9.

Every layout (rows in memory, tiered device + host, the SSD tier, admission, TTL) is
checked two ways: a delta's chain restores what a full checkpoint of the same step holds
(rows by key, dense state), and a run killed after a delta resumes from it to the same
end as a run never stopped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_loop import Killed, assert_same, comparable, kill_in_step, tables_by_key

from terarec.config import Config, ConfigError
from terarec.trainer.checkpoint import (
    CheckpointError,
    latest_valid,
    load_checkpoint,
    read_manifest,
    read_tables,
)
from terarec.trainer.checkpoint.delta import read_changes
from terarec.trainer.loop import build_components, train
from terarec.trainer.report import read_jsonl

SSD = {"path": "ssd", "block_cache_mb": 8, "write_buffer_mb": 4}
WIDE = {"synthetic": {"vocab_size": 2000}}  # thousands of rows: beyond every cache below
LAYOUTS: dict[str, dict[str, Any]] = {
    "memory": {},
    "tiered": {"tables": [{"name": "sparse", "dim": 8, "device_rows": 256}], "data": WIDE},
    "ssd": {"tables": [{"name": "sparse", "dim": 8, "device_rows": 256, "host_rows": 256}],
            "ssd": SSD, "data": WIDE},
    "admission": {
        "tables": [{"name": "sparse", "dim": 8,
                    "admission": {"min_count": 3, "width": 4096, "depth": 4}}],
        "data": WIDE,
    },
    "ttl": {"tables": [{"name": "sparse", "dim": 8, "ttl_steps": 6}], "data": WIDE},
    "ttl-ssd": {
        "tables": [{"name": "sparse", "dim": 8, "device_rows": 256, "host_rows": 256,
                    "ttl_steps": 6}],
        "ssd": SSD, "data": WIDE,
    },
}


def with_train(over: dict[str, Any], **train_keys: Any) -> dict[str, Any]:
    return {**over, "train": {**over.get("train", {}), **train_keys}}


def dense_of(ckpt: Path) -> Any:
    return torch.load(ckpt / "dense.pt", weights_only=True)


def assert_same_end(run_a: Path, sum_a: dict[str, Any], run_b: Path, sum_b: dict[str, Any]
                    ) -> None:
    """Two finished runs ended bit for bit alike: summary, rows, dense state, data
    position, and every metrics line (but the tier counters: a resumed run starts with
    cold caches)."""
    for key in ("steps", "samples", "final_eval", "auc", "rows", "stopped_by"):
        assert_same(sum_a[key], sum_b[key], key)
    a, b = run_a / "checkpoint", run_b / "checkpoint"
    assert_same(tables_by_key(a), tables_by_key(b), "tables")
    assert_same(dense_of(a), dense_of(b), "dense")
    assert (a / "data.json").read_text() == (b / "data.json").read_text()
    lines = [[{k: v for k, v in r.items() if k != "tiers"} for r in
              comparable(read_jsonl(run / "metrics.jsonl"))] for run in (run_a, run_b)]
    assert lines[0] == lines[1]


@pytest.mark.numerics
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_delta_chain_restores_what_a_full_checkpoint_of_its_step_holds(
    tiny_config: Callable[..., Config], layout: str
) -> None:
    """Run ``fulls`` saves a full checkpoint every 5 steps (all kept), run ``deltas`` a
    full one every 20 and deltas between: the chain full@20 + deltas 25..35 holds, by
    key, the rows, optimizer state and dense state of full@35. With TTL this needs the
    deletions (rows expired since the parent); the two runs also train alike, so the
    sweeps a delta save makes change nothing."""
    over = LAYOUTS[layout]
    train(tiny_config(name="fulls", **with_train(over, checkpoint_every=5, keep_checkpoints=10)))
    train(tiny_config(name="deltas", **with_train(over, checkpoint_every=20, delta_every=5,
                                                  keep_checkpoints=2)))
    runs = Path(tiny_config().train.runs_dir)
    full, delta = runs / "fulls" / "checkpoints" / "step35", runs / "deltas" / "deltas" / "step35"
    manifest = read_manifest(delta, verify=True)
    assert manifest["kind"] == "delta" and manifest["parent"]["step"] == 30
    assert manifest["base"]["step"] == 20 and "tables.pt" in manifest["files"]
    assert_same(tables_by_key(full), tables_by_key(delta), "tables")
    assert_same(dense_of(full), dense_of(delta), "dense")
    if layout.startswith("ttl"):  # some rows expired between two saves: deletions
        deleted = sum(read_changes(runs / "deltas" / "deltas" / f"step{s}")["sparse"]
                      ["deleted"].numel() for s in (25, 30, 35))
        assert deleted > 0
    # and the two whole runs ended alike
    assert_same(tables_by_key(runs / "fulls" / "checkpoint"),
                tables_by_key(runs / "deltas" / "checkpoint"), "final tables")


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["memory", "tiered", "ssd", "admission", "ssd-async"])
def test_a_run_killed_after_a_delta_resumes_exactly_from_it(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """``-async``: the deltas written on the background thread; the run dies while
    one may still be in flight, which lands before the error leaves the run."""
    over = with_train(LAYOUTS[layout.removesuffix("-async")], eval_every=20, log_every=5)
    straight = train(tiny_config(name="straight", **over))
    periodic = with_train(over, checkpoint_every=20, delta_every=5,
                          async_checkpoint=layout.endswith("-async"))
    kill_in_step(monkeypatch, 34)  # 33 steps done; the newest checkpoint: the delta of 30
    with pytest.raises(Killed):
        train(tiny_config(name="killed", **periodic))
    monkeypatch.undo()
    runs = Path(tiny_config().train.runs_dir)
    newest = latest_valid(runs / "killed")
    assert newest == runs / "killed" / "deltas" / "step30"
    resumed = train(tiny_config(name="killed", **periodic), resume=newest)
    assert_same_end(runs / "straight", straight, runs / "killed", resumed)


def test_keep_checkpoints_keeps_the_last_fulls_and_their_deltas(
    tiny_config: Callable[..., Config],
) -> None:
    over = with_train(LAYOUTS["ssd"], checkpoint_every=10, delta_every=5, keep_checkpoints=2)
    cfg = tiny_config(name="kept", **over)
    train(cfg)
    run = Path(cfg.train.runs_dir) / "kept"
    assert read_manifest(run / "checkpoint")["step"] == 40
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step30"]
    assert sorted(p.name for p in (run / "deltas").iterdir()) == ["step35"]  # after 30
    # one SSD snapshot per kept full checkpoint, each loadable
    assert len(list((run / "ssd" / "rank0.checkpoints").iterdir())) == 2
    for ckpt in (run / "checkpoints" / "step30", run / "deltas" / "step35"):
        assert read_tables(ckpt)["sparse"]["keys"].numel() > 3 * (256 + 256)  # beyond caches
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        tiny_config(train={"keep_checkpoints": 0})
    with pytest.raises(ConfigError, match="delta_every"):
        tiny_config(train={"delta_every": 5, "save_checkpoint": False})


def test_the_first_delta_of_a_run_is_a_full_checkpoint(tiny_config: Callable[..., Config]
                                                       ) -> None:
    """A delta needs a parent: without one (a fresh run) the save is a full one."""
    cfg = tiny_config(name="first", train={"steps": 12, "delta_every": 5})
    train(cfg)
    run = Path(cfg.train.runs_dir) / "first"
    assert read_manifest(run / "checkpoint")["step"] == 12
    assert [p.name for p in (run / "deltas").iterdir()] == []  # pruned: based on step 5
    saves = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "checkpoint"]
    assert [(r["step"], r["kind"]) for r in saves] == [(5, "full"), (10, "delta")]
    assert all(r["pause_s"] >= 0 for r in saves)


@pytest.fixture
def chain(tiny_config: Callable[..., Config]) -> tuple[Config, Path]:
    """A run of 31 steps: full@20 (kept), deltas 25 and 30 after it, full@31."""
    cfg = tiny_config(name="chain", train={"steps": 31, "checkpoint_every": 20,
                                           "delta_every": 5, "keep_checkpoints": 2})
    train(cfg)
    run = Path(cfg.train.runs_dir) / "chain"
    assert sorted(p.name for p in (run / "deltas").iterdir()) == ["step25", "step30"]
    return cfg, run


def test_a_flipped_byte_in_a_delta_is_found_and_skipped(chain: tuple[Config, Path]) -> None:
    cfg, run = chain
    hurt = run / "deltas" / "step25" / "rows.safetensors"
    data = bytearray(hurt.read_bytes())
    data[len(data) // 2] ^= 0x40
    hurt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="rows.safetensors"):
        read_manifest(hurt.parent, verify=True)
    for path in (hurt.parent, run / "deltas" / "step30"):  # itself, and a delta after it
        with pytest.raises(CheckpointError, match="step25/rows.safetensors"):
            load_checkpoint(path, build_components(cfg))
    shutil.rmtree(run / "checkpoint")  # the newest full one gone: deltas 30, 25 are next
    assert latest_valid(run) == run / "checkpoints" / "step20"


def test_a_delta_without_its_parent_names_it(chain: tuple[Config, Path]) -> None:
    _, run = chain
    shutil.rmtree(run / "checkpoints" / "step20")
    with pytest.raises(CheckpointError, match="parent, the full checkpoint of step 20"):
        read_tables(run / "deltas" / "step30")
    assert latest_valid(run) == run / "checkpoint"


KILL = """
import os, sys
sys.path.insert(0, {tests!r})
from conftest import make_tiny
from terarec.trainer.checkpoint import files
from terarec.trainer.loop import train
import json
real_replace = files.replace

def replace(tmp, path, retire_to=None):
    if path.parent.name == "deltas" and path.name == "step30":
        os._exit(9)  # killed: every file of the delta of step 30 written, not renamed
    return real_replace(tmp, path, retire_to)

files.replace = replace
train(make_tiny({runs!r}, name="killed", **json.loads({cfg!r})))
"""


@pytest.mark.parametrize("layout", ["memory", "ssd", "ssd-async"])
def test_killed_during_a_delta_save_the_previous_checkpoint_loads(
    tmp_path: Path, tiny_config: Callable[..., Config], layout: str
) -> None:
    """kill -9 in the middle of the delta of step 30 (``-async``: written on the
    background thread while training goes on): the delta of step 25 (and its chain)
    verifies, ``--resume auto`` picks it, and the run ends like a straight one."""
    runs = tmp_path / "runs"
    # log_every 5: the train metrics window restarts at the resumed step, a log boundary
    over = with_train(LAYOUTS[layout.removesuffix("-async")], checkpoint_every=20,
                      delta_every=5, log_every=5, async_checkpoint=layout.endswith("-async"))
    code = KILL.format(tests=str(Path(__file__).parent), runs=str(runs), cfg=json.dumps(over))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    run = runs / "killed"
    assert (run / "deltas" / "step30.tmp").is_dir()  # the killed save's leftovers
    newest = latest_valid(run)
    assert newest == run / "deltas" / "step25"
    straight = train(tiny_config(name="straight", **over))
    resumed = train(tiny_config(name="killed", **over), resume=newest)
    assert_same_end(runs / "straight", straight, run, resumed)
    assert not (run / "deltas" / "step30.tmp").exists()


def test_resuming_an_older_checkpoint_drops_the_newer_ones(
    tiny_config: Callable[..., Config],
) -> None:
    """Resumed at step 20 (the run had reached 40), the checkpoints past 20 belong to
    the abandoned future: gone, so ``--resume auto`` never takes them later."""
    over = {"train": {"checkpoint_every": 10, "delta_every": 5, "keep_checkpoints": 3}}
    cfg = tiny_config(name="back", **over)
    train(cfg)
    run = Path(cfg.train.runs_dir) / "back"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step20", "step30"]
    again = tiny_config(name="back", **with_train(over, steps=25))
    train(again, resume=run / "checkpoints" / "step20")
    assert latest_valid(run) == run / "checkpoint"
    assert read_manifest(run / "checkpoint")["step"] == 25
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step20"]
    assert sorted(p.name for p in (run / "deltas").iterdir()) == []  # step 25's base: 20


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["memory", "ttl", "ssd", "ttl-ssd"])
def test_resuming_a_chain_or_the_full_checkpoint_of_its_step_ends_alike(
    tiny_config: Callable[..., Config], layout: str
) -> None:
    """Resumed from full@35 and from the chain full@20 + deltas up to 35, two runs end
    bit for bit alike (with TTL too: both restore every row as used at step 35, on the
    saved clock)."""
    over = with_train(LAYOUTS[layout], eval_every=20, log_every=5)
    runs = Path(tiny_config().train.runs_dir)
    ends = {}
    for name, extra, at in (("a", {"checkpoint_every": 5, "keep_checkpoints": 10},
                             "checkpoints/step35"),
                            ("b", {"checkpoint_every": 20, "delta_every": 5,
                                   "keep_checkpoints": 2}, "deltas/step35")):
        cfg = tiny_config(name=name, **with_train(over, **extra))
        train(cfg)
        ends[name] = train(tiny_config(name=name, **with_train(over, **extra)),
                           resume=runs / name / at)
    for key in ("steps", "samples", "final_eval", "rows"):
        assert_same(ends["a"][key], ends["b"][key], key)
    assert_same(tables_by_key(runs / "a" / "checkpoint"), tables_by_key(runs / "b" / "checkpoint"))


def test_a_checkpoint_left_by_a_killed_save_is_kept(tiny_config: Callable[..., Config]) -> None:
    """A save killed between its two renames leaves the previous full checkpoint in
    ``checkpoint.old/``: with ``keep_checkpoints`` > 1 the next save keeps it."""
    over = {"train": {"steps": 20, "checkpoint_every": 10, "keep_checkpoints": 3}}
    cfg = tiny_config(name="left", **over)
    train(cfg)
    run = Path(cfg.train.runs_dir) / "left"
    (run / "checkpoints" / "step10").rename(run / "checkpoint.old")  # as a kill leaves it
    train(tiny_config(name="left", **with_train(over, steps=30)), resume=run / "checkpoint")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step10", "step20"]
    assert not (run / "checkpoint.old").exists()

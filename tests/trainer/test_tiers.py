"""The trainer with tiered tables: device cache + budgeted host tier + SSD tier.

The tables are tiny (a 64-row device tier, a 128-row host tier) against ~1000 rows, so
every step evicts down to the SSD tier and reads rows back from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_loop import assert_same, comparable, tables_by_key

from terarec.config import Config, ConfigError
from terarec.ps.tiers.ssd import SSDStore, SSDTierConfig
from terarec.trainer.checkpoint import read_manifest
from terarec.trainer.loop import train
from terarec.trainer.report import read_jsonl

# 16 samples x 4 features: at most 64 unique keys per batch, the device tier's size.
TIERED: dict[str, Any] = {
    "data": {"batch_size": 16, "synthetic": {"vocab_size": 2000}},
    "tables": [{"name": "sparse", "dim": 8, "device_rows": 64, "host_rows": 128}],
    "ssd": {"path": "ssd", "block_cache_mb": 8, "write_buffer_mb": 4},
    "train": {"steps": 60, "eval_every": 30, "log_every": 10},
}
STEPS = 60


def without_tiers(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tier counters describe one process (a resumed run starts with cold caches)."""
    return [{k: v for k, v in r.items() if k != "tiers"} for r in comparable(records)]


def assert_same_result(run_a: Path, sum_a: dict[str, Any], run_b: Path, sum_b: dict[str, Any]):
    for key in ("steps", "samples", "final_eval", "rows", "stopped_by"):
        assert_same(sum_a[key], sum_b[key], key)
    a, b = run_a / "checkpoint", run_b / "checkpoint"
    assert_same(tables_by_key(a), tables_by_key(b), "tables")
    dense = [torch.load(p / "dense.pt", weights_only=True) for p in (a, b)]
    assert_same(dense[0], dense[1], "dense")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tiny_factory: Callable[..., Config]):
    """One 60-step tiered run: (config, summary, run dir)."""
    cfg = tiny_factory(tmp_path_factory.mktemp("tiers") / "runs", name="straight", **TIERED)
    summary = train(cfg)
    return cfg, summary, Path(cfg.train.runs_dir) / "straight"


def test_tiers_are_used_and_reported(straight: tuple[Config, dict[str, Any], Path]) -> None:
    cfg, summary, run = straight
    rows = summary["rows"]["sparse"]
    assert rows > 5 * 128  # most rows live only in the SSD tier
    # the DB sits in the run directory, closed at the end (it opens again: not locked)
    store = SSDStore(run / "ssd" / "rank0", SSDTierConfig(path=str(run / "ssd")))
    assert store.count(0) > 0
    store.close()
    tot = summary["tiers"]["sparse"]
    for tier in ("device", "host", "ssd"):
        assert 0 < tot[f"{tier}_hit_rate"] < 1
        assert tot[f"{tier}_rows_in"] > 0
    assert tot["device_rows"] == 64 and tot["host_rows"] == 128
    # evals read through the tiers but are left out of the counts: every lookup of a
    # step for a key not in the device tier is a device miss, and each one is a row
    # moved into the device tier (the prefetch pipeline looks keys up too, and moves
    # only rows that exist; with this budget most of its batches do not fit)
    assert tot["prefetch_batches"] == STEPS and 0 < tot["prefetch_skipped"] < STEPS
    prefetch_misses = tot["prefetch_keys"] - tot["prefetch_resident"]
    step_rows_in = tot["device_rows_in"] - tot["prefetch_rows_in"]
    assert tot["device_misses"] - prefetch_misses == step_rows_in
    # the SSD tier misses exactly the rows created, and the keys a prefetch found in
    # no tier (left to their step to create)
    assert tot["ssd_misses"] == rows + tot["prefetch_absent"]
    train_lines = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert len(train_lines) == STEPS // 10
    per = [r["tiers"]["sparse"] for r in train_lines]
    assert sum(p["device_rows_in"] for p in per) == tot["device_rows_in"]
    assert sum(p["ssd_rows_in"] for p in per) == tot["ssd_rows_in"]
    assert all(0 <= p["device_hit_rate"] <= 1 and p["device_evictions"] >= 0 for p in per)
    assert json.loads((run / "summary.json").read_text())["tiers"]["sparse"]["ssd_rows_in"] > 0


@pytest.mark.numerics
def test_tiered_run_equals_the_unbounded_run(
    straight: tuple[Config, dict[str, Any], Path], tiny_config: Callable[..., Config]
) -> None:
    _, summary, run = straight
    over = {**TIERED, "tables": [{"name": "sparse", "dim": 8}], "ssd": {}}
    plain = train(tiny_config(name="plain", **over))
    runs = Path(tiny_config().train.runs_dir)
    assert "tiers" not in plain
    assert_same_result(run, summary, runs / "plain", plain)


@pytest.mark.numerics
def test_tiered_resume_is_exact(
    straight: tuple[Config, dict[str, Any], Path], tiny_config: Callable[..., Config]
) -> None:
    _, summary, run = straight
    half = tiny_config(name="resumed", **TIERED)
    half.train.steps = STEPS // 2
    train(half)
    runs = Path(half.train.runs_dir)
    ckpt = runs / "resumed" / "checkpoint"
    assert read_manifest(ckpt)["step"] == STEPS // 2
    # the checkpoint holds every row, the SSD-only ones included
    assert tables_by_key(ckpt)["sparse"]["keys"].numel() > 5 * 128
    resumed = train(tiny_config(name="resumed", **TIERED), resume=ckpt)
    assert_same_result(run, summary, runs / "resumed", resumed)
    assert without_tiers(read_jsonl(run / "metrics.jsonl")) == without_tiers(
        read_jsonl(runs / "resumed" / "metrics.jsonl")
    )


def test_a_new_run_does_not_see_an_old_runs_ssd_rows(
    straight: tuple[Config, dict[str, Any], Path], tiny_config: Callable[..., Config]
) -> None:
    # Same name twice: the second run's SSD tier starts empty, so it ends as the first.
    _, summary, run = straight
    cfg = tiny_config(name="again", **TIERED)
    train(cfg)
    again = train(cfg)
    assert_same_result(run, summary, Path(cfg.train.runs_dir) / "again", again)


def test_a_batch_larger_than_the_device_tier_is_a_config_error(
    tiny_config: Callable[..., Config],
) -> None:
    tables = [{"name": "sparse", "dim": 8, "device_rows": 16, "host_rows": 32}]
    cfg = tiny_config(name="small", **{**TIERED, "tables": tables})
    with pytest.raises(ConfigError, match=r"tables\[0\].device_rows: table sparse: this batch"):
        train(cfg)
    # the store was closed on the way out
    root = Path(cfg.train.runs_dir) / "small" / "ssd"
    SSDStore(root / "rank0", SSDTierConfig(path=str(root))).close()


def test_ssd_path_that_is_not_a_db_is_refused(
    tmp_path: Path, tiny_config: Callable[..., Config]
) -> None:
    foreign = tmp_path / "mine"
    (foreign / "rank0").mkdir(parents=True)
    (foreign / "rank0" / "notes.txt").write_text("keep me")
    cfg = tiny_config(name="foreign", **{**TIERED, "ssd": {"path": str(foreign)}})
    with pytest.raises(ConfigError, match="not an SSD tier DB"):
        train(cfg)
    assert (foreign / "rank0" / "notes.txt").read_text() == "keep me"
    assert not (Path(cfg.train.runs_dir) / "foreign").exists()  # no run directory left

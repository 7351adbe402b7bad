"""Checkpoints of tables with an SSD tier: a RocksDB snapshot beside the DB, no rows in
``tables.pt``, exact resume, old snapshots dropped, damage detected, and checkpoints of
the earlier format (every row in ``tables.pt``) still loading.

The table holds ~7x its cache budgets (a 64-row device tier, a 64-row host tier).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_loop import assert_same, nan_row_after, tables_by_key

from terarec.config import Config
from terarec.trainer.checkpoint import CheckpointError, read_manifest, ssd_snapshot
from terarec.trainer.loop import train

SNAP: dict[str, Any] = {
    "data": {"batch_size": 16, "synthetic": {"vocab_size": 4000}},
    "tables": [{"name": "sparse", "dim": 8, "device_rows": 64, "host_rows": 64}],
    "ssd": {"path": "ssd", "block_cache_mb": 8, "write_buffer_mb": 4},
    "train": {"steps": 40, "eval_every": 20, "log_every": 10, "checkpoint_every": 10},
}


def run(tiny_config: Callable[..., Config], name: str, **train_over: Any) -> tuple[Config, dict]:
    cfg = tiny_config(name=name, **{**SNAP, "train": {**SNAP["train"], **train_over}})
    return cfg, train(cfg)


def ckpt_of(cfg: Config) -> Path:
    return Path(cfg.train.runs_dir) / cfg.name / "checkpoint"


def test_checkpoint_is_a_snapshot_not_an_export(tiny_config: Callable[..., Config]) -> None:
    cfg, summary = run(tiny_config, "snap")
    ckpt = ckpt_of(cfg)
    manifest = read_manifest(ckpt)
    assert "ssd.json" in manifest["files"] and manifest["format"] == 4
    tables = torch.load(ckpt / "tables.pt", weights_only=True)
    assert tables["sparse"]["ssd"] and "keys" not in tables["sparse"]  # no row exported
    n = tables["sparse"]["num_rows"]
    assert n == summary["rows"]["sparse"] > 4 * 128  # far more rows than the caches hold
    record = json.loads((ckpt / "ssd.json").read_text())
    snap = Path(record["dir"])
    db = Path(cfg.train.runs_dir) / cfg.name / "ssd" / "rank0"
    assert snap.parent == db.with_name("rank0.checkpoints")  # beside the DB
    assert [p.name for p in snap.parent.iterdir()] == [snap.name]  # older ones dropped
    assert record["tables"]["sparse"]["rows"] == n
    assert any(f.endswith(".sst") for f in record["files"])
    # the snapshot holds every row: the ones the caches held were written through
    rows = tables_by_key(ckpt)["sparse"]
    assert rows["keys"].numel() == n and torch.unique(rows["keys"]).numel() == n
    assert bool(torch.isfinite(rows["rows"]).all())


@pytest.mark.numerics
def test_resume_from_a_periodic_snapshot_is_exact(tiny_config: Callable[..., Config]) -> None:
    cfg, straight = run(tiny_config, "straight")
    part, _ = run(tiny_config, "part", steps=20)
    resumed = train(tiny_config(name="part", **SNAP), resume=ckpt_of(part))
    for key in ("steps", "samples", "final_eval", "rows"):
        assert_same(straight[key], resumed[key], key)
    assert_same(tables_by_key(ckpt_of(cfg)), tables_by_key(ckpt_of(part)), "tables")
    dense = [torch.load(ckpt_of(c) / "dense.pt", weights_only=True) for c in (cfg, part)]
    assert_same(dense[0], dense[1], "dense")


def test_a_damaged_snapshot_is_named(tiny_config: Callable[..., Config]) -> None:
    cfg, _ = run(tiny_config, "damaged", steps=10, checkpoint_every=0)
    ckpt = ckpt_of(cfg)
    record = json.loads((ckpt / "ssd.json").read_text())
    small = next(n for n, r in record["files"].items() if "sha256" in r and r["bytes"] > 0
                 and n.startswith("MANIFEST"))
    path = Path(record["dir"]) / small
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=small):
        train(tiny_config(name="damaged", **SNAP), resume=ckpt)
    sst = next(n for n in record["files"] if n.endswith(".sst"))
    (Path(record["dir"]) / sst).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        train(tiny_config(name="damaged", **SNAP), resume=ckpt)


@pytest.mark.numerics
def test_an_exported_checkpoint_still_loads(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint without a snapshot (every row exported: streamed into chunk files,
    as the rows of in-memory tables are) resumes exactly."""
    cfg, straight = run(tiny_config, "straight2")
    monkeypatch.setattr(ssd_snapshot, "take", lambda embedding, step: (None, {}))
    old, _ = run(tiny_config, "old", steps=20)
    monkeypatch.undo()
    assert "ssd.json" not in read_manifest(ckpt_of(old))["files"]
    assert "rows.0.safetensors" in read_manifest(ckpt_of(old))["files"]
    resumed = train(tiny_config(name="old", **SNAP), resume=ckpt_of(old))
    for key in ("steps", "samples", "final_eval", "rows"):
        assert_same(straight[key], resumed[key], key)
    assert_same(tables_by_key(ckpt_of(cfg)), tables_by_key(ckpt_of(old)), "tables")


def test_a_save_adds_memory_bounded_by_the_caches_not_the_table() -> None:
    """``benchmarks/checkpoint_bench.py`` in a child process (its own RSS): a table of
    400k rows (~27 MiB of rows) behind 16k rows of caches (~1 MiB). The export's peak
    memory grows with the table; the snapshot's stays within a bound set by the caches
    (their rows copied, in a few copies) plus RocksDB's flush buffers."""
    import subprocess
    import sys

    rows, device, host, width = 400_000, 4096, 12_288, 17
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "checkpoint_bench.py"), "--rows",
         str(rows), "--device-rows", str(device), "--host-rows", str(host), "--batch", "4096",
         "--steps", "5", "--json"],
        capture_output=True, text=True, timeout=600, check=True, cwd=root,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    table_bytes = rows * width * 4
    cache_bytes = (device + host) * (width + 4) * 4  # rows + metadata
    assert res["export"]["save_peak_rss_bytes"] > table_bytes  # every row through memory
    bound = 8 * cache_bytes + 16 * 2**20  # a few copies of the cached rows + flush buffers
    assert res["snapshot"]["save_peak_rss_bytes"] < bound, res["snapshot"]
    # a restore writes the caches' copies into the fresh DB: one memtable more (64 MiB,
    # ssd.write_buffer_mb's default), still nothing of the table's size
    memtable = 64 * 2**20
    assert res["snapshot"]["restore_peak_rss_bytes"] < bound + memtable, res["snapshot"]


KILL = """
import os, sys
sys.path.insert(0, {tests!r})
from conftest import make_tiny
from terarec.trainer.checkpoint import files, ssd_snapshot
from terarec.trainer.loop import train
import json
where = {where!r}
saves = [0]
real_take, real_replace = ssd_snapshot.take, files.replace

def take(embedding, step):
    rec = real_take(embedding, step)
    saves[0] += 1
    if where == "after_snapshot" and saves[0] == 2:
        os._exit(9)  # killed: the new snapshot exists, the checkpoint is not written
    return rec

def replace(tmp, path, retire_to=None):
    if where == "before_rename" and saves[0] == 2:
        os._exit(9)  # killed: every file of the new checkpoint written, not renamed
    return real_replace(tmp, path, retire_to)

ssd_snapshot.take, files.replace = take, replace
train(make_tiny({runs!r}, name="killed", **json.loads({cfg!r})))
"""


@pytest.mark.parametrize("where", ["after_snapshot", "before_rename"])
def test_killed_during_a_save_the_previous_checkpoint_loads(
    tmp_path: Path, tiny_config: Callable[..., Config], where: str
) -> None:
    """kill -9 in the middle of the second periodic save: the first checkpoint (step 10)
    and its snapshot are intact, verify, and resume to the same end as a straight run."""
    import subprocess
    import sys

    runs = tmp_path / "runs"
    over = {**SNAP, "train": {**SNAP["train"], "steps": 30}}
    code = KILL.format(tests=str(Path(__file__).parent), where=where, runs=str(runs),
                       cfg=json.dumps(over))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    ckpt = runs / "killed" / "checkpoint"
    assert read_manifest(ckpt, verify=True)["step"] == 10
    straight = train(tiny_config(name="straight", **over))
    resumed = train(tiny_config(name="killed", **over), resume=ckpt)
    for key in ("steps", "samples", "final_eval", "rows"):
        assert_same(straight[key], resumed[key], key)
    # the snapshot of the killed save is gone once a later save succeeded
    snaps = runs / "killed" / "ssd" / "rank0.checkpoints"
    assert len(list(snaps.iterdir())) == 1


def test_a_nan_cached_row_refuses_the_save(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN row of an SSD table that no batch reads again (it sits in a cache) keeps the
    loss finite; the save finds it while writing the caches through, and the previous
    checkpoint stays."""
    from terarec.trainer.loop import TrainingDiverged

    nan_row_after(monkeypatch, 19)  # still cached (device or host tier) at the save after 20
    cfg = tiny_config(name="nan", **SNAP)
    with pytest.raises(TrainingDiverged, match="NaN/Inf rows"):
        train(cfg)
    ckpt = ckpt_of(cfg)
    assert read_manifest(ckpt)["step"] == 10  # the last good one, with its snapshot
    record = json.loads((ckpt / "ssd.json").read_text())
    assert [p.name for p in Path(record["dir"]).parent.iterdir()] == [Path(record["dir"]).name]


def test_memtables_start_flushing_one_step_before_a_full_save(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After steps 9, 19, 29 and 39 (a full checkpoint every 10 steps, the final one at
    40) the SSD store is asked to flush in the background, and only then; the run ends
    as one without it (the flush changes when rows reach SST files, not what they hold)."""
    from terarec.ps.tiers.ssd_store import SSDStore
    from terarec.trainer import divergence

    trained: list[int] = []  # the step being trained, from its loss check
    asked: list[int] = []
    real_check, real_flush = divergence.check_finite, SSDStore.flush_soon

    def check(loss: Any, at: int, *args: Any) -> None:
        trained.append(at)
        real_check(loss, at, *args)

    def flush_soon(store: SSDStore) -> None:
        asked.append(trained[-1])
        real_flush(store)

    monkeypatch.setattr(divergence, "check_finite", check)
    monkeypatch.setattr(SSDStore, "flush_soon", flush_soon)
    _, ahead = run(tiny_config, "ahead")
    assert asked == [9, 19, 29, 39]
    monkeypatch.setattr(SSDStore, "flush_soon", lambda store: None)
    _, plain = run(tiny_config, "plain")
    for key in ("steps", "samples", "final_eval", "rows"):
        assert_same(ahead[key], plain[key], key)


@pytest.mark.parametrize("after", [True, False])
def test_a_failure_after_the_commit_keeps_the_snapshot_it_points_at(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, after: bool
) -> None:
    """The second save fails. After its commit landed (a peer lost at the ranks' last
    agreement, once rank 0 had renamed the checkpoint into place): the snapshot that
    checkpoint points at stays, so it verifies and is the one to resume. Before anything
    was written (the commit says so): its snapshot goes, the first checkpoint stays."""
    from terarec.trainer.checkpoint import full
    from terarec.trainer.checkpoint.history import latest_valid

    real, saves = full.commit, [0]

    def commit(path: Path, *args: Any, **kwargs: Any) -> None:
        saves[0] += 1
        if saves[0] == 2:
            if after:
                real(path, *args, **kwargs)
                raise RuntimeError("connection closed by peer")
            raise CheckpointError(f"cannot write checkpoint {path}: rank 1: disk full")
        real(path, *args, **kwargs)

    monkeypatch.setattr(full, "commit", commit)
    cfg = tiny_config(name="lost", **SNAP)
    with pytest.raises(Exception, match="closed by peer" if after else "disk full"):
        train(cfg)
    ckpt = ckpt_of(cfg)
    assert latest_valid(ckpt.parent) == ckpt
    assert read_manifest(ckpt)["step"] == (20 if after else 10)
    snap = Path(json.loads((ckpt / "ssd.json").read_text())["dir"])
    names = sorted(p.name for p in snap.parent.iterdir())
    # (after: the first save's snapshot waits for the next successful save to go)
    assert names == ([names[0], snap.name] if after else [snap.name])

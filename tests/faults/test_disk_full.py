"""A full disk under the run directory: a clear error naming the path, the last
checkpoint kept, nothing half-written left behind (a real, small tmpfs)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from terarec.config import config_from_dict
from terarec.ps.tiers.ssd import SSDTierError
from terarec.trainer.checkpoint import CheckpointError, read_manifest
from terarec.trainer.checkpoint.files import save_torch
from terarec.trainer.checkpoint.history import latest_valid
from terarec.trainer.loop import train


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (root and the right to mount it, else the test skips)."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)],
            capture_output=True).returncode != 0:
        pytest.skip("needs root and permission to mount a small tmpfs")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_torch_save_on_a_full_disk_raises_the_os_error(small_disk: Path) -> None:
    """torch's own writer reports a short write as ``RuntimeError: unexpected pos``."""
    with pytest.raises(RuntimeError, match="unexpected pos|write"):
        torch.save({"x": torch.ones(4 << 20)}, small_disk / "raw.pt")
    (small_disk / "raw.pt").unlink(missing_ok=True)
    with pytest.raises(OSError) as e:
        save_torch({"x": torch.ones(4 << 20)}, small_disk / "ours.pt")
    assert e.value.errno == errno.ENOSPC and str(small_disk / "ours.pt") in str(e.value)


def test_checkpoint_on_a_full_disk_is_a_checkpoint_error(small_disk: Path) -> None:
    """The step-10 checkpoint fits (its dense state, ~3 MiB with Adam, is most of it);
    then the disk is filled to 64 KiB free and the final save fails: CheckpointError
    naming the checkpoint and the disk error, the step-10 checkpoint intact, no
    temporary or staging directory left."""
    cfg = config_from_dict({
        "name": "full", "seed": 0,
        "data": {"kind": "synthetic", "batch_size": 32,
                 "synthetic": {"num_dense": 4, "num_sparse": 2, "vocab_size": 50,
                               "eval_samples": 256}},
        "tables": [{"name": "sparse", "dim": 4}],
        "model": {"kind": "dlrm", "bottom_mlp": [8, 4], "top_mlp": [512, 512]},
        "optimizer": {"sparse": {"kind": "adam", "lr": 0.01},
                      "dense": {"kind": "adam", "lr": 0.01}},
        "train": {"steps": 20, "checkpoint_every": 10, "log_every": 10, "device": "cpu",
                  "threads": 1, "progress": False, "runs_dir": str(small_disk)},
    }, "<full>")
    run = small_disk / "full"
    (small_disk / "ballast").mkdir()
    # fill the disk after the step-10 checkpoint: leave ~64 KiB free
    from terarec.trainer import loop

    saved = loop._Run._periodic_checkpoint

    def fill_after(self: loop._Run, kind: str) -> None:
        saved(self, kind)
        st = os.statvfs(small_disk)
        free = st.f_bavail * st.f_frsize
        (small_disk / "ballast" / "f").write_bytes(b"\0" * max(free - (64 << 10), 0))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop._Run, "_periodic_checkpoint", fill_after)
        with pytest.raises(CheckpointError) as e:
            train(cfg)
    msg = str(e.value)
    assert str(run / "checkpoint") in msg and "No space left on device" in msg
    assert read_manifest(run / "checkpoint")["step"] == 10  # the last one, verified
    assert not list(run.glob("checkpoint.tmp*")) and not list(run.glob("*.stage"))


def test_ssd_tier_on_a_full_disk_is_one_clear_error_and_the_checkpoint_resumes(
        small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The SSD tier's disk fills after the step-10 checkpoint (the run directory is on
    another disk): the run stops with one SSDTierError naming the DB, the full disk and
    what to do, said once (closing the tier on the way out fails the same way, and that
    is not printed again); with space freed, ``latest_valid`` finds the step-10
    checkpoint and the run resumes from it to its end."""
    def config(steps: int) -> Any:
        return config_from_dict({
            "name": "ssdfull", "seed": 0,
            "data": {"kind": "synthetic", "batch_size": 256,
                     "synthetic": {"num_dense": 4, "num_sparse": 8, "vocab_size": 1_000_000,
                                   "eval_samples": 256}},
            "tables": [{"name": "sparse", "dim": 16, "device_rows": 4096,
                        "host_rows": 4096}],
            "ssd": {"path": str(small_disk / "ssd"), "write_buffer_mb": 1,
                    "block_cache_mb": 1},
            "model": {"kind": "dlrm", "bottom_mlp": [8, 16], "top_mlp": [16]},
            "optimizer": {"sparse": {"kind": "adam", "lr": 0.01},
                          "dense": {"kind": "adam", "lr": 0.01}},
            "train": {"steps": steps, "checkpoint_every": 10, "log_every": 10,
                      "device": "cpu", "threads": 1, "progress": False,
                      "runs_dir": str(tmp_path / "runs")},
        }, "<ssdfull>")

    from terarec.trainer import loop

    saved = loop._Run._periodic_checkpoint
    ballast = small_disk / "ballast"

    def fill_after(self: loop._Run, kind: str) -> None:
        saved(self, kind)
        if self.step == 10:
            st = os.statvfs(small_disk)
            ballast.write_bytes(b"\0" * max(st.f_bavail * st.f_frsize - (32 << 10), 0))

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO):
        mp.setattr(loop._Run, "_periodic_checkpoint", fill_after)
        with pytest.raises(SSDTierError) as e:
            train(config(400))
    msg = str(e.value)
    assert "No space left on device" in msg and str(small_disk / "ssd") in msg, msg
    assert "free space" in msg
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("No space left" in r.getMessage() for r in said), said
    ballast.unlink()
    run = tmp_path / "runs" / "ssdfull"
    ckpt = latest_valid(run)
    assert ckpt is not None and read_manifest(ckpt)["step"] == 10
    train(config(30), resume=ckpt)
    assert read_manifest(run / "checkpoint")["step"] == 30

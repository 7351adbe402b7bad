"""SIGTERM / SIGINT during ``terarec train``: a checkpoint on the way out, exit 128 +
signal, and the resumed run ends as a straight one (real processes, real signals)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from terarec.trainer.checkpoint import read_manifest, read_tables
from terarec.trainer.checkpoint.history import latest_valid

CONFIG: dict[str, Any] = {
    "name": "sig", "seed": 0,
    "data": {"kind": "synthetic", "batch_size": 64, "eval_batch_size": 1024,
             "synthetic": {"num_dense": 4, "num_sparse": 4, "vocab_size": 500,
                           "eval_samples": 1024}},
    "tables": [{"name": "sparse", "dim": 8}],
    "model": {"kind": "dlrm", "bottom_mlp": [16, 8], "top_mlp": [16]},
    "optimizer": {"sparse": {"kind": "adam", "lr": 0.05}, "dense": {"kind": "adam", "lr": 0.01}},
    "train": {"steps": 1_000_000, "log_every": 5, "device": "cpu", "threads": 1,
              "progress": False},
}


def cli(tmp: Path, *args: str) -> list[str]:
    cfg = tmp / "c.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    if not cfg.exists():
        cfg.write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"],
                                                           "runs_dir": str(tmp / "runs")}}))
    return [sys.executable, "-m", "terarec.cli", "train", "--config", str(cfg), *args]


def interrupted(tmp: Path, sig: int) -> tuple[subprocess.CompletedProcess, int]:
    """Starts a long run, sends ``sig`` once it has logged, returns how it ended and the
    step its checkpoint holds."""
    proc = subprocess.Popen(cli(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp / "runs" / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start logging"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done, int(read_manifest(tmp / "runs" / "sig" / "checkpoint")["step"])


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_exits_128_plus_signal(
        tmp_path: Path, sig: int, code: int) -> None:
    done, step = interrupted(tmp_path, sig)
    name = signal.Signals(sig).name
    assert done.returncode == code, done.stderr[-2000:]
    assert f"stopped by {name} at step {step}" in done.stdout
    assert "--resume auto" in done.stdout and "Traceback" not in done.stderr
    assert step >= 10
    summary = json.loads((tmp_path / "runs" / "sig" / "summary.json").read_text())
    assert summary["stopped_by"] == "signal" and summary["signal"] == name


def test_the_resumed_run_ends_as_a_straight_run(tmp_path: Path) -> None:
    """SIGTERM at some step S; resumed to S + 15, the rows and dense state equal those
    of one run of S + 15 steps."""
    done, step = interrupted(tmp_path / "a", signal.SIGTERM)
    assert done.returncode == 143, done.stderr[-2000:]
    target = f"train.steps={step + 15}"
    resumed = subprocess.run(cli(tmp_path / "a", "--resume", "auto", "--set", target),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = subprocess.run(cli(tmp_path / "b", "--set", target), capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = (tmp_path / d / "runs" / "sig" / "checkpoint" for d in ("a", "b"))
    assert read_manifest(a)["step"] == read_manifest(b)["step"] == step + 15
    ta, tb = read_tables(a)["sparse"], read_tables(b)["sparse"]
    order_a, order_b = torch.argsort(ta["keys"]), torch.argsort(tb["keys"])
    assert torch.equal(ta["keys"][order_a], tb["keys"][order_b])
    assert torch.equal(ta["rows"][order_a], tb["rows"][order_b])
    da = torch.load(a / "dense.pt", weights_only=True)["model"]
    db = torch.load(b / "dense.pt", weights_only=True)["model"]
    assert all(torch.equal(da[k], db[k]) for k in db)


def test_a_save_that_outlives_the_grace_period_is_abandoned(tmp_path: Path) -> None:
    """``train.grace_seconds`` far below any save's time: the save on the way out is
    abandoned (exit 143, an error naming the setting), the periodic checkpoint written
    before the signal stays valid, and ``--resume auto`` continues from it."""
    cfg = tmp_path / "c.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump({**CONFIG, "train": {
        **CONFIG["train"], "runs_dir": str(tmp_path / "runs"), "checkpoint_every": 5,
        "grace_seconds": 1e-6}}))
    done, _ = interrupted(tmp_path, signal.SIGTERM)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "outlived train.grace_seconds" in done.stderr
    assert "Traceback" not in done.stderr
    run = tmp_path / "runs" / "sig"
    saved = latest_valid(run)
    assert saved is not None
    step = int(read_manifest(saved)["step"])
    assert step >= 5 and step % 5 == 0  # a periodic checkpoint, not the abandoned one
    resumed = subprocess.run(cli(tmp_path, "--resume", "auto", "--set",
                                 f"train.steps={step + 5}", "--set", "train.grace_seconds=60"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"--resume auto: {saved}" in resumed.stdout
    assert read_manifest(run / "checkpoint")["step"] == step + 5

"""SIGTERM to one rank of a 2-rank job: the ranks agree on one step (at a log step),
write one checkpoint together and both exit 143 (the other as if it got the signal:
torchrun forwards it to every rank, here it reaches only one)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from launch_helpers import Ranks, free_port, torchrun_env
from train_helpers import quickstart_config, run_dir, train_cmd, write_config


def test_sigterm_stops_every_rank_at_one_step_with_one_checkpoint(tmp_path: Path) -> None:
    cfg = quickstart_config(tmp_path, "qs-term", steps=100_000)
    config = write_config(tmp_path, cfg)
    port = free_port()
    metrics = run_dir(cfg) / "metrics.jsonl"
    with Ranks(tmp_path) as ranks:
        for r in range(2):
            ranks.start(train_cmd(config), torchrun_env(r, 2, port))
        ranks.wait_for_lines(metrics, 2, timeout=120)
        ranks.kill(0, signal.SIGTERM)
        codes = ranks.wait(120)
        out = ranks.output(0)
    assert codes == [143, 143], out[-3000:] + ranks.output(1)[-3000:]
    manifest = json.loads((run_dir(cfg) / "checkpoint" / "manifest.json").read_text())
    assert manifest["world"]["size"] == 2
    summary = json.loads((run_dir(cfg) / "summary.json").read_text())
    assert summary["signal"] == "SIGTERM" and summary["steps"] == manifest["step"]
    assert f"stopped by SIGTERM at step {manifest['step']}" in out
    assert manifest["step"] % cfg["train"]["log_every"] == 0  # agreed at a log step

"""`terarec-launch --max-restarts`: a group restarted after a rank dies resumes the run's
newest checkpoint (it used to start again from step 0 and overwrite it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from launch_helpers import PY, Ranks, base_env
from train_helpers import final_rows, quickstart_config, run_dir, write_config


def rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the training process of ``rank`` whose command line holds ``marker``."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and "terarec.cli" in cmd and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def launch(tmp: Path, config: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [PY, "-m", "terarec.launch.cli", "--nproc-per-node", str(nproc), "--no-topology",
            "--monitor-interval", "0.5", *extra, "train", "--config", str(config)]


def wait_for_checkpoint(ranks: Ranks, ckpt: Path, step: int, timeout: float = 240) -> None:
    """Until the run's checkpoint holds ``step`` (the launcher alive all along)."""
    deadline = time.monotonic() + timeout
    while not ((ckpt / "manifest.json").exists()
               and json.loads((ckpt / "manifest.json").read_text())["step"] == step):
        assert time.monotonic() < deadline, ranks.output(0)[-3000:]
        assert ranks.procs[0].poll() is None, ranks.output(0)[-3000:]
        time.sleep(0.05)


def train_steps(cfg: dict) -> list[int]:
    """The train steps logged in the run's metrics, in order."""
    return [json.loads(x)["step"] for x in (run_dir(cfg) / "metrics.jsonl").read_text()
            .splitlines() if json.loads(x).get("split") == "train"]


def test_a_restarted_group_resumes_the_newest_checkpoint(tmp_path: Path) -> None:
    """Two ranks under --max-restarts 1; rank 1 is killed (-9) after the step-20
    checkpoint: the group restarts, resumes from it (not from step 0), finishes at step
    60, and its rows equal those of a launch resumed by hand from a copy of that
    checkpoint."""
    cfg = quickstart_config(tmp_path, "restarted", steps=60)
    cfg["train"].update(checkpoint_every=20, log_every=5)
    config = write_config(tmp_path, cfg)
    ckpt = run_dir(cfg) / "checkpoint"
    env = {**base_env(), "OMP_NUM_THREADS": "1"}
    with Ranks(tmp_path) as ranks:
        ranks.start(launch(tmp_path, config, "--max-restarts", "1"), env)
        wait_for_checkpoint(ranks, ckpt, 20)
        pid = rank_pid(str(config), 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        shutil.copytree(ckpt, tmp_path / "at20")  # what the restart resumes from
        (code,) = ranks.wait(timeout=300)
        out = ranks.output(0)
    assert code == 0, out[-3000:]
    assert "restart 1: resuming from" in out and str(ckpt) in out, out[-3000:]
    summary = json.loads((run_dir(cfg) / "summary.json").read_text())
    assert summary["steps"] == 60
    steps = train_steps(cfg)
    assert steps == sorted(set(steps)) and steps[-1] == 60  # continued, logged once each
    restarted = final_rows(cfg)
    # the same checkpoint resumed by a launch without a failure
    (tmp_path / "ref").mkdir()
    ref = quickstart_config(tmp_path / "ref", "restarted", steps=60)
    ref["train"].update(checkpoint_every=20, log_every=5)
    ref_config = write_config(tmp_path / "ref", ref)
    with Ranks(tmp_path / "ref") as ranks:
        ranks.start(launch(tmp_path, ref_config) + ["--resume", str(tmp_path / "at20")], env)
        (code,) = ranks.wait(timeout=300)
        assert code == 0, ranks.output(0)[-3000:]
    want = final_rows(ref)
    assert restarted.keys() == want.keys()
    for name in want:
        assert all(a.equal(b) for a, b in zip(restarted[name], want[name])), name


@pytest.mark.slow
@pytest.mark.faults
def test_four_ranks_with_ssd_tiers_restart_and_lose_no_row(tmp_path: Path) -> None:
    """Four ranks whose table has device, host and SSD tiers (most rows on the SSD),
    under --max-restarts 2; rank 2 is killed (-9) after the step-16 checkpoint: the group
    restarts, resumes it and finishes at step 40. Its rows (read back through every
    rank's SSD snapshot) equal those of a launch without a failure that stopped at step
    16 and was resumed from its checkpoint: nothing lost from any tier."""
    def config(tmp: Path, steps: int) -> dict:
        cfg = quickstart_config(tmp, "ssd4", steps=steps)
        cfg["train"].update(checkpoint_every=8, log_every=4)
        cfg["data"]["synthetic"]["vocab_size"] = 20_000
        cfg["tables"][0].update(device_rows=2000, host_rows=1000)
        cfg["ssd"] = {"path": "ssd", "write_buffer_mb": 1, "block_cache_mb": 4}
        return cfg

    cfg = config(tmp_path, 40)
    ckpt = run_dir(cfg) / "checkpoint"
    env = {**base_env(), "OMP_NUM_THREADS": "1"}
    with Ranks(tmp_path) as ranks:
        ranks.start(launch(tmp_path, write_config(tmp_path, cfg), "--max-restarts", "2",
                           nproc=4), env)
        wait_for_checkpoint(ranks, ckpt, 16)
        pid = rank_pid(str(tmp_path / "ssd4.yaml"), 2)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        (code,) = ranks.wait(timeout=400)
        out = ranks.output(0)
    assert code == 0, out[-3000:]
    assert "restart 1: resuming from" in out, out[-3000:]
    why = "\n".join(x for x in out.splitlines() if "resum" in x or "skipping" in x)
    assert re.search(r"resumed from \S+ at step 16\b", out), why
    steps = train_steps(cfg)
    assert steps == sorted(set(steps)) and steps[-1] == 40
    got = final_rows(cfg)
    assert sum(k.numel() for k, _ in got.values()) > 4 * (2000 + 1000)  # most on the SSDs
    # the reference: the same run stopped at its step-16 checkpoint, resumed to 40
    ref_tmp = tmp_path / "ref"
    ref_tmp.mkdir()
    for steps_to, extra in ((16, ()), (40, ("--resume", "auto"))):
        ref = config(ref_tmp, steps_to)
        with Ranks(ref_tmp) as ranks:
            ranks.start(launch(ref_tmp, write_config(ref_tmp, ref), nproc=4) + list(extra), env)
            (code,) = ranks.wait(timeout=400)
            assert code == 0, ranks.output(0)[-3000:]
    want = final_rows(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert all(a.equal(b) for a, b in zip(got[name], want[name])), name

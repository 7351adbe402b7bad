"""`terarec train` on several gloo ranks (loopback): the same run as one process.

* 2 ranks (one node) and 4 ranks (two nodes of two: tables sharded over each node's
  fast group, replicas kept in step over the cross groups) train the same loss curve,
  rows and dense weights as one process on the same global batch, within bounds derived
  from float32 rounding (``train_helpers.run_bounds``), with device and host budgets
  that make every rank evict into its host and SSD tiers;
* a 2-rank run resumed from its checkpoint ends where the straight run ends (resumes
  on other rank layouts: ``test_reshard_ranks.py``);
* real launchers: two `torchrun --nnodes 2 --nproc-per-node 2` launches on this host,
  and `mpirun -np 4`, train the quickstart config (cut down);
* a rank killed mid-training makes the others stop fast, naming it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import PY, REPO, Ranks, base_env, free_port, torchrun_env
from train_helpers import (
    GLOBAL_BATCH,
    assert_same_eval,
    assert_same_run,
    equivalence_config,
    launch_ranks,
    losses,
    one_process,
    quickstart_config,
    run_dir,
    train_cmd,
    write_config,
)

from terarec.data.criteo_writer import write_criteo
from tests.numerics import assert_close, f64_tol, loss_tol

# Oversubscribed (4 ranks, 2 cores): ranks waiting in MPI calls (the rendezvous while
# the others still import, MPI_Finalize at exit) must yield their core, not spin.
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,tcp",
          "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo",
          "--mca", "mpi_yield_when_idle", "1"]
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun here")


@pytest.fixture(scope="module")
def two_ranks(work: Path) -> dict[str, Any]:
    cfg = equivalence_config(work, 2, "two")
    launch_ranks(work, cfg, 2, 2)
    return cfg


@pytest.mark.numerics
def test_two_ranks_train_the_one_process_run(two_ranks: dict[str, Any],
                                             reference: dict[str, Any]) -> None:
    assert_same_run(two_ranks, reference)
    ckpt = run_dir(two_ranks) / "checkpoint"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world"] == {"size": 2, "fast_groups": [[0, 1]]}
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "dense.pt", "manifest.json", "rank0", "rank1"]
    summary = json.loads((run_dir(two_ranks) / "summary.json").read_text())
    ref = json.loads((run_dir(reference) / "summary.json").read_text())
    assert summary["samples"] == ref["samples"] and summary["rows"] == ref["rows"]
    assert_same_eval(summary["final_eval"], ref["final_eval"], reference)
    for r, tiers in enumerate(summary["tiers_by_rank"]):  # every rank evicted all the way
        t = tiers["sparse"]
        assert t["device_evictions"] > 0 and t["host_evictions"] > 0, (r, t)
        assert t["ssd_rows"] > 0, (r, t)
    # rank 0 alone wrote the run's files; each rank its own SSD tier and, beside it,
    # the snapshot its shard of the checkpoint points at
    ssd = run_dir(two_ranks) / "ssd"
    assert sorted(p.name for p in ssd.iterdir()) == [
        "rank0", "rank0.checkpoints", "rank1", "rank1.checkpoints"]
    assert all(len(list((ssd / f"rank{r}.checkpoints").iterdir())) == 1 for r in (0, 1))


@pytest.mark.numerics
def test_one_process_evaluates_a_sharded_checkpoint(
    two_ranks: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from terarec.cli import main

    assert main(["eval", "--run", str(run_dir(two_ranks))]) == 0  # the shards together
    got = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir(two_ranks) / "summary.json").read_text())
    # the same weights score the same samples with the same kernels (in other batches):
    # the same scores, so the AUC differs only by its float64 sums
    assert_close(got["auc"], summary["auc"], f64_tol(terms=summary["final_eval"]["samples"]),
                 "AUC")
    assert got["step"] == two_ranks["train"]["steps"]


@pytest.mark.numerics
@pytest.mark.slow
def test_two_nodes_of_two_train_the_one_process_run(
    work: Path, reference: dict[str, Any]
) -> None:
    cfg = equivalence_config(work, 4, "four")
    launch_ranks(work, cfg, 4, 2)
    assert_same_run(cfg, reference)
    manifest = json.loads((run_dir(cfg) / "checkpoint" / "manifest.json").read_text())
    assert manifest["world"]["fast_groups"] == [[0, 1], [2, 3]]


@pytest.mark.numerics
@pytest.mark.slow  # two 2-rank launches
def test_a_resumed_two_rank_run_ends_where_the_straight_run_ends(
    work: Path, two_ranks: dict[str, Any]
) -> None:
    steps = two_ranks["train"]["steps"]
    cfg = equivalence_config(work, 2, "two-resumed", steps=steps // 2)
    launch_ranks(work, cfg, 2, 2)
    cfg["train"]["steps"] = steps
    ckpt = run_dir(cfg) / "checkpoint"
    launch_ranks(work, cfg, 2, 2, "--resume", str(ckpt))
    assert_same_run(cfg, two_ranks, exact=True)  # the same ranks, kernels and batches


@pytest.mark.numerics
@pytest.mark.slow  # two 2-rank launches
def test_a_two_rank_run_resumed_from_a_delta_ends_where_the_straight_run_ends(
    work: Path, two_ranks: dict[str, Any]
) -> None:
    """Each rank writes its delta (``deltas/step<N>/rank<r>/``); a resume reads each
    rank's chain (full + deltas, SSD tier snapshots included) and ends bit for bit."""
    steps = two_ranks["train"]["steps"]
    cfg = equivalence_config(work, 2, "two-delta", steps=steps // 2 + 1)
    cfg["train"].update(delta_every=2, keep_checkpoints=2)  # full@2 (no parent yet), deltas
    launch_ranks(work, cfg, 2, 2)
    delta = run_dir(cfg) / "deltas" / f"step{steps // 2}"
    manifest = json.loads((delta / "manifest.json").read_text())
    assert manifest["kind"] == "delta" and manifest["world"]["size"] == 2
    assert {"rank0/rows.safetensors", "rank1/rows.safetensors"} <= set(manifest["files"])
    cfg["train"]["steps"] = steps
    launch_ranks(work, cfg, 2, 2, "--resume", str(delta))
    assert_same_run(cfg, two_ranks, exact=True)


@pytest.mark.numerics
def test_ranks_stop_together_at_an_uneven_end_of_data(work: Path) -> None:
    """A finite pass whose last global batch splits 6 / 5 over two ranks: both stop
    before it (drop_last); the steps before match one process, which trains it too."""
    data = write_criteo(work / "uneven.tsv", 3 * GLOBAL_BATCH + 11, seed=5)
    runs = []
    for world in (1, 2):
        cfg = equivalence_config(work, world, f"uneven{world}", tiers=False)
        cfg["data"]["path"] = [str(data)]
        cfg["train"].update(steps=None, epochs=1)
        if world == 1:
            one_process(cfg)
        else:
            launch_ranks(work, cfg, 2, 2)
        runs.append(cfg)
    one, two = (losses(c) for c in runs)
    assert len(one) == 4 and len(two) == 3
    for step, (a, b) in enumerate(zip(one, two)):  # a mean over the global batch
        assert_close(b, a, loss_tol(a, step, GLOBAL_BATCH), f"loss at step {step + 1}")
    summary = json.loads((run_dir(runs[1]) / "summary.json").read_text())
    assert summary["stopped_by"] == "end_of_data" and summary["samples"] == 3 * GLOBAL_BATCH


def test_torchrun_two_nodes_of_two_train_the_quickstart(tmp_path: Path) -> None:
    cfg = quickstart_config(tmp_path, "qs-torchrun")
    config = write_config(tmp_path, cfg)
    port = free_port()
    with Ranks(tmp_path) as ranks:
        for _ in range(2):  # two "nodes" on this host, met at a c10d rendezvous
            ranks.start([PY, "-m", "torch.distributed.run", "--nnodes", "2",
                         "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"qs{port}",
                         "-m", "terarec.cli", "train", "--config", str(config)], base_env())
        codes = ranks.wait(150)
        outs = ranks.output(0) + ranks.output(1)
    assert codes == [0, 0], outs[-4000:]
    _check_quickstart(cfg, world=4, out=outs)
    manifest = json.loads((run_dir(cfg) / "checkpoint" / "manifest.json").read_text())
    assert len(manifest["world"]["fast_groups"]) == 2  # two nodes of two


@needs_mpirun
def test_mpirun_four_ranks_train_the_quickstart(tmp_path: Path) -> None:
    cfg = quickstart_config(tmp_path, "qs-mpirun")
    config = write_config(tmp_path, cfg)
    res = subprocess.run([*MPIRUN, "-np", "4", *train_cmd(config)], env=base_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _check_quickstart(cfg, world=4, out=res.stdout)


def _check_quickstart(cfg: dict[str, Any], world: int, out: str) -> None:
    summary = json.loads((run_dir(cfg) / "summary.json").read_text())
    assert summary["world_size"] == world and summary["steps"] == cfg["train"]["steps"]
    assert summary["samples"] == world * cfg["data"]["batch_size"] * cfg["train"]["steps"]
    assert 0.0 <= summary["auc"] <= 1.0  # (a few steps: it has barely started learning)
    # the global eval covered the whole eval set once, whatever the shards held
    assert summary["final_eval"]["samples"] == cfg["data"]["synthetic"]["eval_samples"]
    assert out.count(f"run {cfg['name']}: ") == 1  # rank 0 alone prints the closing lines
    ckpt = run_dir(cfg) / "checkpoint"
    assert sorted(p.name for p in ckpt.glob("rank*")) == [f"rank{r}" for r in range(world)]


def test_a_rank_killed_mid_training_stops_the_others_naming_it(tmp_path: Path) -> None:
    cfg = quickstart_config(tmp_path, "qs-killed", steps=100_000)
    cfg["dist"] = {"timeout_s": 20}
    config = write_config(tmp_path, cfg)
    port = free_port()
    metrics = run_dir(cfg) / "metrics.jsonl"
    with Ranks(tmp_path) as ranks:
        for r in range(2):
            ranks.start(train_cmd(config), torchrun_env(r, 2, port))
        ranks.wait_for_lines(metrics, 2, timeout=90)
        ranks.kill(1, signal.SIGKILL)
        t0 = time.monotonic()
        code = ranks.procs[0].wait(timeout=40)
        took = time.monotonic() - t0
        out = ranks.output(0)
    assert code != 0
    assert "PeerFailure: rank 0 stops: rank 1 (pid" in out and "died" in out, out[-3000:]
    assert took < 20, took
    assert not (run_dir(cfg) / "summary.json").exists()

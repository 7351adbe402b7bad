"""Real launches on loopback: torchrun-style env, mpirun, Slurm and MPICH variables,
terarec-launch (two torchrun "nodes" on one host). Each rank runs the probe, which sets
up the groups and checks an all-reduce on the world, its fast group and its cross group.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import PROBE, PY, REPO, Ranks, base_env, free_port, torchrun_env

from terarec.launch.cli import build_parser, torchrun_command

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,tcp",
          "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo"]


def _layouts(text: str) -> dict[int, dict[str, Any]]:
    # ranks share one stdout under mpirun: two lines may come out glued together
    dec, rows, i = json.JSONDecoder(), [], text.find('{"rank"')
    while i != -1:
        row, end = dec.raw_decode(text, i)
        rows.append(row)
        i = text.find('{"rank"', end)
    return {r["rank"]: r for r in rows}


def _run_ranks(tmp_path: Path, envs: list[dict[str, str]], args: list[str]) -> dict[int, Any]:
    with Ranks(tmp_path) as ranks:
        for env in envs:
            ranks.start([*PROBE, "--timeout-s", "40", *args], env)
        codes = ranks.wait(55)
        outs = [ranks.output(i) for i in range(len(envs))]
    assert codes == [0] * len(envs), "\n".join(o[-1500:] for o in outs)
    out: dict[int, Any] = {}
    for o in outs:
        out.update(_layouts(o))
    return out


def test_one_process_is_a_world_of_one(tmp_path: Path) -> None:
    got = _run_ranks(tmp_path, [base_env()], [])
    assert got[0]["world_size"] == 1 and got[0]["launcher"] == "single"
    assert got[0]["fast_ranks"] == [0] and got[0]["cross_ranks"] == [0]


def test_two_nodes_of_two_from_torchrun_variables(tmp_path: Path) -> None:
    port = free_port()
    got = _run_ranks(tmp_path, [torchrun_env(r, 4, port, local_world=2) for r in range(4)],
                     ["--steps", "5"])
    assert sorted(got) == [0, 1, 2, 3]
    for r, g in got.items():
        assert (g["node"], g["local_rank"], g["num_nodes"]) == (r // 2, r % 2, 2)
        assert g["fast_ranks"] == [2 * (r // 2), 2 * (r // 2) + 1]  # the node's ranks
        assert g["cross_ranks"] == [r % 2, r % 2 + 2]  # same local rank on every node
        assert (g["device"], g["backend"], g["launcher"]) == ("cpu", "gloo", "torchrun")


def _free_port_in(lo: int, hi: int) -> int:
    for port in random.Random().sample(range(lo, hi), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in [{lo}, {hi})")


def _slurm_env(rank: int, world: int) -> dict[str, str]:
    # Choose SLURM_JOB_ID so that the port terarec derives from it is free right now.
    port = _free_port_in(20000, 30000)
    job = ((port - 20000) * pow(131, -1, 10000)) % 10000
    env = base_env()
    env.update(SLURM_PROCID=str(rank), SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS=str(world),
               SLURM_NODEID=str(rank), SLURM_STEP_NUM_NODES=str(world),
               SLURM_STEP_TASKS_PER_NODE=f"1(x{world})", SLURM_STEP_NODELIST="127.0.0.1",
               SLURM_JOB_ID=str(job), SLURM_STEP_ID="0")
    return env


def test_slurm_variables_and_a_port_derived_from_the_job(tmp_path: Path) -> None:
    env0 = _slurm_env(0, 2)
    env1 = {**env0, "SLURM_PROCID": "1", "SLURM_NODEID": "1"}
    got = _run_ranks(tmp_path, [env0, env1], [])
    assert [got[r]["node"] for r in (0, 1)] == [0, 1]
    assert got[0]["fast_ranks"] == [0] and got[0]["cross_ranks"] == [0, 1]
    assert got[1]["launcher"] == "slurm"


def test_mpich_variables(tmp_path: Path) -> None:
    port = free_port()
    envs = []
    for r in range(2):
        env = base_env()
        env.update(PMI_RANK=str(r), PMI_SIZE="2", MPI_LOCALRANKID=str(r), MPI_LOCALNRANKS="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        envs.append(env)
    got = _run_ranks(tmp_path, envs, [])
    assert got[1]["launcher"] == "mpich" and got[1]["fast_ranks"] == [0, 1]


needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun here")


@needs_mpirun
def test_mpirun_shares_the_endpoint_over_mpi(tmp_path: Path) -> None:
    res = subprocess.run([*MPIRUN, "-np", "2", *PROBE, "--timeout-s", "40"],
                         env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=58)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    got = _layouts(res.stdout)
    assert sorted(got) == [0, 1] and got[1]["launcher"] == "openmpi"
    assert got[0]["fast_ranks"] == [0, 1] and got[0]["num_nodes"] == 1


def test_two_torchrun_nodes_on_one_host_via_terarec_launch(tmp_path: Path) -> None:
    port = free_port()
    exe = str(Path(PY).parent / "terarec-launch")
    with Ranks(tmp_path) as ranks:
        for _ in range(2):
            ranks.start([exe, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint",
                         f"127.0.0.1:{port}", "--rdzv-id", f"t{port}", "--probe", "--",
                         "--device", "cpu", "--timeout-s", "40"], base_env())
        codes = ranks.wait(58)
        outs = ranks.output(0) + ranks.output(1)
    assert codes == [0, 0], outs[-3000:]
    got = _layouts(outs)
    assert sorted(got) == [0, 1]
    assert {got[r]["node"] for r in (0, 1)} == {0, 1}  # one rank per torchrun node
    assert all(g["fast_ranks"] == [g["rank"]] and g["cross_ranks"] == [0, 1]
               for g in got.values())


def _cmd(*argv: str) -> list[str]:
    return torchrun_command(build_parser().parse_args(list(argv)))


def test_terarec_launch_builds_the_torchrun_command() -> None:
    cmd = _cmd("--nproc-per-node", "4", "train", "--config", "c.yaml", "--set", "a=1")
    assert cmd[:3] == [sys.executable, "-m", "terarec.launch.torchrun"]
    assert "--standalone" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert cmd[-7:] == ["-m", "terarec.cli", "train", "--config", "c.yaml", "--set", "a=1"]
    cmd = _cmd("--nnodes", "2:4", "--nproc-per-node", "8", "--rdzv-endpoint", "n0:29400",
               "--max-restarts", "3", "train", "--config", "c.yaml")
    assert "--standalone" not in cmd
    for flag, value in [("--rdzv-endpoint", "n0:29400"), ("--rdzv-backend", "c10d"),
                        ("--max-restarts", "3"), ("--nnodes", "2:4")]:
        assert cmd[cmd.index(flag) + 1] == value
    cmd = _cmd("--nnodes", "2", "--node-rank", "1", "--master-addr", "n0", "--master-port",
               "29500", "--probe")
    assert cmd[cmd.index("--node-rank") + 1] == "1" and cmd[-2:] == ["-m", "terarec.launch.probe"]
    for argv, match in [
        (["--nnodes", "2", "train"], "must meet somewhere"),
        (["--node-rank", "1", "train"], "--node-rank is for a static launch"),
        ([], "give the terarec command"),
        (["--master-addr", "x", "train"], "needs both --master-addr and --master-port"),
    ]:
        with pytest.raises(ValueError, match=match):
            _cmd(*argv)


def test_terarec_launch_dry_run_prints_the_command() -> None:
    exe = str(Path(PY).parent / "terarec-launch")
    res = subprocess.run([exe, "--nproc-per-node", "2", "--dry-run", "--no-topology", "train",
                          "--config", "x.yaml"], capture_output=True, text=True, timeout=60,
                         env=base_env())
    assert res.returncode == 0, res.stderr
    assert "-m terarec.launch.torchrun --nnodes 1 --nproc-per-node 2 --max-restarts 0 " \
        "--standalone -m terarec.cli train --config x.yaml" in res.stdout


def test_a_failed_job_ends_with_one_line_and_the_ranks_exit_code(tmp_path: Path) -> None:
    """A rank that fails (here: a config error, exit 2 as in one process) stops the job
    with its own message (once, though every rank meets it) and one line of the launcher
    naming it, exiting with the rank's code: no torch
    traceback, no per-rank report, no OMP banner."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: bad\ndata: {kind: synthetic, batch_size: 8}\n"
                   "tables: [{name: t, dim: 4}]\n"
                   f"train: {{steps: 2, device: cuda, runs_dir: {tmp_path}}}\n")
    res = subprocess.run([sys.executable, "-m", "terarec.launch.cli", "--nproc-per-node", "2",
                          "--no-topology", "train", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=240)
    if "CUDA is not available" not in res.stderr:
        pytest.skip("this machine has CUDA: the config is not an error here")
    assert res.returncode == 2, res.stderr  # a config error, as in one process
    lines = [x for x in res.stderr.splitlines() if x.startswith("terarec-launch: rank ")]
    assert len(lines) == 1 and "exited with code 2" in lines[0], res.stderr
    # the same error on both ranks: said once
    assert res.stderr.count("terarec: config error: ") == 1, res.stderr
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr
    assert "OMP_NUM_THREADS" not in res.stdout + res.stderr

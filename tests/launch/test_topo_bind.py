"""The launcher applies the topology plan: per-rank CPU affinity, memory binding, plan
environment (user's values kept), fast groups into the process groups; --no-topology."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import PROBE, PY, REPO, Ranks, base_env, free_port, torchrun_env

from terarec.launch.bind import prepare_plan, read_plan_file
from terarec.launch.env import LaunchError, read_launch_env
from terarec.launch.groups import fast_groups_from_plan, plan_groups
from terarec.launch.health import ProcInfo
from terarec.topology.model import TopologyError

CPU_BOX = str(REPO / "tests/topology/fixtures/cpu-box.topo")
DGX = str(REPO / "tests/topology/fixtures/dgx-h200-nvswitch.topo")
TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or
                              not {0, 1} <= os.sched_getaffinity(0),
                              reason="needs CPUs 0 and 1")


def _rows(text: str) -> dict[int, dict[str, Any]]:
    dec, rows, i = json.JSONDecoder(), {}, text.find('{"rank"')
    while i != -1:
        row, end = dec.raw_decode(text, i)
        rows[row["rank"]] = row
        i = text.find('{"rank"', end)
    return rows


def test_fast_groups_env_and_global_groups() -> None:
    env = {**torchrun_env(1, 4, 1, local_world=2), "TERAREC_FAST_GROUPS": "0;1"}
    assert read_launch_env(env).local_fast_groups == ((0,), (1,))
    for bad, match in [("0,x", "expected local ranks"), ("0,1,2", "not a partition"),
                       ("0;0", "not a partition")]:
        with pytest.raises(LaunchError, match=f"TERAREC_FAST_GROUPS.*{match}"):
            read_launch_env({**env, "TERAREC_FAST_GROUPS": bad})
    procs = [ProcInfo(r, f"h{r // 2}", 100 + r, "x", r % 2, r // 2) for r in range(4)]
    groups = fast_groups_from_plan(procs, [((0,), (1,))] * 4)
    assert groups == [[0], [1], [2], [3]]
    assert plan_groups(procs, groups) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    assert fast_groups_from_plan(procs, [None] * 4) is None
    assert fast_groups_from_plan(procs, [((0, 1),)] * 4) == [[0, 1], [2, 3]]
    with pytest.raises(LaunchError, match=r"ranks \[3\] have no topology fast groups"):
        fast_groups_from_plan(procs, [((0, 1),)] * 3 + [None])
    with pytest.raises(LaunchError, match="node 1: its ranks disagree"):
        fast_groups_from_plan(procs, [((0, 1),)] * 3 + [((0,), (1,))])


def test_plan_file(tmp_path: Path) -> None:
    plan, machine, path = prepare_plan(8, DGX, str(tmp_path), environ={"NCCL_IB_HCA": "mine"})
    assert path.parent == tmp_path and machine.hostname == "dgx-h200"
    assert path.stat().st_mode & 0o777 == 0o644  # readable like the run's other files
    again, user = read_plan_file(str(path))
    assert again.ranks[3].nic == plan.ranks[3].nic == "mlx5_5" and user == {"NCCL_IB_HCA"}
    # launches of one plan share its file (nothing removes it: no file per launch piles up)
    assert prepare_plan(8, DGX, str(tmp_path), environ={"NCCL_IB_HCA": "mine"})[2] == path
    other = prepare_plan(8, DGX, str(tmp_path), environ={})[2]  # another user_env
    assert other != path and sorted(tmp_path.iterdir()) == sorted([path, other])
    path.write_text("{")
    with pytest.raises(TopologyError, match=f"{path}: not valid JSON"):
        read_plan_file(str(path))
    path.write_text("{}")
    with pytest.raises(TopologyError, match="not a plan file"):
        read_plan_file(str(path))
    with pytest.raises(TopologyError, match="nproc: must be >= 1"):
        prepare_plan(0, DGX, str(tmp_path))


@TWO_CPUS
def test_bind_applies_one_ranks_plan(tmp_path: Path) -> None:
    _, _, path = prepare_plan(2, CPU_BOX, str(tmp_path),
                              environ={"OMP_NUM_THREADS": "7"})  # the user set this one
    env = torchrun_env(1, 2, free_port())
    env["OMP_NUM_THREADS"] = "7"
    res = subprocess.run([PY, "-m", "terarec.launch.bind", "--plan", str(path), "--", "-m",
                          "terarec.cli", "topo", "--applied"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = _rows(res.stdout)[1]
    assert got["local_rank"] == 1 and got["cpus"] == [1]
    assert got["env"]["OMP_NUM_THREADS"] == "7"  # the user's value wins
    assert got["env"]["TERAREC_FAST_GROUPS"] == "0,1"
    assert got["env"]["TERAREC_SSD_DIR"] == "/var/tmp/terarec-ssd"
    if shutil.which("numactl"):
        assert "bind:0" in got["mempolicy"], got
    # a rank of a launch with a different count than planned runs unpinned, with a warning
    env = torchrun_env(0, 3, free_port())
    res = subprocess.run([PY, "-m", "terarec.launch.bind", "--plan", str(path), "--", "-m",
                          "terarec.cli", "topo", "--applied"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "the plan is for 2 local ranks, not 3" in res.stderr
    assert _rows(res.stdout)[0]["env"]["TERAREC_FAST_GROUPS"] is None


def _launcher(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    exe = str(Path(PY).parent / "terarec-launch")
    if not Path(exe).exists():
        pytest.skip("terarec-launch is not installed in this environment")
    env = base_env()
    env.pop("OMP_NUM_THREADS")
    return [exe, "--nproc-per-node", "2", "--log-dir", str(tmp_path), "--monitor-interval",
            "0.2"], env


def test_terarec_launch_command_and_bad_topology(tmp_path: Path) -> None:
    common, env = _launcher(tmp_path)
    dry = subprocess.run([*common, "--topology", CPU_BOX, "--dry-run", "--probe"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert " -m terarec.launch.bind --plan " in dry.stdout
    assert dry.stdout.rstrip().endswith("-- -m terarec.launch.probe")
    assert "rank 1: NUMA 0 cpus 1 (1 cores)" in dry.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    res = subprocess.run([*common, "--topology", str(bad), "--probe"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and f"topology: {bad}: not valid JSON" in res.stderr
    assert "--no-topology" in res.stderr


@pytest.mark.slow  # two torchrun launches: ~20 s quiet, a minute on a busy 2-core box
@TWO_CPUS
def test_terarec_launch_pins_each_rank(tmp_path: Path) -> None:
    common, env = _launcher(tmp_path)
    res = subprocess.run([*common, "--topology", CPU_BOX, "topo", "--applied"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(res.stdout)
    assert [rows[r]["cpus"] for r in (0, 1)] == [[0], [1]]
    assert all(rows[r]["env"]["OMP_NUM_THREADS"] == "1" for r in (0, 1))
    assert "topology plan" in res.stderr and "rank 1: NUMA 0 cpus 1" in res.stderr
    res = subprocess.run([*common, "--no-topology", "topo", "--applied"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(res.stdout)
    assert all(rows[r]["env"]["TERAREC_FAST_GROUPS"] is None for r in (0, 1))
    assert all(len(rows[r]["cpus"]) == len(os.sched_getaffinity(0)) for r in (0, 1))


def test_plan_fast_groups_reach_the_process_groups(tmp_path: Path) -> None:
    port = free_port()
    with Ranks(tmp_path) as ranks:
        for r in range(2):
            ranks.start([*PROBE, "--timeout-s", "40"],
                        torchrun_env(r, 2, port, TERAREC_FAST_GROUPS="0;1"))
        codes = ranks.wait(55)
        outs = [ranks.output(i) for i in range(2)]
    assert codes == [0, 0], "\n".join(o[-1500:] for o in outs)
    rows = {**_rows(outs[0]), **_rows(outs[1])}
    assert rows[0]["fast_ranks"] == [0] and rows[1]["fast_ranks"] == [1]
    assert rows[0]["cross_ranks"] == [0, 1] and rows[0]["num_nodes"] == 2


def test_fewer_ranks_than_gpus_get_their_chosen_gpu(tmp_path: Path) -> None:
    """2 ranks of a 2-node job on the 8-GPU DGX fixture: the plan picks GPU0 and GPU4 (one
    per socket, each next to its own NIC); bind gives each rank CUDA_VISIBLE_DEVICES."""
    plan, _, path = prepare_plan(2, DGX, str(tmp_path), environ={}, nnodes=2)
    assert [r.gpu for r in plan.ranks] == [0, 4] and plan.cuda_visible_devices == "0,4"
    for rank, gpu in ((0, "0"), (1, "4")):
        res = subprocess.run([PY, "-m", "terarec.launch.bind", "--no-numactl", "--plan",
                              str(path), "--", "-m", "terarec.cli", "topo", "--applied"],
                             env=torchrun_env(rank, 2, free_port()), cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        got = _rows(res.stdout)[rank]["env"]
        assert got["CUDA_VISIBLE_DEVICES"] == gpu and got["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # the user's own CUDA_VISIBLE_DEVICES wins, as every plan variable does
    _, _, mine = prepare_plan(2, DGX, str(tmp_path), environ={"CUDA_VISIBLE_DEVICES": "5,6"},
                              nnodes=2)
    env = torchrun_env(1, 2, free_port(), CUDA_VISIBLE_DEVICES="5,6")
    res = subprocess.run([PY, "-m", "terarec.launch.bind", "--no-numactl", "--plan", str(mine),
                          "--", "-m", "terarec.cli", "topo", "--applied"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert _rows(res.stdout)[1]["env"]["CUDA_VISIBLE_DEVICES"] == "5,6"
    # terarec-launch passes its node count and backend to the plan
    res = subprocess.run([PY, "-m", "terarec.launch.cli", "--nproc-per-node", "2", "--nnodes",
                          "2", "--rdzv-endpoint", "node0:29400", "--topology", DGX,
                          "--log-dir", str(tmp_path), "--dry-run", "--probe"], env=base_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "rank 1: GPU4 NUMA 1" in res.stderr and "CUDA_VISIBLE_DEVICES=0,4" in res.stderr
    res = subprocess.run([PY, "-m", "terarec.launch.cli", "--nproc-per-node", "9",
                          "--topology", DGX, "--dry-run", "--probe"], env=base_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "NCCL cannot put two ranks" in res.stderr
    assert "Traceback" not in res.stderr

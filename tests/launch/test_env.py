"""Launch environments -> LaunchEnv, node layout and groups (pure: no processes)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import terarec
from terarec.config import ConfigError, DistBackend, DistConfig, config_from_dict
from terarec.launch.env import (
    LaunchEnv,
    LaunchError,
    expand_tasks_per_node,
    first_host,
    read_launch_env,
)
from terarec.launch.groups import assign_nodes, pick_device, plan_groups
from terarec.launch.health import ProcInfo

TORCHRUN = {
    "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
    "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2",
    "TORCHELASTIC_RUN_ID": "job7",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
SLURM = {
    "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "11",
    "SLURM_NODEID": "2", "SLURM_STEP_NUM_NODES": "3", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3",
    "SLURM_STEP_NODELIST": "gpu[07-09]", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0",
    # The allocation's variables an sbatch script also has: never read for the layout.
    "SLURM_NTASKS": "99", "SLURM_JOB_NODELIST": "other[1-5]",
}


def test_torchrun() -> None:
    e = read_launch_env(TORCHRUN)
    assert e == LaunchEnv(
        launcher="torchrun", rank=5, world_size=8, local_rank=1, local_world_size=4,
        node_rank=1, num_nodes=2, master_addr="node0", master_port=29500, agent_store=True,
        restart_count=2, job_id="job7",
    )
    assert e.distributed and e.describe() == "rank 5/8 (local 1/4, node 1) via torchrun"


def test_openmpi_mpich_slurm() -> None:
    e = read_launch_env(OPENMPI)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == (
        "openmpi", 3, 4, 1, 2)
    assert e.node_rank is None and e.master_addr is None  # rank 0 shares it over MPI
    e = read_launch_env(MPICH)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == (
        "mpich", 2, 4, 0, 2)
    e = read_launch_env(SLURM)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == (
        "slurm", 9, 11, 1, 3)
    assert (e.node_rank, e.num_nodes, e.job_id) == (2, 3, "4242")
    assert e.master_addr is None and e.fallback_addr == "gpu07"
    assert 20000 <= (e.fallback_port or 0) < 30000
    # MASTER_ADDR / MASTER_PORT win under every launcher.
    e = read_launch_env({**SLURM, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (e.master_addr, e.master_port) == ("10.0.0.1", 1234)


def test_precedence_and_single() -> None:
    # torchrun inside a Slurm allocation / mpirun inside one: the inner launcher wins.
    assert read_launch_env({**SLURM, **TORCHRUN}).launcher == "torchrun"
    assert read_launch_env({**SLURM, **OPENMPI}).launcher == "openmpi"
    e = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"})  # sbatch script
    assert (e.launcher, e.rank, e.world_size) == ("single", 0, 1)
    e = read_launch_env({})
    assert (e.launcher, e.rank, e.world_size, e.local_world_size) == ("single", 0, 1, 1)
    assert not e.distributed


@pytest.mark.parametrize(
    "env,match",
    [
        ({"RANK": "0"}, "only one of RANK and WORLD_SIZE"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK='x': not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"rank 2 is not in \[0, 2\)"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK and LOCAL_WORLD_SIZE are not"),
        ({**TORCHRUN, "LOCAL_RANK": "4"}, r"local rank 4 not in \[0, 4\)"),
        ({**TORCHRUN, "MASTER_PORT": "0"}, "MASTER_PORT=0: not a port"),
        ({k: v for k, v in OPENMPI.items() if "LOCAL_SIZE" not in k},
         "OMPI_COMM_WORLD_LOCAL_SIZE is not set"),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, "MPI_LOCALRANKID is not"),
        ({**SLURM, "SLURM_NODEID": "3"}, "SLURM_NODEID=3 but SLURM_STEP_TASKS_PER_NODE"),
        ({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "4(2)"}, "cannot parse"),
    ],
)
def test_errors_name_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(LaunchError, match=match):
        read_launch_env(env)


def test_slurm_lists() -> None:
    assert expand_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert expand_tasks_per_node("8") == [8]
    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("a1,b2") == "a1"
    assert first_host("node[3]") == "node3"


# Every variable a launcher sets that describes the job. Only terarec/launch/env.py may
# name them; everything else asks it (DistContext / LaunchEnv).
LAUNCH_VAR = re.compile(
    r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|GROUP_WORLD_SIZE|ROLE_RANK"
    r"|MASTER_ADDR|MASTER_PORT|TORCHELASTIC_\w+|OMPI_COMM_WORLD_\w*|PMI_\w+|PMIX_\w+"
    r"|MPI_LOCAL\w+|SLURM_\w+)$"
)


def _launch_var_uses(path: Path) -> list[str]:
    """String constants (and f-string pieces) naming a launcher variable, or a prefix
    of one (``"OMPI_COMM_WORLD_" + x``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if LAUNCH_VAR.match(v) or re.match(r"^(OMPI_COMM_WORLD|SLURM|PMI|PMIX)_\w*$", v):
                out.append(f"{path.name}:{node.lineno}: {v!r}")
    return out


def test_env_module_is_the_only_reader_of_launcher_variables() -> None:
    root = Path(terarec.__file__).resolve().parent
    allowed = root / "launch" / "env.py"
    offenders = [u for p in sorted(root.rglob("*.py")) if p != allowed
                 for u in _launch_var_uses(p)]
    assert not offenders, "launcher variables read outside terarec/launch/env.py:\n" + \
        "\n".join(offenders)
    # ... and the check does see them where they are.
    assert any("'OMPI_COMM_WORLD_'" in u for u in _launch_var_uses(allowed))
    assert any("'SLURM_PROCID'" in u for u in _launch_var_uses(allowed))


def test_dist_config() -> None:
    base = {"name": "x", "tables": [{"name": "t", "dim": 4}]}
    cfg = config_from_dict(base)
    assert cfg.dist == DistConfig() and cfg.dist.backend == DistBackend.AUTO
    cfg = config_from_dict({**base, "dist": {"backend": "GLOO", "timeout_s": 5}})
    assert cfg.dist.backend == DistBackend.GLOO and cfg.dist.timeout_s == 5.0
    for bad, match in [
        ({"timeout_s": 0}, "dist.timeout_s: must be > 0"),
        ({"backend": "mpi"}, "dist.backend: must be one of"),
        ({"master_port": 70000}, "dist.master_port: must be in"),
        ({"timeouts": 1}, "dist.timeouts: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**base, "dist": bad}, "<x>")


def _proc(rank: int, host: str, local: int, node: int | None = None) -> ProcInfo:
    return ProcInfo(rank, host, 1000 + rank, host + ":1", local, node)


def test_nodes_and_groups() -> None:
    # mpirun --map-by node: ranks alternate between hosts; nodes come from host names.
    procs = [_proc(0, "a", 0), _proc(1, "b", 0), _proc(2, "a", 1), _proc(3, "b", 1)]
    assert assign_nodes(procs) == [0, 1, 0, 1]
    fast, cross = plan_groups(procs)
    assert fast == [[0, 2], [1, 3]] and cross == [[0, 1], [2, 3]]
    # torchrun's node ranks win over host names (two "nodes" on one host in tests).
    procs = [_proc(r, "h", r % 2, r // 2) for r in range(4)]
    assert plan_groups(procs) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    # the topology plan's fast groups (the hook), uneven sizes allowed.
    assert plan_groups(procs, [[3, 0, 1], [2]]) == ([[3, 0, 1], [2]], [[3, 2], [0], [1]])
    with pytest.raises(LaunchError, match="not a partition"):
        plan_groups(procs, [[0, 1], [1, 2, 3]])
    with pytest.raises(LaunchError, match=r"node 0 \(host h\): local ranks \[0, 0\]"):
        assign_nodes([_proc(0, "h", 0), _proc(1, "h", 0)])


def test_pick_device_on_cpu() -> None:
    """A device the rank cannot have is a config error (exit 2, as in one process)."""
    env = read_launch_env({**TORCHRUN, "MASTER_ADDR": "x"})
    assert pick_device("cpu", env) == torch.device("cpu")
    with pytest.raises(ConfigError, match="names one GPU for all 4 ranks"):
        pick_device("cuda:1", env)
    if not torch.cuda.is_available():
        assert pick_device("auto", env) == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda", env)


def test_pick_device_names_the_rank_only_where_the_error_is_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """More local ranks than GPUs: the error names the rank; an error every rank shares
    (one GPU named for all) reads the same on every rank, so it prints once."""
    env = read_launch_env({**TORCHRUN, "LOCAL_RANK": "3"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError) as own:
        pick_device("cuda", env)
    assert str(own.value).startswith(env.describe())
    assert str(own.value).endswith("local rank 3 but 2 GPUs are visible")
    with pytest.raises(ConfigError) as shared:
        pick_device("cuda:1", env)
    assert not str(shared.value).startswith(env.describe())

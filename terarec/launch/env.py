"""The launch environment -> who this process is: the ONLY reader of launcher variables.

Every launcher terarec supports describes the job in environment variables of its own.
:func:`read_launch_env` turns any of them into one :class:`LaunchEnv`; nothing else in
terarec reads them (``tests/launch/test_env.py`` checks that).

================  ===================================================================
launcher          variables read (first match wins, in this order)
================  ===================================================================
torchrun          ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
                  ``GROUP_RANK`` (node), ``GROUP_WORLD_SIZE`` (nodes), ``MASTER_ADDR``,
                  ``MASTER_PORT``, ``TORCHELASTIC_USE_AGENT_STORE``,
                  ``TORCHELASTIC_RESTART_COUNT``, ``TORCHELASTIC_RUN_ID``. A plain
                  ``RANK`` + ``WORLD_SIZE`` set by hand is read the same way.
Open MPI          ``OMPI_COMM_WORLD_RANK``, ``_SIZE``, ``_LOCAL_RANK``, ``_LOCAL_SIZE``
MPICH / PMI       ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``
                  (Intel MPI and MPICH's hydra)
Slurm (srun)      ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``,
                  ``SLURM_NODEID``, ``SLURM_STEP_NUM_NODES``,
                  ``SLURM_STEP_TASKS_PER_NODE``, ``SLURM_STEP_NODELIST``,
                  ``SLURM_JOB_ID``, ``SLURM_STEP_ID`` (the step's variables: an sbatch
                  script outside ``srun`` is one process)
none              one process: rank 0 of 1
================  ===================================================================

``TERAREC_FAST_GROUPS`` (set per rank by ``terarec-launch`` from the topology plan, see
``bind.py``) names the node's fast groups in local ranks; it is read here too.

``MASTER_ADDR`` / ``MASTER_PORT``, when set, are honoured under every launcher; then come
``dist.master_addr`` / ``dist.master_port`` from the config. MPI runs without them get the
rendezvous endpoint from rank 0 over mpi4py (see ``rendezvous.py``); Slurm runs fall back
to the step's first node and a port derived from the job id.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional


class LaunchError(RuntimeError):
    """The launch environment is incomplete or inconsistent, or the rendezvous failed."""


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is, as its launcher told it.

    Attributes:
        launcher: ``torchrun``, ``openmpi``, ``mpich``, ``slurm`` or ``single``.
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes.
        local_rank: rank among the processes of this node.
        local_world_size: processes on this node.
        node_rank: this node's index when the launcher says (torchrun, Slurm); None
            under MPI (nodes are then told apart by host name).
        num_nodes: number of nodes when the launcher says, else None.
        master_addr: ``MASTER_ADDR``: the rendezvous host (rank 0 or torchrun's agent),
            None when not set.
        master_port: ``MASTER_PORT``, None when not set.
        fallback_addr: the launcher's guess when ``MASTER_ADDR`` is not set (Slurm: the
            step's first node), used after ``dist.master_addr``.
        fallback_port: likewise for the port (Slurm: derived from the job and step ids).
        agent_store: torchrun's agent already hosts the rendezvous store (rank 0 must
            not start one).
        restart_count: torchrun's restart count (0 on the first attempt).
        job_id: the launcher's job / run id, if any (for logs).
        local_fast_groups: the topology plan's fast groups of this node as local ranks
            (``TERAREC_FAST_GROUPS``, set by ``terarec-launch``: ``0,1,2,3;4,5,6,7``), or
            None (one fast group per node).
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: Optional[int] = None
    num_nodes: Optional[int] = None
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    fallback_addr: Optional[str] = None
    fallback_port: Optional[int] = None
    agent_store: bool = False
    restart_count: int = 0
    job_id: Optional[str] = None
    local_fast_groups: Optional[tuple[tuple[int, ...], ...]] = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> LaunchError:
            return LaunchError(f"{self.launcher} launch environment: {msg}")

        if self.world_size < 1:
            raise bad(f"world size {self.world_size} < 1")
        if not 0 <= self.rank < self.world_size:
            raise bad(f"rank {self.rank} is not in [0, {self.world_size})")
        if not 1 <= self.local_world_size <= self.world_size:
            raise bad(f"local world size {self.local_world_size} not in [1, {self.world_size}]")
        if not 0 <= self.local_rank < self.local_world_size:
            raise bad(f"local rank {self.local_rank} not in [0, {self.local_world_size})")
        if self.node_rank is not None and self.num_nodes is not None:
            if not 0 <= self.node_rank < self.num_nodes:
                raise bad(f"node rank {self.node_rank} not in [0, {self.num_nodes})")
        groups = self.local_fast_groups
        if groups is not None:
            flat = sorted(r for g in groups for r in g)
            if flat != list(range(self.local_world_size)) or not all(groups):
                raise bad(f"{FAST_GROUPS_VAR}={format_fast_groups(groups)!r} is not a "
                          f"partition of the local ranks 0..{self.local_world_size - 1} (a "
                          "plan made for another number of ranks per node?)")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        """``rank 3/8 (local 1/4, node 0) via torchrun``."""
        node = "" if self.node_rank is None else f", node {self.node_rank}"
        return (
            f"rank {self.rank}/{self.world_size} (local {self.local_rank}/"
            f"{self.local_world_size}{node}) via {self.launcher}"
        )


FAST_GROUPS_VAR = "TERAREC_FAST_GROUPS"


def format_fast_groups(groups: tuple[tuple[int, ...], ...]) -> str:
    return ";".join(",".join(map(str, g)) for g in groups)


def _fast_groups(env: Mapping[str, str]) -> Optional[tuple[tuple[int, ...], ...]]:
    """``TERAREC_FAST_GROUPS=0,1,2,3;4,5,6,7`` -> ``((0, 1, 2, 3), (4, 5, 6, 7))``."""
    raw = env.get(FAST_GROUPS_VAR)
    if not raw:
        return None
    try:
        return tuple(tuple(int(x) for x in g.split(",")) for g in raw.split(";"))
    except ValueError:
        raise LaunchError(f"environment variable {FAST_GROUPS_VAR}={raw!r}: expected local "
                          "ranks like 0,1,2,3;4,5,6,7") from None


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise LaunchError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r}: not an integer") from None


def _opt_int(env: Mapping[str, str], name: str) -> Optional[int]:
    return _int(env, name) if env.get(name) else None


def _endpoint(env: Mapping[str, str]) -> tuple[Optional[str], Optional[int]]:
    addr = env.get("MASTER_ADDR") or None
    port = _opt_int(env, "MASTER_PORT")
    if port is not None and not 0 < port < 65536:
        raise LaunchError(f"environment variable MASTER_PORT={port}: not a port")
    return addr, port


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed tasks-per-node list: ``"4(x2),3"`` -> ``[4, 4, 3]``."""
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise LaunchError(f"SLURM tasks per node {spec!r}: cannot parse {part!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def first_host(nodelist: str) -> str:
    """First host of a Slurm host list: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None or not m.group(1):
        raise LaunchError(f"SLURM node list {nodelist!r}: cannot parse")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_port(job_id: str, step_id: str) -> int:
    """A port in [20000, 30000) derived from the job and step ids (same on every task)."""
    try:
        key = int(job_id) * 131 + (int(step_id) if step_id.isdigit() else 0)
    except ValueError:
        key = sum(job_id.encode())
    return 20000 + key % 10000


def _torchrun(env: Mapping[str, str]) -> LaunchEnv:
    world = _int(env, "WORLD_SIZE")
    if env.get("LOCAL_WORLD_SIZE"):
        local_world = _int(env, "LOCAL_WORLD_SIZE")
    elif world == 1:
        local_world = 1
    elif env.get("LOCAL_RANK") is None:
        raise LaunchError(
            "RANK and WORLD_SIZE are set but LOCAL_RANK and LOCAL_WORLD_SIZE are not: "
            "set them too (torchrun sets all of them)"
        )
    else:  # set by hand without LOCAL_WORLD_SIZE: one node
        local_world = world
    addr, port = _endpoint(env)
    return LaunchEnv(
        launcher="torchrun",
        rank=_int(env, "RANK"),
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK", 0 if world == 1 else None),
        local_world_size=local_world,
        node_rank=_opt_int(env, "GROUP_RANK"),
        num_nodes=_opt_int(env, "GROUP_WORLD_SIZE"),
        master_addr=addr,
        master_port=port,
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
        job_id=env.get("TORCHELASTIC_RUN_ID"),
    )


def _openmpi(env: Mapping[str, str]) -> LaunchEnv:
    p = "OMPI_COMM_WORLD_"
    addr, port = _endpoint(env)
    return LaunchEnv(
        launcher="openmpi",
        rank=_int(env, p + "RANK"),
        world_size=_int(env, p + "SIZE"),
        local_rank=_int(env, p + "LOCAL_RANK"),
        local_world_size=_int(env, p + "LOCAL_SIZE"),
        master_addr=addr,
        master_port=port,
    )


def _mpich(env: Mapping[str, str]) -> LaunchEnv:
    world = _int(env, "PMI_SIZE")
    if env.get("MPI_LOCALRANKID") is None and world > 1:
        raise LaunchError(
            "PMI_RANK/PMI_SIZE are set but MPI_LOCALRANKID is not: this MPI does not say "
            "which processes share a node; launch with torchrun or Open MPI instead"
        )
    addr, port = _endpoint(env)
    return LaunchEnv(
        launcher="mpich",
        rank=_int(env, "PMI_RANK"),
        world_size=world,
        local_rank=_int(env, "MPI_LOCALRANKID", 0),
        local_world_size=_int(env, "MPI_LOCALNRANKS", 1 if world == 1 else world),
        master_addr=addr,
        master_port=port,
    )


def _slurm(env: Mapping[str, str]) -> LaunchEnv:
    world = _int(env, "SLURM_STEP_NUM_TASKS")
    num_nodes = _int(env, "SLURM_STEP_NUM_NODES", 1)
    node = _int(env, "SLURM_NODEID", 0)
    spec = env.get("SLURM_STEP_TASKS_PER_NODE")
    per_node = expand_tasks_per_node(spec) if spec else [world]
    if node >= len(per_node):
        raise LaunchError(
            f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE={spec!r} lists "
            f"{len(per_node)} node(s)"
        )
    addr, port = _endpoint(env)
    job, step = env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", "")
    nodelist = env.get("SLURM_STEP_NODELIST")
    return LaunchEnv(
        launcher="slurm",
        rank=_int(env, "SLURM_PROCID"),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID", 0),
        local_world_size=per_node[node],
        node_rank=node,
        num_nodes=num_nodes,
        master_addr=addr,
        master_port=port,
        fallback_addr=first_host(nodelist) if nodelist else None,
        fallback_port=_slurm_port(job, step),
        job_id=job or None,
    )


def read_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """This process's place in the job, from whichever launcher started it.

    Args:
        environ: the environment to read (default ``os.environ``); tests pass dicts.

    Returns:
        The :class:`LaunchEnv`; ``launcher == "single"`` (rank 0 of 1) when no launcher
        variables are set.

    Raises:
        LaunchError: a launcher's variables are incomplete, not integers, or
            inconsistent (e.g. a rank outside the world); the message names the variable.
    """
    env = os.environ if environ is None else environ
    out = _read(env)
    groups = _fast_groups(env)
    return out if groups is None else dataclasses.replace(out, local_fast_groups=groups)


def _read(env: Mapping[str, str]) -> LaunchEnv:
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        return _torchrun(env)
    if env.get("OMPI_COMM_WORLD_SIZE") is not None:
        return _openmpi(env)
    if env.get("PMI_SIZE") is not None and env.get("PMI_RANK") is not None:
        return _mpich(env)
    if env.get("SLURM_PROCID") is not None and env.get("SLURM_STEP_NUM_TASKS"):
        return _slurm(env)  # an srun step (a batch script itself is one process)
    if env.get("RANK") is not None or env.get("WORLD_SIZE") is not None:
        raise LaunchError("only one of RANK and WORLD_SIZE is set: set both (or neither)")
    addr, port = _endpoint(env)
    return LaunchEnv("single", 0, 1, 0, 1, node_rank=0, num_nodes=1, master_addr=addr,
                     master_port=port)

"""Applying the topology plan to each rank (``terarec-launch`` does it unless
``--no-topology``).

``terarec-launch`` discovers the node, makes the plan (:mod:`terarec.topology`) and
writes it to a JSON file; torchrun then starts, for every rank::

    python -m terarec.launch.bind --plan PLAN.json -- -m terarec.cli train ...

which, for its local rank (read from the launcher's variables by ``env.py``), pins the
process to the plan's CPU cores (``os.sched_setaffinity``), sets the plan's environment
(``OMP_NUM_THREADS``, ``NCCL_IB_HCA`` / ``NCCL_SOCKET_IFNAME``, ``CUDA_DEVICE_ORDER``,
``CUDA_VISIBLE_DEVICES`` when the ranks do not drive every GPU in order,
``TERAREC_SSD_DIR``, ``TERAREC_FAST_GROUPS``) except variables the user set before
launching, and replaces itself (``exec``, same pid, so torchrun's signals and exit codes
are untouched) with ``numactl --membind=<node> -- python ARGS`` (memory on the rank's
NUMA node), or plain ``python ARGS`` when numactl is missing or refuses (a warning).
The same module works under mpirun / srun: ``mpirun -np 8 python -m terarec.launch.bind
--plan P.json -- -m terarec.cli train ...``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Optional

from terarec.launch.env import LaunchError, read_launch_env
from terarec.topology.model import Machine, TopologyError
from terarec.topology.plan import Plan, RankPlan, make_plan, plan_from_dict, plan_to_dict


def prepare_plan(nproc: int, machine_file: Optional[str] = None,
                 out_dir: Optional[str] = None,
                 environ: Optional[Mapping[str, str]] = None, backend: str = "nccl",
                 nnodes: int = 1) -> tuple[Plan, Machine, Path]:
    """Discovers this node (or reads ``machine_file``), plans ``nproc`` ranks of a job on
    ``nnodes`` nodes using ``backend`` and writes the plan file the ranks read.

    The file also records which of the plan's variables the user already set, so that
    the ranks keep the user's values. It must outlive the launcher (which execs
    torchrun, and torchrun's restarts read it again), so nothing removes it; its name
    is the content's hash (and the user id), so launches of one plan share one file
    instead of leaving one behind each. It is replaced atomically: a rank reading it
    while another launch writes the same plan sees the whole file.

    Raises:
        TopologyError: unreadable machine / tool output, ``nproc < 1``, or more ranks
            than GPUs under NCCL.
    """
    from terarec.topology.cli import read_machine
    from terarec.topology.discover import discover

    machine = read_machine(machine_file) if machine_file else discover()
    plan = make_plan(machine, nproc, backend=backend, nnodes=nnodes)
    env = os.environ if environ is None else environ
    keys = sorted({k for r in plan.ranks for k in r.env})
    doc = {"plan": plan_to_dict(plan), "user_env": [k for k in keys if k in env]}
    text = json.dumps(doc, indent=1, sort_keys=True)
    where = Path(out_dir) if out_dir else Path(tempfile.gettempdir())
    where.mkdir(parents=True, exist_ok=True)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = where / f"terarec-plan-{uid}-{digest}.json"
    fd, tmp = tempfile.mkstemp(prefix=".terarec-plan-", suffix=".tmp", dir=where)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # readable like the run's other files (mkstemp: 0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return plan, machine, path


def read_plan_file(path: str) -> tuple[Plan, set[str]]:
    """(plan, the variables the user had set) from a file :func:`prepare_plan` wrote.

    Raises:
        TopologyError: missing or malformed, naming the file.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:
        raise TopologyError(f"{path}: cannot read the topology plan: {e.strerror or e}") \
            from None
    except json.JSONDecodeError as e:
        raise TopologyError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(raw, dict) or "plan" not in raw:
        raise TopologyError(f"{path}: not a plan file (no 'plan' key)")
    try:
        plan = plan_from_dict(raw["plan"])
    except TopologyError as e:
        raise TopologyError(f"{path}: {e}") from None
    return plan, set(raw.get("user_env", []))


def apply_rank(rp: RankPlan, user_env: set[str], environ: MutableMapping[str, str]) -> list[str]:
    """Pins this process to ``rp.cpus`` and sets ``rp.env`` in ``environ`` (not the
    variables in ``user_env``). Returns warnings (what could not be applied)."""
    warnings = []
    if rp.cpus and hasattr(os, "sched_setaffinity"):
        allowed = os.sched_getaffinity(0)
        cpus = set(rp.cpus) & allowed
        if cpus:
            os.sched_setaffinity(0, cpus)
        else:
            warnings.append(f"local rank {rp.local_rank}: planned CPUs {sorted(rp.cpus)} are "
                            f"outside this process's allowed CPUs {sorted(allowed)}; not pinned")
    for k, v in rp.env.items():
        if k not in user_env:
            environ[k] = v
    return warnings


def numactl_prefix(node: Optional[int], numactl: Optional[str] = None) -> tuple[list[str], str]:
    """``numactl --membind=N --`` when numactl is here and accepts the node, else ``[]``
    and why not."""
    if node is None:
        return [], "NUMA node unknown"
    exe = numactl or shutil.which("numactl")
    if exe is None:
        return [], "numactl not found"
    argv = [exe, f"--membind={node}", "--"]
    try:
        ok = subprocess.run([*argv, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return (argv, "") if ok else ([], f"`numactl --membind={node}` is refused here")


def rank_command(rp: Optional[RankPlan], args: Sequence[str], numactl: bool = True
                 ) -> tuple[list[str], list[str]]:
    """(argv to exec, warnings): ``[numactl --membind=N --] python ARGS``."""
    cmd = [sys.executable, *args]
    if rp is None or not numactl:
        return cmd, []
    prefix, why = numactl_prefix(rp.numa_node)
    if not why or (why == "numactl not found" and rp.local_rank != 0):  # said once
        return prefix + cmd, []
    return prefix + cmd, [f"local rank {rp.local_rank}: no memory binding ({why})"]


def applied() -> dict[str, object]:
    """What this process runs with: its rank, CPUs, memory nodes and the plan's
    variables (``terarec topo --applied`` prints it, e.g. under ``terarec-launch``)."""
    env = read_launch_env()
    mems = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Mems_allowed_list:"):
                mems = line.split(":", 1)[1].strip()
    except OSError:
        pass
    policies: set[str] = set()  # per mapping: default, bind:0, prefer:1, ...
    try:
        for line in Path("/proc/self/numa_maps").read_text().splitlines():
            parts = line.split()
            if len(parts) > 1:
                policies.add(parts[1])
    except OSError:
        pass
    keys = ("OMP_NUM_THREADS", "CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES", "NCCL_IB_HCA",
            "NCCL_SOCKET_IFNAME", "TERAREC_SSD_DIR", "TERAREC_FAST_GROUPS")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"rank": env.rank, "local_rank": env.local_rank, "cpus": cpus,
            "mems_allowed": mems, "mempolicy": sorted(policies),
            "env": {k: os.environ.get(k) for k in keys}}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m terarec.launch.bind",
                                description="Apply a topology plan to this rank, then run "
                                "`python ARGS`.")
    p.add_argument("--plan", required=True, help="the plan file terarec-launch wrote")
    p.add_argument("--no-numactl", action="store_true", help="no memory binding")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then python's arguments")
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if not args:
        p.error("give python's arguments after --, e.g. -- -m terarec.cli train ...")
    try:
        plan, user_env = read_plan_file(a.plan)
        env = read_launch_env()
    except (TopologyError, LaunchError) as e:
        print(f"terarec: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    warnings: list[str] = []
    rp: Optional[RankPlan] = None
    if env.local_rank < len(plan.ranks) and env.local_world_size == len(plan.ranks):
        rp = plan.ranks[env.local_rank]
        warnings += apply_rank(rp, user_env, os.environ)
    else:
        warnings.append(f"{env.describe()}: the plan is for {len(plan.ranks)} local ranks, "
                        f"not {env.local_world_size}; running unpinned")
    cmd, more = rank_command(rp, args, numactl=not a.no_numactl)
    for w in warnings + more:
        print(f"terarec: topology: warning: {w}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 1  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())


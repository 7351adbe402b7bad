"""``terarec-launch``: run ``terarec`` on many processes through torchrun.

terarec-launch [options] COMMAND [ARGS...]   runs ``terarec COMMAND ARGS...`` per rank::

    terarec-launch --nproc-per-node 8 train --config configs/big.yaml
    # two nodes, run on each (c10d rendezvous at node0:29400, elastic restarts):
    terarec-launch --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node0:29400 \\
        --max-restarts 3 train --config configs/big.yaml
    # a static two-node launch: torchrun's --master-addr/--master-port/--node-rank
    terarec-launch --nnodes 2 --node-rank 1 --master-addr node0 --master-port 29500 train ...
    terarec-launch --nproc-per-node 2 --probe          # check the launch, no training
    terarec-launch --nproc-per-node 8 --no-topology train ...   # no per-rank pinning

Underneath it is ``python -m terarec.launch.torchrun <torchrun options> -m terarec.cli
COMMAND ARGS...`` (``--dry-run`` prints it): torch's ``torch.distributed.run``, ending a
failed job with one line and the failed rank's exit code instead of a traceback
(``launch/torchrun.py``), so every torchrun behaviour holds: each rank
gets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``..., a failed rank stops the
others, ``--max-restarts`` restarts the whole group. ``mpirun -np N terarec train ...``
and Slurm's ``srun terarec train ...`` need no front end (docs/distributed.md).

Unless ``--no-topology``, the node is discovered first and every rank starts through
``terarec.launch.bind`` with the topology plan: its GPU (``CUDA_VISIBLE_DEVICES`` when the
ranks do not drive every GPU in order; planned for ``--nnodes`` and ``--backend``), CPU
cores, memory node (numactl), NIC and SSD directory environment, and fast groups
(docs/topology.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional

from terarec import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="terarec-launch",
        description="Run a terarec command on many processes (torchrun underneath).",
        epilog="Everything after the options is the terarec command, e.g. "
        "`train --config configs/quickstart.yaml`.",
    )
    p.add_argument("--version", action="version", version=f"terarec-launch {__version__}")
    p.add_argument("--nnodes", default="1",
                   help="nodes: N, or MIN:MAX for an elastic job (default 1)")
    p.add_argument("--nproc-per-node", default=None,
                   help="processes per node (default: the GPUs here, else 1)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank, for a static launch (--master-addr)")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="HOST[:PORT] of the c10d rendezvous, the same on every node")
    p.add_argument("--rdzv-backend", default="c10d", help="rendezvous backend (c10d)")
    p.add_argument("--rdzv-id", default="terarec",
                   help="job id, the same on every node of one job")
    p.add_argument("--master-addr", default=None, help="static launch: node 0's address")
    p.add_argument("--master-port", type=int, default=None, help="static launch: its port")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart the whole group up to N times after a failure")
    p.add_argument("--monitor-interval", type=float, default=None,
                   help="seconds between torchrun's checks of its workers")
    p.add_argument("--log-dir", default=None, help="torchrun's per-rank log directory")
    p.add_argument("--probe", action="store_true",
                   help="run `python -m terarec.launch.probe` (check the launch) instead")
    p.add_argument("--no-topology", action="store_true",
                   help="do not apply the topology plan (CPU cores, memory node, NIC, SSD "
                   "directory, fast groups per rank; see terarec-topo)")
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl",
                   help="the job's collective backend, for the topology plan: nccl (at most "
                   "one rank per GPU; default) or gloo (more ranks than GPUs share them)")
    p.add_argument("--topology", default=None, metavar="FILE",
                   help="plan for this saved machine (terarec-topo --json / --fixture) "
                   "instead of discovering the node")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the terarec command and its arguments")
    return p


def _default_nproc() -> str:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return str(n or 1)


def torchrun_command(args: argparse.Namespace, plan_file: Optional[str] = None) -> list[str]:
    """The ``python -m terarec.launch.torchrun ...`` argv for parsed ``args``; with a
    ``plan_file`` each rank starts through ``terarec.launch.bind``, which applies it.

    Raises:
        SystemExit: (via ``ValueError`` in :func:`main`) inconsistent options.
    """
    program = list(args.command)
    if program[:1] == ["--"]:
        program = program[1:]
    if not program and not args.probe:
        raise ValueError("give the terarec command to run, e.g. `train --config x.yaml`")
    multi = args.nnodes not in ("1", "1:1")
    static = args.master_addr is not None or args.master_port is not None
    if args.rdzv_endpoint and static:
        raise ValueError("--rdzv-endpoint and --master-addr/--master-port: pick one")
    if multi and not (args.rdzv_endpoint or static):
        raise ValueError(
            f"--nnodes {args.nnodes}: the nodes must meet somewhere: give --rdzv-endpoint "
            "HOST:PORT (or --master-addr/--master-port with --node-rank)"
        )
    if static and (args.master_addr is None or args.master_port is None):
        raise ValueError("a static launch needs both --master-addr and --master-port")
    if args.node_rank is not None and not static:
        raise ValueError("--node-rank is for a static launch (--master-addr); the c10d "
                         "rendezvous numbers the nodes itself")
    cmd = [sys.executable, "-m", "terarec.launch.torchrun",
           "--nnodes", args.nnodes,
           "--nproc-per-node", args.nproc_per_node or _default_nproc(),
           "--max-restarts", str(args.max_restarts)]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend", args.rdzv_backend, "--rdzv-endpoint", args.rdzv_endpoint,
                "--rdzv-id", args.rdzv_id]
    elif static:
        cmd += ["--master-addr", args.master_addr, "--master-port", str(args.master_port),
                "--node-rank", str(args.node_rank or 0)]
    else:
        cmd += ["--standalone"]
    if args.monitor_interval is not None:
        cmd += ["--monitor-interval", str(args.monitor_interval)]
    if args.log_dir:
        cmd += ["--log-dir", args.log_dir]
    if plan_file is not None:
        cmd += ["-m", "terarec.launch.bind", "--plan", plan_file, "--"]
    cmd += ["-m", "terarec.launch.probe" if args.probe else "terarec.cli", *program]
    return cmd


def _max_nodes(nnodes: str) -> int:
    """``--nnodes`` N or MIN:MAX -> the most nodes the job may have (1 if unreadable)."""
    last = str(nnodes).split(":")[-1]
    return int(last) if last.isdigit() and int(last) > 0 else 1


def _topology_plan(args: argparse.Namespace) -> Optional[str]:
    """Plans this node's ranks and writes the plan file (None: ``--no-topology``).

    Raises:
        ValueError: the machine or its tools' output cannot be read, or the plan fails.
    """
    from terarec.launch.bind import prepare_plan
    from terarec.topology.model import TopologyError
    from terarec.topology.plan import describe_rank

    if args.no_topology:
        return None
    if not str(args.nproc_per_node).isdigit():
        print(f"terarec-launch: --nproc-per-node {args.nproc_per_node}: no topology plan "
              "(give a number)", file=sys.stderr)
        return None
    try:
        plan, _, path = prepare_plan(int(args.nproc_per_node), args.topology, args.log_dir,
                                     backend=args.backend, nnodes=_max_nodes(args.nnodes))
    except TopologyError as e:
        raise ValueError(f"topology: {e} (--no-topology launches without a plan)") from None
    print(f"terarec-launch: topology plan {path}:", file=sys.stderr)
    for r in plan.ranks:
        print(f"  {describe_rank(r)}", file=sys.stderr)
    for f in plan.findings:
        print(f"  {f.level}: {f.text}", file=sys.stderr)
    return str(path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        torchrun_command(args)  # the options hang together before anything is discovered
        args.nproc_per_node = args.nproc_per_node or _default_nproc()
        cmd = torchrun_command(args, _topology_plan(args))
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # torchrun takes over: signals, exit status, restarts
    return 1  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())

"""Check a launch before training: ``python -m terarec.launch.probe`` under any launcher.

Every rank sets up the process groups exactly as training does, prints one JSON line
(rank, node, fast/cross group members, device, backend, launcher) and then runs
``--steps`` all-reduces on the world, fast and cross groups, checking each sum::

    mpirun -np 4 python -m terarec.launch.probe
    torchrun --nproc-per-node 2 -m terarec.launch.probe --steps 100
    terarec-launch --nproc-per-node 2 --probe

Exit status 0 when every check passed; 1 with a message naming the rank when a rank
failed, died or hung (``--timeout-s`` is ``dist.timeout_s``).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from terarec.config import ConfigError, DistConfig
from terarec.launch.env import LaunchError
from terarec.launch.groups import DistContext, init_distributed
from terarec.launch.health import PeerFailure


def _check(ctx: DistContext, group: dist.ProcessGroup, members: tuple[int, ...], what: str) -> None:
    t = torch.tensor([float(ctx.rank), 1.0], device=ctx.device)
    dist.all_reduce(t, group=group)
    want = [float(sum(members)), float(len(members))]
    if t.tolist() != want:
        raise RuntimeError(f"rank {ctx.rank}: {what} all-reduce gave {t.tolist()}, want {want}")


def probe(ctx: DistContext, steps: int, sleep_s: float) -> None:
    """Prints this rank's layout, then ``steps`` checked rounds of all-reduces."""
    with ctx.guard():
        _check(ctx, ctx.world, tuple(range(ctx.world_size)), "world")
        print(json.dumps({
            "rank": ctx.rank, "world_size": ctx.world_size,
            "local_rank": ctx.local_rank, "local_world_size": ctx.local_world_size,
            "node": ctx.node, "num_nodes": ctx.num_nodes,
            "fast_ranks": list(ctx.fast_ranks), "cross_ranks": list(ctx.cross_ranks),
            "device": str(ctx.device), "backend": ctx.backend,
            "launcher": ctx.env.launcher, "host": socket.gethostname(),
        }), flush=True)
        for _ in range(steps):
            _check(ctx, ctx.world, tuple(range(ctx.world_size)), "world")
            _check(ctx, ctx.fast_group, ctx.fast_ranks, "fast group")
            _check(ctx, ctx.cross_group, ctx.cross_ranks, "cross group")
            if sleep_s:
                time.sleep(sleep_s)
        dist.barrier()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m terarec.launch.probe", description=__doc__)
    p.add_argument("--steps", type=int, default=3, help="rounds of checked all-reduces")
    p.add_argument("--sleep-s", type=float, default=0.0, help="pause after each round")
    p.add_argument("--timeout-s", type=float, default=DistConfig.timeout_s,
                   help="dist.timeout_s: the longest a rank waits for another")
    p.add_argument("--backend", default="auto", help="dist.backend: auto | nccl | gloo")
    p.add_argument("--device", default="auto", help="train.device: auto | cpu | cuda")
    args = p.parse_args(argv)
    try:
        cfg = DistConfig(backend=args.backend, timeout_s=args.timeout_s)
    except ValueError as e:
        print(f"probe: {e}", file=sys.stderr)
        return 2
    try:
        with init_distributed(cfg, device=args.device) as ctx:
            probe(ctx, args.steps, args.sleep_s)
    except (PeerFailure, LaunchError, ConfigError) as e:
        print(f"terarec: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

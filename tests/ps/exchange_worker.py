"""One rank of the sharded-exchange tests: ``python exchange_worker.py OUT_DIR SPEC_JSON``.

Started with torchrun's variables (``tests/launch/launch_helpers.torchrun_env``), nodes
of 2 ranks, so ``init_distributed`` builds fast groups ``{0,1}, {2,3}`` and cross groups
``{0,2}, {1,3}``. SPEC is a list of runs ``{"name", "opt", "mode", "prefetch"}``:

* ``world``: one shard group of every rank (the global batch split over all of them);
* ``fast``: each fast group is its own 2-rank shard group training its own data (data
  seed ``100 + node``), replicas passed but ``sync_replicas=False``: nothing is combined
  across the groups;
* ``replicas``: 2 fast groups x 2, replica sync on, the global batch split over all 4
  ranks, the dense head averaged over the world (k = 1);
* ``solo``: shard groups of one rank, every rank a replica of the others (sync on): the
  trainer's layout for nodes of one GPU.

Writes ``OUT_DIR/<name>/rank<r>.pt``: losses, this rank's rows, its tier stats.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from terarec.config import DistConfig
from terarec.launch import init_distributed
from tests.ps import exchange_common as ec


def main() -> int:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    with init_distributed(DistConfig(timeout_s=60.0), device="cpu", monitor=False) as ctx:
        world = dist.group.WORLD
        # prefetch groups: same members, their own communicator (every rank creates each)
        pre_world = dist.new_group(list(range(ctx.world_size)))
        pre_fast = [
            dist.new_group([2 * n, 2 * n + 1]) for n in range(ctx.world_size // 2)
        ][ctx.node]
        solo = [dist.new_group([r]) for r in range(ctx.world_size)][ctx.rank]
        for run in spec:
            mode = run["mode"]
            if mode == "world":
                shard, replica, sync, pre = world, None, True, pre_world
                parts, index, dense, seed = ctx.world_size, ctx.rank, world, 100
            elif mode == "fast":
                shard, replica, sync, pre = ctx.fast_group, ctx.cross_group, False, pre_fast
                parts, index, dense = ctx.local_world_size, ctx.local_rank, ctx.fast_group
                seed = 100 + ctx.node
            elif mode == "solo":
                shard, replica, sync, pre = solo, world, True, None
                parts, index, dense, seed = ctx.world_size, ctx.rank, world, 100
            else:
                shard, replica, sync, pre = ctx.fast_group, ctx.cross_group, True, pre_fast
                parts, index, dense, seed = ctx.world_size, ctx.rank, world, 100
            ssd = out / run["name"] / f"ssd{ctx.rank}"
            ebc, head, store = ec.build(
                run["opt"], ssd, process_group=shard, replica_group=replica,
                sync_replicas=sync, prefetch_group=pre if run.get("prefetch") else None,
            )
            model = DistributedDataParallel(head, process_group=dense)
            losses = ec.train(ebc, model, seed, parts, index, prefetch=run.get("prefetch", False),
                              loss_group=dense)
            pooled = ec.eval_pooled(ebc, seed, parts, index)
            result = {"losses": losses, "rows": ec.rows_of(ebc), "stats": ebc.table_stats(),
                      "eval": pooled}
            torch.save(result, out / run["name"] / f"rank{ctx.rank}.pt")
            store.close()
            dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

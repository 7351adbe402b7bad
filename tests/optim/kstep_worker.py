"""One replica of the k-step merge tests: ``python kstep_worker.py OUT_DIR SCENARIOS_JSON``.

Each process is a node of its own (fast group of one; the cross group holds every
rank), set up by ``terarec.launch.init_distributed`` from torchrun-style variables. For
every scenario it trains a one-feature table for a fixed per-rank schedule of keys with
a loss whose row gradients are known (``loss = sum_b pooled_b . w_rank``: each
occurrence of a key adds ``w_rank`` to its gradient) and a 3-float dense parameter with
a constant gradient per rank, merging with :class:`KStepMerger`; then it writes the rows
of every key and the dense parameter to ``OUT_DIR/<scenario>-rank<r>.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import (
    DistConfig,
    InitConfig,
    SparseOptimConfig,
    SyncConfig,
    TableConfig,
)
from terarec.launch import init_distributed
from terarec.optim.kstep import KStepMerger
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.ssd import SSDStore

# keys of each training step, per rank (rows touched by some replicas only)
SCHEDULE = {
    0: [[1, 2], [2, 3], [1], [6]],
    1: [[2], [4], [1, 4], [2]],
    2: [[5], [5, 6], [7], [5]],
}
# ... and one where replica 2 trains nothing for a whole merge window (steps 3-4): its
# message is empty (no rows), the others' rows still reach it
GAP_SCHEDULE = {0: SCHEDULE[0], 1: SCHEDULE[1], 2: [[5], [5, 6], [], []]}
SCHEDULES = {"default": SCHEDULE, "gap": GAP_SCHEDULE}
ALL_KEYS = list(range(1, 9))
DIM = 2


def row_grad_weight(rank: int) -> torch.Tensor:
    return torch.tensor([1.0 + rank, -(0.5 + rank)])


def dense_grad(rank: int) -> torch.Tensor:
    return torch.tensor([0.1 * (rank + 1), -0.2, 0.05 * rank])


def run(sc: dict, rank: int, ctx, out: Path) -> None:  # noqa: ANN001 - DistContext
    tiered = sc["tiered"]
    table = TableConfig(
        name="t", dim=DIM, init=InitConfig(kind="uniform", scale=0.5),
        device_rows=sc.get("device_rows", 2) if tiered else None,
        host_rows=2 if tiered else None,
    )
    store = SSDStore(out / f"ssd-{sc['name']}-rank{rank}") if tiered else None
    opt = SparseOptimConfig(kind=sc.get("sparse_opt", "adagrad"), lr=0.1)
    groups = {}
    if sc.get("sharded"):  # through the exchange: a shard group of one, replicas across
        groups = {"process_group": ctx.fast_group, "replica_group": ctx.cross_group}
    ebc = HierarchicalEmbeddingBagCollection([table], ["f"], opt, seed=5, ssd_store=store,
                                             **groups)
    dense = nn.Parameter(torch.tensor([0.3, -0.1, 0.2]))
    dense_opt = torch.optim.Adam([dense], lr=0.01)
    cfg = SyncConfig(**sc["sync"])
    merger = KStepMerger(cfg, [dense], dense_opt, ebc.groups, ctx.cross_group,
                         len(ctx.cross_ranks), ebc)
    w = row_grad_weight(rank)
    for step, keys in enumerate(SCHEDULES[sc.get("schedule", "default")][rank], start=1):
        if keys:  # no keys: this replica trains no rows this step (the dense part still)
            kjt = KeyedJaggedTensor.from_lengths_sync(
                ["f"], torch.tensor(keys), torch.ones(len(keys), dtype=torch.int64)
            )
            pooled = ebc(kjt).values()  # [B, DIM]: one key per bag
            (pooled * w).sum().backward()  # the row optimizer steps here
        dense.grad = dense_grad(rank).clone()
        merger.before_optimizer_step()
        dense_opt.step()
        merger.after_optimizer_step(step)
    merger.finish()
    merger.finish()  # idempotent
    keys = torch.tensor(ALL_KEYS)
    rows, found = ebc.tables[0].lookup(keys), None
    _, found = ebc.groups[0].lookup_rows(keys, torch.zeros_like(keys))
    torch.save(
        {"rows": rows, "found": found, "dense": dense.detach().clone(),
         "stats": merger.stats(), "dense_state": {k: v for k, v in
                                                  dense_opt.state[dense].items()}},
        out / f"{sc['name']}-rank{rank}.pt",
    )
    if store is not None:
        store.close()


def main() -> int:
    out, scenarios = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    with init_distributed(DistConfig(timeout_s=60.0), device="cpu", monitor=False) as ctx:
        assert ctx.local_world_size == 1 and len(ctx.cross_ranks) == ctx.world_size
        with ctx.guard():
            for sc in scenarios:
                run(sc, ctx.rank, ctx, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

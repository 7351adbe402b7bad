"""One rank of the layout-check test: ``python layout_worker.py OUT_DIR SPEC_JSON``.

Started with torchrun's variables, nodes of 2 ranks (fast groups ``{0,1}, {2,3}``,
cross groups ``{0,2}, {1,3}``). SPEC is a list of cases ``{"name", "dims"}``: ``dims``
maps a global rank to the dims of its tables (default ``[4]``). For each case every rank
builds a sharded collection over its fast group with its cross group as replicas and
writes ``OUT_DIR/<name>/rank<r>.txt``: ``ok`` or the ValueError's message. Any other
exception (a broken collective, a timeout) ends the process with a traceback; a barrier
after each case shows no rank was left behind in a collective.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from terarec.config import DistConfig, SparseOptimConfig, TableConfig
from terarec.launch import init_distributed
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection


def main() -> int:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    timeout = float(sys.argv[3])
    torch.set_num_threads(1)
    with init_distributed(DistConfig(timeout_s=timeout), device="cpu", monitor=False) as ctx:
        for case in spec:
            dims = case["dims"].get(str(ctx.rank), [4])
            tables = [TableConfig(name=f"t{i}", dim=d, features=[f"f{i}"])
                      for i, d in enumerate(dims)]
            try:
                HierarchicalEmbeddingBagCollection(
                    tables, [f"f{i}" for i in range(len(dims))], SparseOptimConfig(),
                    process_group=ctx.fast_group, replica_group=ctx.cross_group,
                )
                result = "ok"
            except ValueError as e:
                result = str(e)
            (out / case["name"]).mkdir(parents=True, exist_ok=True)
            (out / case["name"] / f"rank{ctx.rank}.txt").write_text(result)
            dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

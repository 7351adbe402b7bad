"""The sharded embedding exchange against the local lookup, in the same run.

For each world size in ``--ranks`` (default 1,2,4), that many processes (gloo on CPU,
NCCL on CUDA, one GPU each) each train ``--steps`` batches of their own (``--batch``
samples x ``--features`` ids, log-uniform over ``--vocab`` ids: a skewed, repeating
stream) through one ``HierarchicalEmbeddingBagCollection`` table of ``--dim``:

* **local**: ``process_group=None``, every rank alone with a full table (the baseline:
  the single-rank path, run by all ranks at once so they share the machine the same way);
* **sharded**: ``process_group`` = all the ranks: keys go to their owners and rows come
  back (counts, keys, rows all-to-alls), gradients go to the owners (one more).

Both time forward (lookup + pooling) and backward (row update, through the exchange for
the sharded run) after a warm-up pass over the same batches (rows exist: the steady
state); the two take turns for ``--repeats`` passes and each keeps its best pass (the
median step of a pass; a shared machine's noise hits both alike). Printed per world size:
median ms per step, ids/s per rank and in total, and the ratio sharded / local
(the exchange's cost: 1.0 = free). ``cpu`` columns: the rank's process CPU time per step
(``time.process_time``, the median rank), which waiting on a descheduled peer does not
inflate: on an oversubscribed CPU machine it is the exchange's own compute cost, and
``cpu ratio`` = local / sharded CPU time per step.

Then (``--check-steps``, default 8; 0 = off) an equivalence check on the same device and
backend: sharded training over all ranks vs one process on the same global batches,
losses and final rows (weights + optimizer state) within 1e-5 (see ``_check``).

    python3 benchmarks/exchange_bench.py [--ranks 1,2,4] [--json]
    # GPUs (torch ops only on CUDA: no fbgemm CUDA kernels needed):
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/exchange_bench.py \\
        --device cuda --backend nccl --ranks 1,2 --batch 16384 --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _batches(args: argparse.Namespace, rank: int, device: torch.device) -> list[KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    feats = [f"f{i}" for i in range(args.features)]
    out = []
    for _ in range(args.steps):
        n = args.batch * args.features
        ids = (float(args.vocab) ** torch.rand(n, generator=g, dtype=torch.float64)).long()
        lengths = torch.ones(n, dtype=torch.int64)
        offsets = torch.arange(n + 1, dtype=torch.int64)
        out.append(KeyedJaggedTensor(feats, ids.to(device), lengths=lengths.to(device),
                                     offsets=offsets.to(device)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pass(ebc: HierarchicalEmbeddingBagCollection, batches: list[KeyedJaggedTensor],
          head: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Median forward / backward / step seconds of one pass over ``batches``."""
    fwd, bwd, step, cpu = [], [], [], []
    for kjt in batches:
        _sync(device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        pooled = ebc(kjt).values()
        _sync(device)
        t1 = time.perf_counter()
        (pooled * head).sum().backward()
        _sync(device)
        t2 = time.perf_counter()
        cpu.append(time.process_time() - c0)
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        step.append(t2 - t0)
    return {"fwd_s": statistics.median(fwd), "bwd_s": statistics.median(bwd),
            "step_s": statistics.median(step), "cpu_s": statistics.median(cpu)}


def _check(args: argparse.Namespace, rank: int, world: int,
           device: torch.device) -> dict[str, Any]:
    """Sharded training over every rank vs one process on the global batch (rank 0).

    ``--check-steps`` global batches of ``world x --check-batch`` samples (ids over
    ``--check-vocab``), each rank training its slice through the exchange with the loss
    ``world / B x sum(tanh(pooled) * head)``; rank 0 then trains one local collection on
    the whole global batches (loss ``1 / B x sum(...)``). Returns the largest difference
    of the per-step losses and of the final rows (weights + optimizer state, per key,
    gathered from the owners) on rank 0; ``ok`` when both are within 1e-5 (relative for
    the losses)."""
    feats = [f"f{i}" for i in range(args.features)]
    table = TableConfig(name="t", dim=args.dim, features=None)
    opt = SparseOptimConfig(kind=args.optimizer, lr=0.01)
    b, big = args.check_batch, args.check_batch * world
    g = torch.Generator().manual_seed(7)
    data = []
    for _ in range(args.check_steps):
        ids = torch.randint(0, args.check_vocab, (args.features, big), generator=g)
        head = torch.randn(big, args.features * args.dim, generator=g)
        data.append((ids, head))

    def kjt(ids: torch.Tensor) -> KeyedJaggedTensor:
        n = ids.numel()
        return KeyedJaggedTensor(feats, ids.reshape(-1).to(device),
                                 lengths=torch.ones(n, dtype=torch.int64, device=device),
                                 offsets=torch.arange(n + 1, device=device))

    def train(ebc: HierarchicalEmbeddingBagCollection, lo: int, hi: int,
              scale: float) -> list[float]:
        losses = []
        for ids, head in data:
            pooled = ebc(kjt(ids[:, lo:hi].contiguous())).values()
            total = (torch.tanh(pooled) * head[lo:hi].to(device)).sum()
            (total * scale).backward()
            seen = total.detach().reshape(1)
            if hi - lo < big:
                dist.all_reduce(seen)
            losses.append(float(seen) / big)
        return losses

    sharded = HierarchicalEmbeddingBagCollection([table], feats, opt, device=device, seed=3,
                                                 process_group=dist.group.WORLD)
    losses = train(sharded, rank * b, (rank + 1) * b, world / big)
    st = sharded.tables_state_dict()["t"]
    shards: list[Any] = [None] * world
    dist.all_gather_object(shards, (st["keys"].cpu(), st["rows"].cpu()))
    if rank != 0:
        return {}
    local = HierarchicalEmbeddingBagCollection([table], feats, opt, device=device, seed=3)
    want = train(local, 0, big, 1.0 / big)
    ref = local.tables_state_dict()["t"]
    keys = torch.cat([k for k, _ in shards])
    rows = torch.cat([r for _, r in shards])
    order, ref_order = torch.argsort(keys), torch.argsort(ref["keys"].cpu())
    same_keys = bool(torch.equal(keys[order], ref["keys"].cpu()[ref_order]))
    row_diff = float((rows[order] - ref["rows"].cpu()[ref_order]).abs().max()) \
        if same_keys else float("inf")
    loss_diff = max(abs(a - w) / max(1.0, abs(w)) for a, w in zip(losses, want))
    return {"steps": args.check_steps, "rows": int(keys.numel()), "same_keys": same_keys,
            "max_row_diff": row_diff, "max_loss_diff": loss_diff,
            "ok": same_keys and row_diff <= 1e-5 and loss_diff <= 1e-5}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    kwargs: dict[str, Any] = {}
    if args.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, **kwargs)
    try:
        batches = _batches(args, rank, device)
        feats = [f"f{i}" for i in range(args.features)]
        table = TableConfig(name="t", dim=args.dim, features=None)
        opt = SparseOptimConfig(kind=args.optimizer, lr=0.01)
        head = torch.randn(args.batch, args.features * args.dim, device=device)
        ebcs = {
            mode: HierarchicalEmbeddingBagCollection(
                [table], feats, opt, device=device, seed=1,
                process_group=dist.group.WORLD if mode == "sharded" else None,
            )
            for mode in ("local", "sharded")
        }
        out: dict[str, dict[str, float]] = {}
        # a warm-up pass (rows created), then the two in turn, the best pass of each
        for rep in range(args.repeats + 1):
            for mode, ebc in ebcs.items():
                dist.barrier()
                got = _pass(ebc, batches, head, device)
                if rep and (mode not in out or got["step_s"] < out[mode]["step_s"]):
                    out[mode] = got
        for mode, ebc in ebcs.items():
            out[mode]["rows"] = sum(ebc.num_rows().values())
        if args.check_steps:
            out["check"] = _check(args, rank, world, device)  # type: ignore[assignment]
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def bench(args: argparse.Namespace, world: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), args, queue), nprocs=world,
                       start_method="spawn")
    per_rank = dict(queue.get() for _ in range(world))
    ids = args.batch * args.features
    res: dict[str, Any] = {"ranks": world, "ids_per_rank_step": ids}
    for mode in ("local", "sharded"):
        step = statistics.median(per_rank[r][mode]["step_s"] for r in range(world))
        res[mode] = {
            "step_ms": 1e3 * step,
            "fwd_ms": 1e3 * statistics.median(per_rank[r][mode]["fwd_s"] for r in range(world)),
            "bwd_ms": 1e3 * statistics.median(per_rank[r][mode]["bwd_s"] for r in range(world)),
            "cpu_ms": 1e3 * statistics.median(per_rank[r][mode]["cpu_s"] for r in range(world)),
            "ids_per_s_rank": ids / step,
            "ids_per_s_total": world * ids / step,
            "rows_per_rank": [per_rank[r][mode]["rows"] for r in range(world)],
        }
    res["ratio"] = res["sharded"]["ids_per_s_total"] / res["local"]["ids_per_s_total"]
    res["cpu_ratio"] = res["local"]["cpu_ms"] / res["sharded"]["cpu_ms"]
    if args.check_steps:
        res["check"] = per_rank[0]["check"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="1,2,4", help="world sizes, comma separated")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                    help="default: nccl on cuda, gloo on cpu")
    ap.add_argument("--batch", type=int, default=1024, help="samples per rank and step")
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=10**6)
    ap.add_argument("--steps", type=int, default=20, help="batches (timed after a warm-up pass)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed passes of each mode, in turn (the best one counts)")
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--check-steps", type=int, default=8,
                    help="equivalence check: steps of sharded vs one-process training (0: off)")
    ap.add_argument("--check-batch", type=int, default=256, help="check: samples per rank")
    ap.add_argument("--check-vocab", type=int, default=20_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    worlds = [int(x) for x in args.ranks.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        raise SystemExit(f"--ranks {args.ranks}: only {torch.cuda.device_count()} GPUs here")
    load_start = os.getloadavg()[0]
    results = [bench(args, w) for w in worlds]
    load = {"start": load_start, "end": os.getloadavg()[0], "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps({"device": args.device, "backend": args.backend,
                          "args": vars(args), "load_avg_1m": load, "results": results}))
        return
    print(f"{args.device}/{args.backend}: {args.batch} x {args.features} ids per rank and "
          f"step, dim {args.dim}, {args.optimizer}, vocab {args.vocab}")
    print(f"{'ranks':>5} {'local ms':>9} {'shard ms':>9} {'fwd ms':>7} {'bwd ms':>7} "
          f"{'local Mid/s':>12} {'shard Mid/s':>12} {'ratio':>6} {'local cpu':>9} "
          f"{'shard cpu':>9} {'cpu ratio':>9}")
    for r in results:
        lo, sh = r["local"], r["sharded"]
        print(f"{r['ranks']:>5} {lo['step_ms']:>9.2f} {sh['step_ms']:>9.2f} "
              f"{sh['fwd_ms']:>7.2f} {sh['bwd_ms']:>7.2f} {lo['ids_per_s_total'] / 1e6:>12.2f} "
              f"{sh['ids_per_s_total'] / 1e6:>12.2f} {r['ratio']:>6.2f} "
              f"{lo['cpu_ms']:>9.2f} {sh['cpu_ms']:>9.2f} {r['cpu_ratio']:>9.2f}")
    for r in results:
        if "check" in r:
            c = r["check"]
            print(f"check {r['ranks']} ranks vs one process, {c['steps']} steps, {c['rows']} "
                  f"rows: max row diff {c['max_row_diff']:.2e}, max loss diff "
                  f"{c['max_loss_diff']:.2e} -> {'OK' if c['ok'] else 'FAILED'}")
    print(f"load average (1 min) {load['start']:.1f} at start, {load['end']:.1f} at end, "
          f"{load['cpus']} CPUs")


if __name__ == "__main__":
    main()

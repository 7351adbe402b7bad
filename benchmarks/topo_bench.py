"""What topology placement buys on this machine, measured: host->device staging and
loader work with CPU affinity on vs off. Ratios are same-run; absolute rates move with
neighbours' load.

1. **staging**: host-tier-sized row batches (``--batch-rows`` rows of ``--dim`` fp32
   gathered from a ``--table-rows`` host table by random ids) copied to the GPU through a
   pageable buffer (a fresh gather, then ``.to(device)``) vs a preallocated pinned one
   (``index_select(out=pinned)``, then a non-blocking copy); also the bare copies (the
   link's floor). Without CUDA only the gathers are timed (fresh vs preallocated buffer).
2. **affinity**: ``--ranks`` loader processes at once (default: one per GPU, at least 2),
   each making batches (random keys, hash, ``unique``, gather rows, copy to its GPU when
   there is one) with the plan's thread count, pinned to the plan's cores (on) or free on
   every CPU (off); runs alternate on/off/off/on; reports batches/s summed over ranks.

    python benchmarks/topo_bench.py [--device auto|cpu|cuda] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from terarec.topology.discover import discover  # noqa: E402
from terarec.topology.plan import make_plan  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs after two warm-ups."""
    for _ in range(2):
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def staging(device: torch.device, table_rows: int, batch_rows: int, dim: int,
            iters: int) -> dict[str, Any]:
    """Pageable vs pinned staging of one batch of rows; GB/s of the batch's bytes."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(table_rows, dim, generator=g)
    ids = torch.randint(0, table_rows, (batch_rows,), generator=g).unique()
    nbytes = ids.numel() * dim * 4
    res: dict[str, Any] = {"rows": int(ids.numel()), "dim": dim, "batch_mb": nbytes / 1e6,
                           "table_mb": table.numel() * 4 / 1e6}
    cuda = device.type == "cuda"
    buf = torch.empty(ids.numel(), dim, pin_memory=cuda)
    times = {
        "gather_fresh": _time(lambda: table.index_select(0, ids), device, iters),
        "gather_prealloc": _time(lambda: torch.index_select(table, 0, ids, out=buf), device,
                                 iters),
    }
    if cuda:
        dst = torch.empty(ids.numel(), dim, device=device)
        pageable = torch.empty(ids.numel(), dim)
        times["copy_pageable"] = _time(lambda: dst.copy_(pageable), device, iters)
        times["copy_pinned"] = _time(lambda: dst.copy_(buf, non_blocking=True), device, iters)
        times["stage_pageable"] = _time(
            lambda: table.index_select(0, ids).to(device), device, iters)

        def pinned_stage() -> None:
            torch.index_select(table, 0, ids, out=buf)
            dst.copy_(buf, non_blocking=True)

        times["stage_pinned"] = _time(pinned_stage, device, iters)
    res["seconds"] = times
    res["gb_s"] = {k: nbytes / v / 1e9 for k, v in times.items()}
    if cuda:
        res["pinned_over_pageable"] = times["stage_pageable"] / times["stage_pinned"]
        res["copy_pinned_over_pageable"] = times["copy_pageable"] / times["copy_pinned"]
    res["prealloc_over_fresh_gather"] = times["gather_fresh"] / times["gather_prealloc"]
    return res


# ------------------------------------------------------------------------- affinity


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One loader rank: batches for ``seconds`` (after a warm-up), pinned or not."""
    if spec["cpus"] is not None:
        os.sched_setaffinity(0, set(spec["cpus"]))
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    g = torch.Generator().manual_seed(spec["rank"])
    table = torch.randn(spec["table_rows"], spec["dim"], generator=g)
    n = spec["batch"] * spec["features"]
    cuda = device.type == "cuda"
    buf = torch.empty(n, spec["dim"], pin_memory=cuda)

    def one() -> None:
        keys = torch.randint(0, 1 << 40, (n,), generator=g)
        h = (keys * 0x9E3779B97F4A7C15) ^ (keys >> 31)  # a multiplicative hash
        uniq, inverse = torch.unique(h % spec["table_rows"], return_inverse=True)
        rows = buf[: uniq.numel()]
        torch.index_select(table, 0, uniq, out=rows)
        if cuda:
            rows.to(device, non_blocking=True)
            torch.cuda.synchronize(device)
        inverse.sum()

    for _ in range(2):
        one()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < spec["seconds"]:
        one()
        done += 1
    el = time.perf_counter() - t0
    return {"rank": spec["rank"], "batches": done, "seconds": el,
            "cpus": sorted(os.sched_getaffinity(0))}


def _run_ranks(specs: list[dict[str, Any]]) -> float:
    """Starts every rank at once; returns batches/s summed over ranks."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(s)],
                              stdout=subprocess.PIPE, env=env, text=True) for s in specs]
    total = 0.0
    try:
        for rank, p in enumerate(procs):
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"loader rank {rank} exited {p.returncode}")
            r = json.loads(out.strip().splitlines()[-1])
            total += r["batches"] / r["seconds"]
    finally:  # a failed or timed-out rank: the others are not left running
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return total


def affinity(device: torch.device, ranks: Optional[int], seconds: float, repeats: int,
             batch: int, table_rows: int) -> dict[str, Any]:
    machine = discover()
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    ranks = ranks or max(2, n_gpu)
    m = machine if 0 < ranks <= len(machine.gpus) else dataclasses.replace(
        machine, gpus=[], gpu_links=[], gpu_nic_links=[])
    plan = make_plan(m, ranks)
    base = {"seconds": seconds, "batch": batch, "features": 26, "dim": 64,
            "table_rows": table_rows}
    specs = {
        mode: [{**base, "rank": r.local_rank, "threads": r.omp_threads,
                "cpus": r.cpus if mode == "on" else None,
                "device": f"cuda:{r.local_rank % n_gpu}" if n_gpu else "cpu"}
               for r in plan.ranks]
        for mode in ("on", "off")
    }
    rates: dict[str, list[float]] = {"on": [], "off": []}
    order = ["on", "off", "off", "on"] * repeats
    for mode in order[: 2 * repeats]:
        rates[mode].append(_run_ranks(specs[mode]))
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"ranks": ranks, "plan_cpus": [r.cpus for r in plan.ranks],
            "threads": [r.omp_threads for r in plan.ranks], "numa_nodes": len(machine.numa),
            "batches_per_s": rates, "on_over_off": on / off if off else None}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--table-rows", type=int, default=None,
                    help="host table rows (default 2M with CUDA, 200k on CPU)")
    ap.add_argument("--batch-rows", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=None, help="loader ranks (default GPUs, >= 2)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per loader run")
    ap.add_argument("--repeats", type=int, default=2, help="on/off pairs")
    ap.add_argument("--loader-batch", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return {}
    want = args.device
    if want == "cuda" and not torch.cuda.is_available():
        raise SystemExit("topo_bench: --device cuda but CUDA is not available")
    device = torch.device("cuda" if want in ("auto", "cuda") and torch.cuda.is_available()
                          else "cpu")
    rows = args.table_rows or (2_000_000 if device.type == "cuda" else 200_000)
    if args.quick:
        rows, args.batch_rows, args.iters = 20_000, 2048, 3
        args.seconds, args.repeats, args.loader_batch = 0.3, 1, 256
    out: dict[str, Any] = {"device": str(device),
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                           else None, "cpus": len(os.sched_getaffinity(0))}
    out["staging"] = staging(device, rows, args.batch_rows, args.dim, args.iters)
    out["affinity"] = affinity(device, args.ranks, args.seconds, args.repeats,
                               args.loader_batch, max(rows // 10, 1000))
    if args.json:
        print(json.dumps(out))
        return out
    s, a = out["staging"], out["affinity"]
    print(f"device {out['device']} {out['gpu'] or ''} ({out['cpus']} CPUs)")
    print(f"staging {s['rows']} rows x {s['dim']} fp32 = {s['batch_mb']:.1f} MB per batch "
          f"from a {s['table_mb']:.0f} MB host table (GB/s of the batch's bytes):")
    for k, v in s["gb_s"].items():
        print(f"  {k:16s} {v:8.2f} GB/s  ({s['seconds'][k] * 1e3:.2f} ms)")
    if "pinned_over_pageable" in s:
        print(f"  pinned / pageable staging: {s['pinned_over_pageable']:.2f}x   "
              f"(bare copies: {s['copy_pinned_over_pageable']:.2f}x)")
    else:
        print("  no CUDA: host->device copies not measured")
    print(f"  preallocated / fresh gather buffer: {s['prealloc_over_fresh_gather']:.2f}x")
    print(f"affinity: {a['ranks']} loader ranks, threads {a['threads']}, plan cpus "
          f"{a['plan_cpus']} ({a['numa_nodes']} NUMA node(s)); batches/s summed over ranks:")
    print(f"  on  {a['batches_per_s']['on']}")
    print(f"  off {a['batches_per_s']['off']}")
    print(f"  on / off (medians): {a['on_over_off']:.2f}x")
    return out


if __name__ == "__main__":
    main()

"""Device-tier benchmarks (run on a GPU; ``--device cpu`` runs tiny sizes as a smoke test).

Three parts, each with its same-run baseline and, for the GPU, the bytes the work must
move at the least and the time that floor gives at ``--bandwidth`` bytes/s:

* **check**: the triton hash kernels against the torch reference backend on the same
  keys (identical key -> slot maps), and a tiered table on the device (a device cache of
  ``--check-device-rows`` rows over the host tier) trained ``--check-steps`` steps beside
  the unbounded in-memory table on the same device: losses and final rows must agree
  bit for bit (the same kernels in the same order; only the tiers differ).
* **index**: ``HashIndex.find_or_insert`` (the dense index) and the device tier's
  ``KeyMap`` (find, then upsert of the misses), triton vs the torch backend, on batches
  of ``--index-keys`` unique keys of which ``--new-frac`` are new, into a table holding
  ``--index-start`` keys. Floor: per key, the key read and the slot written (16 bytes)
  plus one 32-byte sector of the bucket table.
* **step**: one training step of the device tier (dedup, index lookup, gather of the
  rows, sum pooling, backward, fused Adam and scatter of the rows: terarec's
  ``HierarchicalEmbeddingBagCollection`` with a tiered table whose device tier holds all
  ``--rows``) against ``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SparseAdam`` on the
  same batch (``--batch`` samples x ``--features`` ids, uniform over ``--rows``, dim
  ``--dim``). Floor: ids read, every unique row (weights + Adam state) read and written
  once, every lookup's weights read, the pooled output written and its gradient read.

* **tables**: ``--tables`` tiered tables of one dim (the features split between them,
  each table's device tier holding its rows): the step of the batched group (one dedup,
  gather, pooling and optimizer launch; one chain per table) against the same tables
  each in a group of its own (``group_tables=False``), on the same batches, alternating
  step by step (``--table-rounds`` rounds, median).

    python benchmarks/ps_device_bench.py [--device cuda] [--parts check,index,step,tables]
        [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import InitConfig, SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.index import triton_hash
from terarec.ps.index.hash_index import HashIndex
from terarec.ps.index.key_map import KeyMap


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# -- check --------------------------------------------------------------------------------
def check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    res: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(-(2**62), 2**62, (200_000,), generator=g).unique()
    keys = keys[torch.randperm(keys.numel(), generator=g)].to(device)
    if triton_hash.available(device):
        a = HashIndex(device, capacity=1024, backend="triton")
        b = HashIndex(device, capacity=1024, backend="torch")
        for part in keys.split(30_000):
            sa, ia = a.find_or_insert(part)
            sb, ib = b.find_or_insert(part)
            # slot ids are dense in both but handed out in another order: compare maps
            assert torch.equal(ia, ib), "triton and torch disagree on which keys are new"
            assert torch.equal(a.keys()[sa], part) and torch.equal(b.keys()[sb], part)
        assert torch.equal(a.keys()[a.find(keys)], keys), "triton index lost keys"
        m = KeyMap(device, capacity=1024, backend="triton")
        ref = KeyMap(device, capacity=1024, backend="torch")
        vals = torch.arange(keys.numel(), device=device)
        for mp in (m, ref):
            mp.insert(keys[:150_000], vals[:150_000])
            mp.delete(keys[:50_000])
            mp.insert(keys[100_000:], vals[100_000:] * 2)
        assert torch.equal(m.find(keys), ref.find(keys)), "triton != torch key map"
        res["index_match"] = True
    feats = ["a", "b"]
    opt = SparseOptimConfig(kind="adam", lr=0.05)
    init = InitConfig(kind="uniform", scale=0.1)
    tiered = HierarchicalEmbeddingBagCollection(
        [TableConfig(name="t", dim=8, init=init, device_rows=args.check_device_rows)],
        feats, opt, device=device, seed=3,
    )
    # the unbounded table on the same device: the same kernels sum in the same order, so
    # any difference is the tiers' doing (a row lost or altered on its way down and up)
    plain = HierarchicalEmbeddingBagCollection(
        [TableConfig(name="t", dim=8, init=init)], feats, opt, device=device, seed=3
    )
    worst = 0.0
    for _ in range(args.check_steps):
        lengths = torch.randint(0, 5, (2 * 16,), generator=g)
        ids = torch.randint(0, 3000, (int(lengths.sum()),), generator=g) * 7919
        kjt = KeyedJaggedTensor.from_lengths_sync(feats, ids, lengths)
        kjt.offsets()
        losses = []
        for ebc, dev in ((tiered, device), (plain, device)):
            out = ebc(kjt.to(dev)).values()
            loss = (out * torch.arange(out.shape[1], device=dev)).sin().sum()
            loss.backward()
            losses.append(float(loss))
        worst = max(worst, abs(losses[0] - losses[1]) / max(1.0, abs(losses[1])))
    k1, r1 = tiered.tables[0].export()
    k2, r2 = plain.tables[0].export()
    o1, o2 = torch.argsort(k1), torch.argsort(k2)
    assert torch.equal(k1[o1], k2[o2]), "tiered table lost or invented keys"
    row_err = float((r1[o1] - r2[o2]).abs().max())
    assert worst == 0 and row_err == 0, (worst, row_err)  # bit for bit
    res.update(tiered_loss_rel_err=worst, tiered_row_err=row_err, tiered_rows=k1.numel())
    return res


# -- index --------------------------------------------------------------------------------
def _index_one(
    backend: str, args: argparse.Namespace, device: torch.device, universe: torch.Tensor
) -> dict[str, float]:
    n, start, reps = args.index_keys, args.index_start, args.reps
    n_new = int(n * args.new_frac)
    total = universe.numel()
    idx = HashIndex(device, capacity=int(2.2 * total), backend=backend)  # type: ignore[arg-type]
    idx.find_or_insert(universe[:start].unique())
    held = idx.keys()
    cursor = [start]

    def batch_of(new: torch.Tensor) -> torch.Tensor:
        old = held[torch.randint(0, held.numel(), (n - n_new,), device=device)].unique()
        batch = torch.cat([old, new])
        return batch[torch.randperm(batch.numel(), device=device)]

    def call() -> None:
        new = universe[cursor[0] : cursor[0] + n_new]
        cursor[0] += n_new
        idx.find_or_insert(batch_of(new))

    # the batch construction is inside the timed call: time it alone and subtract it
    t = timed(call, device, reps) - timed(lambda: batch_of(universe[:n_new]), device, reps)
    out = {f"hash_index_{backend}_keys_per_s": n / max(t, 1e-9)}
    # the device tier's map: find everything, upsert the misses with new slots
    km = KeyMap(device, capacity=int(2.2 * total), backend=backend)  # type: ignore[arg-type]
    base = universe[:start].unique()
    km.insert(base, torch.arange(base.numel(), device=device))
    probe = torch.cat([base[: n - n_new], universe[-n_new:]])
    probe = probe[torch.randperm(probe.numel(), device=device)]
    tf = timed(lambda: km.find(probe), device, reps)
    out[f"key_map_{backend}_find_keys_per_s"] = probe.numel() / tf

    def upsert() -> None:
        v = km.find(probe)
        miss = probe[v < 0]
        km.insert(miss, torch.arange(miss.numel(), device=device))
        km.delete(miss)

    tu = timed(upsert, device, reps)
    out[f"key_map_{backend}_find_upsert_delete_keys_per_s"] = probe.numel() / tu
    return out


def index_bench(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    n, start = args.index_keys, args.index_start
    n_new = int(n * args.new_frac)
    total = start + n_new * (args.reps + 2) * 2
    g = torch.Generator(device=device).manual_seed(1)
    universe = torch.randint(-(2**62), 2**62, (total,), device=device, generator=g)
    out: dict[str, Any] = {"keys_per_call": n, "new_frac": args.new_frac, "start_keys": start}
    backends = (["triton"] if triton_hash.available(device) else []) + ["torch"]
    for backend in backends:
        out.update(_index_one(backend, args, device, universe))
    if "hash_index_triton_keys_per_s" in out:
        out["triton_vs_torch_index"] = (
            out["hash_index_triton_keys_per_s"] / out["hash_index_torch_keys_per_s"]
        )
    floor_bytes = n * (16 + 32)
    out["index_floor_bytes"] = floor_bytes
    out["index_floor_s"] = floor_bytes / args.bandwidth
    return out


# -- step ---------------------------------------------------------------------------------
def _step_ours(
    args: argparse.Namespace,
    device: torch.device,
    feats: list[str],
    batches: list[Any],
    fused: bool,
) -> tuple[float, dict[str, float]]:
    rows, dim = args.rows, args.dim
    opt = SparseOptimConfig(kind="adam", lr=0.01)
    table = TableConfig(
        name="t", dim=dim, init=InitConfig(kind="uniform", scale=0.01), device_rows=rows + 1024
    )
    ebc = HierarchicalEmbeddingBagCollection([table], feats, opt, device=device, seed=0)
    group = ebc.groups[0]
    assert group.tiered
    group.fused = group.optimizer.fused_on(device, fused)  # triton kernel, or the torch path
    # make every row resident in the device tier first (untimed)
    for part in torch.arange(rows, device=device).split(1 << 21):  # bounded temporaries
        group.slots_for(part, torch.zeros_like(part))
    it = [0]

    def ours() -> None:
        kjt = batches[it[0] % len(batches)]
        it[0] += 1
        out = ebc(kjt).values()
        out.backward(torch.ones_like(out))

    t = timed(ours, device, args.reps)
    if args.sync_debug and fused and device.type == "cuda":
        # every host<->device sync of one step, with the Python line that caused it
        import warnings

        sites: dict[str, int] = {}
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours()
            torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                site = f"{w.filename}:{w.lineno}"
                sites[site] = sites.get(site, 0) + 1
        print("syncs per step:", sum(sites.values()), flush=True)
        for site, n in sorted(sites.items(), key=lambda x: -x[1]):
            print(f"  {n:3d}  {site}", flush=True)
    if args.profile and fused:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                ours()
            _sync(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
    return t, group.store.stats()


def _fused_available(device: torch.device) -> bool:
    from terarec.optim import triton_rows

    return triton_rows.available(device) and device.type == "cuda"


def step_bench(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    b, f, rows, dim = args.batch, args.features, args.rows, args.dim
    feats = [f"f{i}" for i in range(f)]
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(args.reps + 2):
        ids = torch.randint(0, rows, (b * f,), generator=g)
        lengths = torch.ones(b * f, dtype=torch.int64)
        kjt = KeyedJaggedTensor.from_lengths_sync(feats, ids, lengths)
        kjt.offsets()  # computed on CPU (torchrec's CUDA cumsum is FBGEMM's CUDA op)
        batches.append(kjt.to(device))
    fused_ok = _fused_available(device)
    t_ours, dev_stats = _step_ours(args, device, feats, batches, fused_ok)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t_unfused = t_ours
    if fused_ok:  # the same step with the torch row optimizer (gather, ~10 passes, scatter)
        t_unfused, _ = _step_ours(args, device, feats, batches, False)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    baseline: dict[str, Any] = {}
    it = [0]
    bag = nn.EmbeddingBag(rows, dim, mode="sum", sparse=True).to(device)
    sadam = torch.optim.SparseAdam(bag.parameters(), lr=0.01)

    def base() -> None:
        kjt = batches[it[0] % len(batches)]
        it[0] += 1
        vals = kjt.values()
        offsets = torch.arange(0, vals.numel(), device=device)  # one id per bag
        out = bag(vals, offsets)
        out.backward(torch.ones_like(out))
        sadam.step()
        sadam.zero_grad(set_to_none=True)

    t_base = timed(base, device, args.reps)
    n = b * f
    u = float(statistics.mean(int(k.values().unique().numel()) for k in batches[:3]))
    width = dim * 3  # weights + Adam's two moments
    floor = n * 8 + 2 * u * width * 4 + n * dim * 4 + 2 * b * f * dim * 4
    baseline.update(
        step_batch=b,
        step_features=f,
        step_rows=rows,
        step_dim=dim,
        step_unique_keys=u,
        step_terarec_s=t_ours,
        step_fused_row_optimizer=fused_ok,
        step_terarec_torch_optimizer_s=t_unfused,
        step_fused_speedup_over_torch_optimizer=t_unfused / t_ours,
        step_baseline_embeddingbag_sparseadam_s=t_base,
        step_speedup=t_base / t_ours,
        step_floor_bytes=floor,
        step_floor_s=floor / args.bandwidth,
        step_device_hits=dev_stats.get("device_hits", 0.0),
        step_device_misses=dev_stats.get("device_misses", 0.0),
    )
    return baseline


def tables_bench(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Batched group of ``--tables`` tiered tables vs one group per table (see above)."""
    n_tab, f, b = args.tables, args.features, args.batch
    feats = [f"f{i}" for i in range(f)]
    rows = args.rows // n_tab  # ids per table
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(8):
        ids = torch.randint(0, rows, (b * f,), generator=g)
        kjt = KeyedJaggedTensor.from_lengths_sync(feats, ids, torch.ones(b * f, dtype=torch.int64))
        kjt.offsets()
        batches.append(kjt.to(device))
    opt = SparseOptimConfig(kind="adam", lr=0.01)
    tables = [
        TableConfig(name=f"t{t}", dim=args.dim, features=feats[t::n_tab],
                    init=InitConfig(kind="uniform", scale=0.01), device_rows=rows + 1024)
        for t in range(n_tab)
    ]
    sides = {}
    for name, grouped in (("grouped", True), ("per_table", False)):
        ebc = HierarchicalEmbeddingBagCollection(
            tables, feats, opt, device=device, seed=0, group_tables=grouped
        )
        assert len(ebc.groups) == (1 if grouped else n_tab)
        sides[name] = ebc

    def step(ebc: HierarchicalEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> None:
        out = ebc(kjt).values()
        out.backward(torch.ones_like(out))

    for kjt in batches:  # every row created (untimed)
        for ebc in sides.values():
            step(ebc, kjt)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.table_rounds):
        for name, ebc in sides.items():  # alternating: load hits both alike
            _sync(device)
            t0 = time.perf_counter()
            for kjt in batches:
                step(ebc, kjt)
            _sync(device)
            times[name].append((time.perf_counter() - t0) / len(batches))
    t_grouped = statistics.median(times["grouped"])
    t_per = statistics.median(times["per_table"])
    return {
        "tables": n_tab,
        "tables_batch": b,
        "tables_grouped_step_s": t_grouped,
        "tables_per_table_step_s": t_per,
        "tables_grouped_speedup": t_per / t_grouped,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", default="check,index,step")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s (H100 ~3.0e12)")
    p.add_argument("--check-steps", type=int, default=60)
    p.add_argument("--check-device-rows", type=int, default=200)
    p.add_argument("--index-keys", type=int, default=4_000_000)
    p.add_argument("--index-start", type=int, default=16_000_000)
    p.add_argument("--new-frac", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--tables", type=int, default=4, help="tables part: tiered tables")
    p.add_argument("--table-rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of 3 steps")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: list the host<->device syncs of one step by source line")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res: dict[str, Any] = {"device": name}
    parts = args.parts.split(",")
    if "check" in parts:
        res.update(check(args, device))
    if "index" in parts:
        res.update(index_bench(args, device))
    if "step" in parts:
        res.update(step_bench(args, device))
    if "tables" in parts:
        res.update(tables_bench(args, device))
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:48s} {v:.4g}" if isinstance(v, float) else f"{k:48s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

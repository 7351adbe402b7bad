"""k-step Adam model merging across replicas vs fully synchronous training (docs/kstep.md).

R replicas (default 4), each a gloo process on CPU that is a node of its own (a fast
group of one rank; the cross group holds every rank), each reading its own shard of the
data, train the same model for the same number of steps with every ``sync:`` setting of
the grid: ``k = 1`` (fully synchronous: dense gradients all-reduced, rows' gradients
combined over the replicas by the embedding exchange every step) and ``k`` in
``--ks`` for every dense merge mode in ``--modes`` (rows merged as snapshot + mean of the
deltas). Per setting it reports the final AUC and logloss on the (rank-sharded, globally
computed) eval set, the cross-node bytes one replica sent (ring model, see
``optim/kstep.py``) per merge and per trained sample, and the training wall time, and the
ratios to ``k = 1`` measured in the same launch. The target: at ``k = 8`` AUC within
0.001 of ``k = 1`` with at most 1/7 of its bytes.

One launch of R processes per data set runs the whole grid (start-up paid once); rank 0
appends one JSON line per setting to ``<out>/<dataset>.jsonl`` as it goes. Then the
table (``<out>/table.md``), the JSON (``<out>/results.json``) and the plot
(``<out>/kstep.png``, if matplotlib is installed) are written.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/kstep.py [--datasets synthetic,frappe]
        [--ks 1,2,4,8,16,32,64] [--modes params,params+moments,diloco] [--replicas 4]
        [--synthetic-steps 480] [--frappe-steps 360] [--out docs/kstep]

Frappe (``../shared/data/frappe_validation.libfm``, or ``--frappe PATH``) is skipped
with a message when the file is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
FRAPPE = REPO.parent / "shared" / "data" / "frappe_validation.libfm"

# The data sets: the repo's configs with the overrides that size one replica's run.
DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {
        "config": "configs/quickstart.yaml",
        "sets": [
            "data.batch_size=256",  # per replica: global batch 1024
            "data.synthetic.eval_samples=32768",
            "data.prefetch_batches=2",
        ],
    },
    "frappe": {
        "config": "configs/frappe.yaml",
        "sets": [
            "data.batch_size=128",  # per replica: global batch 512 (the config's)
            "data.prefetch_batches=2",
        ],
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------- worker side
def _worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from terarec.config import DistConfig, SyncConfig, load_config
    from terarec.launch import init_distributed

    torch.set_num_threads(1)
    spec = DATASETS[args.dataset]
    sets = list(spec["sets"]) + list(args.sets)
    if args.dataset == "frappe":
        sets.append(f"data.path={json.dumps(args.frappe)}")
    cfg = load_config(REPO / spec["config"], sets)
    grid = json.loads(args.grid)
    out = Path(args.result)
    with init_distributed(DistConfig(timeout_s=600.0), device="cpu") as ctx:
        with ctx.guard():
            for item in grid:
                sync = SyncConfig(k=item["k"], dense=item["dense"], sparse=item["sparse"],
                                  sparse_dtype=item.get("dtype", "fp32"),
                                  dense_dtype=item.get("dense_dtype", "fp32"),
                                  warmup_steps=item.get("warmup", 0))
                variant = item.get("variant") or ("touching-mean" if item.get("diagnose")
                                                  else None)
                res = _run_one(cfg, sync, ctx, args.steps, variant, args.eval_every)
                if ctx.rank == 0:
                    res.update(dataset=args.dataset, **item)
                    with open(out, "a") as f:
                        f.write(json.dumps(res) + "\n")
                dist.barrier()
    return 0


def _variant_merger(variant: Optional[str]) -> type:
    """The merger class of a diagnostic ``variant`` (not the algorithm), or the real one:

    * ``touching-mean``: rows' deltas averaged over the replicas that touched them
      (instead of over all R, the others counting 0);
    * ``state-m`` / ``state-v``: the weights and only Adam's first (``m``) or second
      (``v``) moment of the rows merged (``delta+moments`` merges both);
    * ``reset-m``: ``delta``, and every replica zeroes Adam's first moment of every
      merged row (no bytes: a replica's own momentum no longer pushes a merged row)."""
    import torch

    from terarec.optim.kstep import KStepMerger

    if variant is None:
        return KStepMerger

    class Variant(KStepMerger):
        def _mean_delta(self, total: Any, touches: Any) -> Any:
            if variant == "touching-mean":
                return total / touches.unsqueeze(1)
            return total / self.size

        def _merged_columns(self, g: Any) -> Any:
            d = g.dim
            if variant == "state-m":
                return torch.arange(2 * d)
            if variant == "state-v":
                return torch.cat([torch.arange(d), torch.arange(2 * d, 3 * d)])
            return torch.arange(d)

        def _merge_rows(self, g: Any, gi: int = 0) -> None:
            if variant != "reset-m":
                return super()._merge_rows(g, gi)
            write = g.overwrite_rows

            def zero_m(comp: Any, tables: Any, rows: Any) -> None:
                rows[:, g.dim : 2 * g.dim] = 0.0
                write(comp, tables, rows)

            g.overwrite_rows = zero_m
            try:
                super()._merge_rows(g, gi)
            finally:
                del g.overwrite_rows  # the bound method again

    if variant not in ("touching-mean", "state-m", "state-v", "reset-m"):
        raise SystemExit(f"unknown --variant {variant}")
    return Variant


def _run_one(cfg: Any, sync: Any, ctx: Any, steps: int, variant: Optional[str] = None,
             eval_every: int = 0) -> dict[str, Any]:
    """Trains one setting on this replica; returns the global figures (rank 0's)."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from terarec.data import build_source, dense_feature_names, sparse_feature_names
    from terarec.models import build_model
    from terarec.optim.dense import build_dense_optimizer
    from terarec.ps.embedding import HierarchicalEmbeddingBagCollection

    torch.manual_seed(cfg.seed)
    ebc = HierarchicalEmbeddingBagCollection(
        cfg.tables, sparse_feature_names(cfg.data), cfg.optimizer.sparse, seed=cfg.seed,
        process_group=ctx.fast_group, replica_group=ctx.cross_group,
    )
    dims = [ebc.feature_dims[f] for f in ebc.out_features]
    model = build_model(cfg.model, ebc, ebc.out_features, dims,
                        len(dense_feature_names(cfg.data)))
    for p in model.parameters():  # every replica starts from rank 0's weights
        dist.broadcast(p.data, src=ctx.cross_ranks[0], group=ctx.cross_group)
    opt = build_dense_optimizer(cfg.optimizer.dense, model.parameters())
    replicas = len(ctx.cross_ranks)
    merger_cls = _variant_merger(variant)
    merger = merger_cls(sync, model.parameters(), opt, ebc.groups, ctx.cross_group,
                        replicas, ebc)
    loss_fn = nn.BCEWithLogitsLoss()
    src = build_source(cfg.data, "train", seed=cfg.seed, rank=ctx.rank,
                       world_size=ctx.world_size, epochs=1000.0)
    it = iter(src)
    samples, losses, curve = 0, [], []
    model.train()
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(it)
        logits = model(batch.dense, batch.sparse)
        loss = loss_fn(logits, batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # rows updated here (k = 1: gradients combined over replicas)
        merger.before_optimizer_step()
        opt.step()
        merger.after_optimizer_step(step)
        samples += batch.batch_size
        losses.append(loss.item())
        if eval_every and step % eval_every == 0 and step < steps:
            t_ev = time.perf_counter()
            # every replica's own model, on its eval shard (between merges they differ)
            ev = _evaluate(cfg, ctx, model)
            curve.append({"step": step, "auc": ev["auc"], "logloss": ev["logloss"]})
            model.train()
            t0 += time.perf_counter() - t_ev  # kept out of the training time
    merger.finish()
    train_s = time.perf_counter() - t0
    if hasattr(src, "close"):
        src.close()
    m = _evaluate(cfg, ctx, model)
    st = merger.stats()
    t = torch.tensor([train_s, st["merge_s"]], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    n_tail = max(1, steps // 10)
    return {
        "auc": m["auc"],
        "logloss": m["logloss"],
        "steps": steps,
        "replicas": replicas,
        "samples_per_replica": samples,
        "train_loss_last10pct": sum(losses[-n_tail:]) / n_tail,
        "train_s": float(t[0]),
        "merge_s": float(t[1]),
        "merges": st["merges"],
        "bytes": st["bytes"],
        "dense_bytes": st["dense_bytes"],
        "sparse_bytes": st["sparse_bytes"],
        "bytes_per_sample": st["bytes"] / max(samples, 1),
        "rows_merged": st["rows_merged"],
        "dense_params": sum(p.numel() for p in model.parameters()),
        "curve": curve + [{"step": steps, "auc": m["auc"], "logloss": m["logloss"]}],
        "seed": cfg.seed,
    }


def _evaluate(cfg: Any, ctx: Any, model: Any) -> dict[str, float]:
    """AUC and logloss of the replicas' models on the whole eval set (each rank scores
    its shard, the metrics are global)."""
    import torch

    from terarec.data import build_source
    from terarec.trainer.metrics import CTRMetrics

    model.eval()
    metrics = CTRMetrics(distributed=True)
    ev = build_source(cfg.data, "eval", seed=cfg.seed, rank=ctx.rank,
                      world_size=ctx.world_size)
    with torch.no_grad():
        for b in ev:
            metrics.update(torch.sigmoid(model(b.dense, b.sparse)), b.labels)
    if hasattr(ev, "close"):
        ev.close()
    return metrics.compute()


# ------------------------------------------------------------------------- driver side
def _launch(dataset: str, grid: list[dict[str, Any]], steps: int, args: argparse.Namespace,
            result: Path) -> None:
    port = _free_port()
    r = args.replicas
    procs, logs = [], []
    for rank in range(r):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(RANK=str(rank), WORLD_SIZE=str(r), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   GROUP_RANK=str(rank), GROUP_WORLD_SIZE=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
                   PYTHONPATH=str(REPO), TORCH_CPP_LOG_LEVEL="ERROR")
        log = Path(tempfile.gettempdir()) / f"terarec-kstep-{dataset}-rank{rank}.log"
        logs.append(log)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--dataset", dataset,
               "--grid", json.dumps(grid), "--steps", str(steps), "--result", str(result),
               "--frappe", str(args.frappe), "--eval-every", str(args.eval_every)]
        for s in args.sets:
            cmd += ["--set", s]
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          cwd=REPO))
    codes = [p.wait() for p in procs]
    if any(codes):
        tail = "\n".join(f"--- {lg}\n" + lg.read_text(errors="replace")[-3000:] for lg in logs)
        raise SystemExit(f"{dataset}: workers exited {codes}\n{tail}")


def _grid(ks: list[int], modes: list[str], sparse: str, warmup: int = 0,
          dtypes: str = "fp32", variant: Optional[str] = None,
          dense_dtypes: str = "fp32") -> list[dict[str, Any]]:
    """k = 1 once (it merges nothing), then every k > 1 x dense mode x sparse mode x
    wire dtype x dense wire dtype (``sparse``, ``dtypes``, ``dense_dtypes``
    comma-separated)."""
    sparses, dts = sparse.split(","), dtypes.split(",")
    ddts = dense_dtypes.split(",")
    grid = [{"k": 1, "dense": "params", "sparse": sparses[0]}] if 1 in ks else []
    for k in ks:
        if k > 1:
            grid += [{"k": k, "dense": m, "sparse": sp, "dtype": dt, "warmup": warmup,
                      **({"dense_dtype": ddt} if ddt != "fp32" else {}),
                      **({"variant": variant} if variant else {})}
                     for m in modes for sp in sparses for dt in dts for ddt in ddts
                     if not (m == "params+moments" and ddt != "fp32")]  # needs fp32
    return grid


def _table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == ds]
        base = next((r for r in mine if r["k"] == 1), None)
        lines += [
            f"**{ds}** ({mine[0]['replicas']} replicas x {mine[0]['steps']} steps, "
            f"{mine[0]['samples_per_replica']:,} samples per replica)",
            "",
            "| k | dense | sparse | wire | AUC | dAUC vs k=1 | logloss | bytes/sample "
            "| bytes vs k=1 | dense B/sample | sparse B/sample | merges | train s |",
            "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mine:
            n = r["samples_per_replica"]
            dauc = "" if base is None else f"{r['auc'] - base['auc']:+.4f}"
            ratio = "" if base is None else f"{r['bytes'] / base['bytes']:.3f}"
            dense = "(sync)" if r["k"] == 1 else r["dense"]
            sparse = "" if r["k"] == 1 else r["sparse"] + (
                f" ({r['variant']})" if r.get("variant") else "")
            wire = "fp32" if r["k"] == 1 else r.get("dtype", "fp32")
            if r.get("dense_dtype"):
                wire += f", dense {r['dense_dtype']}"
            lines.append(
                f"| {r['k']} | {dense} | {sparse} | {wire} | {r['auc']:.4f} | {dauc} | "
                f"{r['logloss']:.4f} | "
                f"{r['bytes_per_sample']:,.0f} | {ratio} | {r['dense_bytes'] / n:,.0f} | "
                f"{r['sparse_bytes'] / n:,.0f} | {r['merges']:.0f} | {r['train_s']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _setting(r: dict[str, Any]) -> tuple[str, ...]:
    """A k > 1 run's merge setting (one line of the plot)."""
    return (r["dense"], r["sparse"], r.get("dtype", "fp32")) + (
        (f"dense {r['dense_dtype']}",) if r.get("dense_dtype") else ()) + (
        (r["variant"],) if r.get("variant") else ())


def _plot(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7.5), squeeze=False)
    for j, ds in enumerate(datasets):
        mine = [r for r in rows if r["dataset"] == ds]
        base = next((r for r in mine if r["k"] == 1), None)
        modes = list(dict.fromkeys(_setting(r) for r in mine if r["k"] > 1))
        ax_auc, ax_bytes = axes[0][j], axes[1][j]
        for mode in modes:
            pts = sorted((r for r in mine if r["k"] > 1 and _setting(r) == mode),
                         key=lambda r: r["k"])
            ks = [r["k"] for r in pts]
            label = "k-step, " + ", ".join(x for x in mode if x not in ("delta", "fp32"))
            ax_auc.plot(ks, [r["auc"] for r in pts], marker="o", label=label)
            ax_bytes.plot(ks, [r["bytes_per_sample"] for r in pts], marker="o", label=label)
        if base is not None:
            for ax, key in ((ax_auc, "auc"), (ax_bytes, "bytes_per_sample")):
                ax.axhline(base[key], color="k", ls="--", lw=1, label="k = 1 (synchronous)")
            ax_auc.axhspan(base["auc"] - 0.001, base["auc"] + 0.001, color="g", alpha=0.12,
                           label="k = 1 AUC +- 0.001")
            ax_bytes.axhline(base["bytes_per_sample"] / 7, color="r", ls=":", lw=1,
                             label="1/7 of k = 1")
        for ax in (ax_auc, ax_bytes):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("k (steps between merges)")
            ax.grid(alpha=0.3)
        ax_bytes.set_yscale("log")
        ax_auc.set_title(f"{ds}: final eval AUC")
        ax_bytes.set_title(f"{ds}: cross-node bytes per sample (one replica)")
        ax_auc.legend(fontsize=7)
        ax_bytes.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="synthetic,frappe")
    ap.add_argument("--ks", default="1,2,4,8,16,32,64")
    ap.add_argument("--modes", default="params,params+moments,diloco")
    ap.add_argument("--sparse", default="delta",
                    help="sparse merge modes, comma-separated (delta, delta+m, "
                    "delta+moments)")
    ap.add_argument("--dtype", default="fp32",
                    help="sync.sparse_dtype of k > 1 runs, comma-separated (fp32, bf16, "
                    "fp16, int8)")
    ap.add_argument("--variant", default=None,
                    help="diagnostic merger (k > 1; give it its own --out): state-m, "
                    "state-v (the weights and one Adam moment of the rows merged), "
                    "touching-mean (= --diagnose)")
    ap.add_argument("--dense-dtype", default="fp32",
                    help="sync.dense_dtype of k > 1 runs, comma-separated (fp32, bf16)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=0, help="sync.warmup_steps of k > 1 runs")
    ap.add_argument("--synthetic-steps", type=int, default=480)
    ap.add_argument("--frappe-steps", type=int, default=360)
    ap.add_argument("--frappe", default=str(FRAPPE))
    ap.add_argument("--out", default="docs/kstep")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for every data set (e.g. optimizer.dense.lr=0.002)")
    ap.add_argument("--keep", action="store_true", help="append to existing results")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: rebuild table, JSON and plot from <out>/*.jsonl")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also evaluate every N steps (a curve; a multiple of every k "
                    "evaluates merged models, else each replica's own on its eval shard)")
    ap.add_argument("--diagnose", action="store_true",
                    help="diagnostic runs (k > 1 only; give them their own --out): rows' "
                    "deltas averaged over the replicas that touched them, not over all R")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dataset", help=argparse.SUPPRESS)
    ap.add_argument("--grid", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    modes = args.modes.split(",")
    grid = _grid(ks, modes, args.sparse, args.warmup, args.dtype, args.variant,
                 args.dense_dtype)
    if args.diagnose:  # the rows' deltas averaged over the replicas that touched them
        grid = [dict(g, diagnose=True) for g in grid if g["k"] > 1]
    t_all = time.perf_counter()
    for ds in [] if args.report_only else args.datasets.split(","):
        if ds == "frappe" and not Path(args.frappe).exists():
            print(f"frappe: {args.frappe} not found: skipped")
            continue
        result = out / f"{ds}.jsonl"
        if result.exists() and not args.keep:
            result.unlink()
        steps = args.synthetic_steps if ds == "synthetic" else args.frappe_steps
        t0 = time.perf_counter()
        print(f"{ds}: {len(grid)} settings x {steps} steps on {args.replicas} replicas ...",
              flush=True)
        _launch(ds, grid, steps, args, result)
        print(f"{ds}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for ds in args.datasets.split(","):
        p = out / f"{ds}.jsonl"
        if p.exists():
            rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    if not rows:
        print("no results")
        return 1
    load = os.getloadavg()
    meta = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
            "wall_s": time.perf_counter() - t_all, "loadavg_end": load,
            "cpus": os.cpu_count()}
    if args.report_only and (out / "results.json").exists():  # keep the runs' own meta
        meta = json.loads((out / "results.json").read_text())["meta"]
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    table = _table(rows)
    (out / "table.md").write_text(table)
    print(table)
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        base = next((r for r in rows if r["dataset"] == ds and r["k"] == 1), None)
        for r in rows:
            if base is None or r["dataset"] != ds or r["k"] != 8:
                continue
            ok_auc = abs(r["auc"] - base["auc"]) <= 0.001
            ok_b = r["bytes"] <= base["bytes"] / 7
            tag = " ".join(_setting(r))
            print(f"{ds} k=8 {tag.strip()}: dAUC {r['auc'] - base['auc']:+.4f} "
                  f"({'ok' if ok_auc else 'MISSED'}), bytes {r['bytes'] / base['bytes']:.3f}x "
                  f"of k=1 ({'ok' if ok_b else 'MISSED'}; target <= {1 / 7:.3f})")
    png = _plot(rows, out / "kstep.png")
    if png is not None:
        print(f"plot: {png}")
    if math.isnan(rows[0]["auc"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

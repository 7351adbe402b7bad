"""Multi-rank scaling: training samples/s on 1, 2 (and 4) ranks, and a 1-vs-2 equivalence check.

**Throughput** (default). Runs ``python -m terarec.cli train`` on 1 rank, then on N ranks
(``--ranks 1,2,4``), one after the other, each rank a process started with torchrun's
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``=127.0.0.1, ...), all
ranks on this host: one fast group whose ranks shard the tables (the key/row/gradient
exchange) and all-reduce the dense gradients (DDP). Weak scaling, as TorchRec reports
it: the batch is per rank (``--batch-size``, default the config's), so N ranks train N
times the samples per step. samples/s is the job's (all ranks), in steady state: the
mean over the log intervals after the first (start-up, CUDA and Triton warm-up out),
evals and checkpoints off. Printed: per rank count the samples/s, the ratio against 1
rank measured in the same invocation, and the efficiency (ratio / ranks).

    python3 benchmarks/scaling.py                               # CPU, gloo, 1 and 2 ranks
    python3 benchmarks/scaling.py --device cuda --ranks 1,2     # one GPU per rank, NCCL
    python3 benchmarks/scaling.py --device cuda --ranks 1,2,4 --steps 300 --json

On CPU every rank gets ``cores // ranks`` torch threads (``--threads`` overrides), so
1 rank and N ranks use the same cores; set ``OMP_WAIT_POLICY=PASSIVE`` on a shared box.

**Equivalence** (``--check``). Trains a Criteo-format file (written to a temporary
directory, no shuffling) on 1 rank with batch G and on 2 ranks with batch G/2 each, the
same global batches, then prints the largest absolute difference of the per-step losses,
the final rows (every key, the shards together) and the dense weights, and exits 1 if
one is over ``--tol``. ``--tiers`` adds small device/host budgets and an SSD tier.

    python3 benchmarks/scaling.py --check --device cuda [--json]

Runs from the repository root with ``PYTHONPATH=$PWD`` (no install, no console scripts).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from terarec.data.criteo_writer import write_criteo

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """torchrun's variables for ``rank`` of a one-node job on this host."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_", "TORCHELASTIC_"))}
    keep.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", GROUP_WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    keep.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path = keep.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        keep["PYTHONPATH"] = os.pathsep.join(p for p in (path, str(REPO)) if p)
    return keep


def launch(cfg: dict[str, Any], world: int, work: Path, timeout: float) -> Path:
    """Runs ``terarec train`` on ``world`` local ranks; returns the run directory."""
    config = work / f"{cfg['name']}.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    port = free_port()
    logs = [work / f"{cfg['name']}.rank{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "wb") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "terarec.cli", "train", "--config", str(config)],
                env=rank_env(r, world, port), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
            ))
    deadline = time.monotonic() + timeout
    codes: list[Optional[int]] = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(c != 0 for c in codes) or len(codes) < world:
        tail = "\n".join(f"--- rank {r}\n" + logs[r].read_text(errors="replace")[-3000:]
                         for r in range(world))
        raise SystemExit(f"{world}-rank run {cfg['name']} failed (exit codes {codes}):\n{tail}")
    return Path(cfg["train"]["runs_dir"]) / cfg["name"]


def records(run: Path, split: str = "train") -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["split"] == split]


# ------------------------------------------------------------------- throughput


def throughput_config(args: argparse.Namespace, world: int, runs: Path) -> dict[str, Any]:
    cfg = yaml.safe_load(Path(args.config).read_text())
    cfg["name"] = f"scaling_{world}"
    if args.batch_size:
        cfg["data"]["batch_size"] = args.batch_size
    cfg["data"].setdefault("synthetic", {})["eval_samples"] = cfg["data"].get(
        "eval_batch_size", 8192)
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    if args.device == "cuda":
        threads = args.threads or 2
    cfg["train"].update(
        steps=args.steps, log_every=max(1, args.steps // 10), eval_every=0, eval_batches=1,
        progress=False, save_checkpoint=False, device=args.device, threads=threads,
        runs_dir=str(runs),
    )
    cfg.setdefault("dist", {})["timeout_s"] = 300
    return cfg


def measure(args: argparse.Namespace, world: int, work: Path) -> dict[str, Any]:
    cfg = throughput_config(args, world, work / "runs")
    run = launch(cfg, world, work, args.timeout)
    recs = records(run)
    steady = [r["samples_per_s"] for r in recs[1:]] or [r["samples_per_s"] for r in recs]
    summary = json.loads((run / "summary.json").read_text())
    return {
        "ranks": world,
        "batch_per_rank": cfg["data"]["batch_size"],
        "threads_per_rank": cfg["train"]["threads"],
        "samples_per_s": float(np.mean(steady)),
        "samples_per_s_min": float(np.min(steady)),
        "samples_per_s_max": float(np.max(steady)),
        "run_samples_per_s": summary["samples_per_s"],
        "auc": summary["auc"],
    }


def throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ranks = [int(x) for x in args.ranks.split(",")]
    if 1 not in ranks:
        ranks = [1, *ranks]
    if args.device == "cuda":
        import torch

        have = torch.cuda.device_count()
        skipped = [n for n in ranks if n > have]
        ranks = [n for n in ranks if n <= have]
        if skipped:
            print(f"skipping {skipped} ranks: {have} GPUs here", file=sys.stderr)
    rows = [measure(args, n, work) for n in ranks]
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["ratio"] = r["samples_per_s"] / base
        r["efficiency"] = r["ratio"] / r["ranks"]
    return {"mode": "throughput", "device": args.device, "config": args.config,
            "steps": args.steps, "load": os.getloadavg()[0], "runs": rows}


def print_throughput(out: dict[str, Any]) -> None:
    print(f"scaling on {out['device']} ({out['config']}, {out['steps']} steps, "
          f"load {out['load']:.1f}); weak scaling, batch per rank")
    print(f"{'ranks':>5} {'batch/rank':>10} {'thr':>4} {'samples/s':>12} {'(min-max)':>21} "
          f"{'x 1 rank':>8} {'eff':>6}")
    for r in out["runs"]:
        print(f"{r['ranks']:>5} {r['batch_per_rank']:>10} {r['threads_per_rank']:>4} "
              f"{r['samples_per_s']:>12,.0f} ({r['samples_per_s_min']:>9,.0f}-"
              f"{r['samples_per_s_max']:>9,.0f}) {r['ratio']:>7.2f}x {r['efficiency']:>6.2f}")


# ------------------------------------------------------------------- equivalence


def check_config(args: argparse.Namespace, world: int, work: Path) -> dict[str, Any]:
    g = args.check_batch
    table: dict[str, Any] = {"name": "sparse", "dim": 16, "features": None,
                             "init": {"kind": "uniform", "scale": 0.05}}
    cfg: dict[str, Any] = {
        "name": f"check_{world}",
        "seed": 3,
        "data": {"kind": "criteo", "path": [str(work / "train.tsv")],
                 "eval_path": [str(work / "eval.tsv")], "batch_size": g // world,
                 "eval_batch_size": 512, "dense_transform": "log1p"},
        "tables": [table],
        "model": {"kind": "dlrm", "bottom_mlp": [64, 16], "top_mlp": [64, 32]},
        "optimizer": {"sparse": {"kind": "adam", "lr": 0.01},
                      "dense": {"kind": "adam", "lr": 0.001}},
        "train": {"steps": args.check_steps, "log_every": 1, "device": args.device,
                  "threads": args.threads or 1, "progress": False,
                  "runs_dir": str(work / "runs")},
        "dist": {"timeout_s": 300},
    }
    if args.tiers:
        table.update(device_rows=4 * g * 26 // 3, host_rows=g * 26)
        cfg["ssd"] = {"path": "ssd"}
    return cfg


def run_rows(run: Path) -> dict[str, Any]:
    import torch

    from terarec.trainer.checkpoint import read_tables

    ckpt = run / "checkpoint"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    world = manifest.get("world")
    ranks = [""] if world is None else [f"rank{r}/" for r in world["fast_groups"][0]]
    shards = [read_tables(ckpt, r, manifest) for r in ranks]  # SSD snapshots' rows too
    out = {}
    for name in shards[0]:
        keys = torch.cat([s[name]["keys"] for s in shards])
        rows = torch.cat([s[name]["rows"] for s in shards])
        order = torch.argsort(keys)
        out[name] = (keys[order], rows[order])
    dense = torch.load(ckpt / "dense.pt", weights_only=True, map_location="cpu")["model"]
    return {"tables": out, "dense": dense}


def rounding_bound(steps: int, values: int, lr: float) -> float:
    """How far 1 and 2 ranks may drift apart from float32 rounding alone after ``steps``
    Adam steps: each step rounds the weights (size ~1) and sums a gradient over up to
    ``values`` contributions in another order; Adam turns that relative difference into
    ``lr`` times it (``tests/numerics.py``, ``train_tol``)."""
    return float(torch.finfo(torch.float32).eps) * steps * (1.0 + lr * values)


def check(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    steps, g = args.check_steps, args.check_batch
    write_criteo(work / "train.tsv", g * (steps + 2), seed=1, vocab=2000)
    write_criteo(work / "eval.tsv", 2048, seed=2, vocab=2000)
    runs = {}
    for world in (1, 2):
        cfg = check_config(args, world, work)
        runs[world] = launch(cfg, world, work, args.timeout)
    l1 = [r["loss"] for r in records(runs[1])]
    l2 = [r["loss"] for r in records(runs[2])]
    a, b = run_rows(runs[1]), run_rows(runs[2])
    rows_diff, keys_same = 0.0, True
    for name, (k1, v1) in a["tables"].items():
        k2, v2 = b["tables"][name]
        keys_same &= bool(k1.numel() == k2.numel() and (k1 == k2).all())
        if keys_same:
            rows_diff = max(rows_diff, float((v1 - v2).abs().max()))
    dense_diff = max(float((a["dense"][k].float() - b["dense"][k].float()).abs().max())
                     for k in a["dense"] if a["dense"][k].numel())
    loss_diff = max(abs(x - y) for x, y in zip(l1, l2)) if len(l1) == len(l2) else float("inf")
    tol = args.tol if args.tol is not None else rounding_bound(steps, g * 26, 0.01)
    ok = keys_same and max(loss_diff, rows_diff, dense_diff) <= tol
    return {"mode": "check", "device": args.device, "steps": steps, "global_batch": g,
            "tiers": args.tiers, "max_abs_diff_loss": loss_diff,
            "max_abs_diff_rows": rows_diff if keys_same else None,
            "max_abs_diff_dense": dense_diff, "same_keys": keys_same,
            "rows": int(sum(k.numel() for k, _ in a["tables"].values())),
            "tol": tol, "ok": ok}


def print_check(out: dict[str, Any]) -> None:
    rows = out["max_abs_diff_rows"]
    print(f"1 vs 2 ranks on {out['device']}: {out['steps']} steps, global batch "
          f"{out['global_batch']}, {out['rows']:,} rows{' (tiered)' if out['tiers'] else ''}")
    print(f"  max |loss diff|  {out['max_abs_diff_loss']:.3g}")
    print(f"  max |row diff|   {'keys differ' if rows is None else f'{rows:.3g}'}")
    print(f"  max |dense diff| {out['max_abs_diff_dense']:.3g}")
    print(f"  {'PASS' if out['ok'] else 'FAIL'} (tol {out['tol']:g})")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--ranks", default="1,2", help="rank counts, e.g. 1,2,4")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per run (default 40 on cpu, 300 on cuda)")
    ap.add_argument("--batch-size", type=int, default=None, help="per rank")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--check", action="store_true", help="the 1-vs-2-rank equivalence check")
    ap.add_argument("--check-steps", type=int, default=30)
    ap.add_argument("--check-batch", type=int, default=512, help="global batch of --check")
    ap.add_argument("--tiers", action="store_true", help="--check with tiered tables")
    ap.add_argument("--tol", type=float, default=None,
                    help="bound for --check (default: derived from float32 rounding)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 300 if args.device == "cuda" else 40
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
    with tempfile.TemporaryDirectory(prefix="terarec-scaling-") as tmp:
        work = Path(tmp)
        out = check(args, work) if args.check else throughput(args, work)
    if args.json:
        print(json.dumps(out))
    elif args.check:
        print_check(out)
    else:
        print_throughput(out)
    return 0 if out.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The training loop's pause per periodic checkpoint: written synchronously vs on a
background thread (``train.async_checkpoint``), in the same process.

A synthetic run with two tables, one tiered down to the SSD tier (``--ssd-vocab`` keys
through ``--device-rows`` / ``--host-rows`` caches) and one in memory, saves a full
checkpoint every ``--full-every`` steps and a delta every ``--delta-every`` steps; the
same run is trained twice, the saves synchronous and then asynchronous. From each
run's ``metrics.jsonl``: the median pause (the loop's stop, ``pause_s``) of the full
saves and of the deltas, the asynchronous saves' median write time (``write_s``, on the
thread), the training rate between log lines (the writes compete with training for
the cores there) and the whole run's wall time.

    python benchmarks/checkpoint_pause_bench.py [--steps 120] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from terarec.config import config_from_dict
from terarec.trainer.loop import train


def config(args: argparse.Namespace, runs: Path, name: str, background: bool) -> Any:
    return config_from_dict({
        "name": name, "seed": 0,
        "data": {"kind": "synthetic", "batch_size": args.batch, "eval_batch_size": 4096,
                 "synthetic": {"num_dense": 13, "num_sparse": 8, "vocab_size": args.ssd_vocab,
                               "zipf_alpha": 1.05, "eval_samples": 4096}},
        "tables": [
            {"name": "ssd", "dim": args.dim, "features": ["C1", "C2", "C3", "C4"],
             "device_rows": args.device_rows, "host_rows": args.host_rows},
            {"name": "memory", "dim": args.dim, "features": ["C5", "C6", "C7", "C8"]},
        ],
        "ssd": {"path": "ssd"},
        "model": {"kind": "dlrm", "bottom_mlp": [64, args.dim], "top_mlp": [64]},
        "optimizer": {"sparse": {"kind": "adam", "lr": 0.01},
                      "dense": {"kind": "adam", "lr": 0.001}},
        "train": {"steps": args.steps, "log_every": args.delta_every, "device": "cpu",
                  "threads": args.threads, "progress": False, "runs_dir": str(runs),
                  "checkpoint_every": args.full_every, "delta_every": args.delta_every,
                  "async_checkpoint": background, "eval_batches": 1},
    }, "<checkpoint_pause_bench>")


def figures(run: Path) -> dict[str, Any]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in recs if r["split"] == "checkpoint"]
    rates = [r["samples_per_s"] for r in recs if r["split"] == "train"]
    out: dict[str, Any] = {"samples_per_s": statistics.median(rates[1:] or rates)}
    for kind in ("full", "delta"):
        mine = [r for r in saves if r["kind"] == kind]
        if mine:
            out[f"{kind}_pause_s"] = statistics.median(r["pause_s"] for r in mine)
            if "write_s" in mine[0]:
                out[f"{kind}_write_s"] = statistics.median(r["write_s"] for r in mine)
            out[f"{kind}_saves"] = len(mine)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ssd-vocab", type=int, default=2_000_000)
    ap.add_argument("--device-rows", type=int, default=65536)
    ap.add_argument("--host-rows", type=int, default=131072)
    ap.add_argument("--full-every", type=int, default=40)
    ap.add_argument("--delta-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="checkpoint_pause_"))
    out: dict[str, Any] = {}
    for name, background in (("sync", False), ("async", True)):
        t0 = time.perf_counter()
        train(config(args, root / "runs", name, background))
        wall = time.perf_counter() - t0
        out[name] = {**figures(root / "runs" / name), "run_s": wall}
    ratios = {f"{k}_pause async/sync": round(out["async"][f"{k}_pause_s"]
                                             / out["sync"][f"{k}_pause_s"], 3)
              for k in ("full", "delta")}
    ratios["run_s async/sync"] = round(out["async"]["run_s"] / out["sync"]["run_s"], 3)
    ratios["samples_per_s async/sync"] = round(out["async"]["samples_per_s"]
                                               / out["sync"]["samples_per_s"], 3)
    result = {"args": vars(args), "runs": out, "ratios": ratios}
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

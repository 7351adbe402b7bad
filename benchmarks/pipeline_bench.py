"""The prefetch pipeline vs the plain loop: ``terarec train`` samples/s, back to back.

Runs ``terarec train`` on a config with ``train.prefetch=false`` then ``true`` (same
steps, same data, no evals or checkpoints), ``--repeats`` times alternating, each run in
its own process, and prints each run's training samples/s (from its ``summary.json``:
evals and saves excluded), the pipeline's figures (share of the background work hidden,
prefetches skipped) and, per pair, the ratio on/off; the headline is the median ratio.
Neighbours' load hits both sides of a pair alike; quote ratios, not absolute rates.

    python benchmarks/pipeline_bench.py [--config configs/quickstart_tiered.yaml]
        [--steps 600] [--repeats 2] [--set tables[0].device_rows=21000 ...]
        [--on-set train.threads=1 ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def run_once(config: str, steps: int, sets: list[str], prefetch: bool, runs: Path) -> dict:
    name = f"pipeline_bench_{'on' if prefetch else 'off'}"
    cmd = [
        sys.executable, "-m", "terarec.cli", "train", "--config", config, "--name", name,
        "--set", f"train.steps={steps}", "--set", "train.eval_every=0",
        "--set", "train.progress=false", "--set", "train.save_checkpoint=false",
        "--set", f"train.runs_dir={runs}", "--set", f"train.prefetch={str(prefetch).lower()}",
    ]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    summary = json.loads((runs / name / "summary.json").read_text())
    shutil.rmtree(runs / name, ignore_errors=True)
    tiers = next(iter(summary.get("tiers", {}).values()), {})
    return {
        "samples_per_s": summary["samples_per_s"],
        "pipeline": summary.get("pipeline"),
        "ready_rate": tiers.get("ready_rate"),
        "device_hit_rate": tiers.get("device_hit_rate"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart_tiered.yaml")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--on-set", dest="on_sets", action="append", default=[], metavar="KEY=VALUE",
        help="overrides for the pipeline side only (e.g. train.threads=1: leave it a core)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    pairs = []
    with tempfile.TemporaryDirectory(prefix="pipeline_bench_") as tmp:
        for _ in range(args.repeats):
            off = run_once(args.config, args.steps, args.sets, False, Path(tmp))
            on = run_once(args.config, args.steps, args.sets + args.on_sets, True, Path(tmp))
            ratio = on["samples_per_s"] / off["samples_per_s"]
            pairs.append({"off": off, "on": on, "ratio": ratio})
            if not args.json:
                p = on["pipeline"] or {}
                hidden = p.get("hidden")
                print(
                    f"off {off['samples_per_s']:9,.0f} samples/s | on {on['samples_per_s']:9,.0f} "
                    f"samples/s (hidden {'-' if hidden is None else f'{hidden:.0%}'}, skipped "
                    f"{int(p.get('skipped', 0))}, ready {on['ready_rate']}) | on/off "
                    f"{pairs[-1]['ratio']:.2f}x",
                    flush=True,
                )
    out = {
        "config": args.config,
        "steps": args.steps,
        "sets": args.sets,
        "on_sets": args.on_sets,
        "pairs": pairs,
        "median_ratio": statistics.median(p["ratio"] for p in pairs),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"median on/off: {out['median_ratio']:.2f}x over {len(pairs)} pairs")
    return out


if __name__ == "__main__":
    main()

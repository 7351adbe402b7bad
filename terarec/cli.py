"""The ``terarec`` command: ``train``, ``eval``, ``preprocess`` and ``topo``.

terarec train --config configs/quickstart.yaml [--set train.steps=500 ...]
terarec preprocess --config configs/criteo.yaml --out data/criteo_prep [--workers 4]
terarec eval --run runs/quickstart [--data my_eval.tsv]
terarec topo [--check | --json | --from FILE ...]   (terarec-topo; --applied: this rank)

Under torchrun (``terarec-launch``), mpirun or srun every rank runs ``terarec train``
with the same arguments; rank 0 prints the closing lines (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from terarec.config import ConfigError, DataKind, config_from_dict, load_config


def _checkpoint_dir(path: str) -> Path:
    """``runs/<name>`` (its newest checkpoint that verifies, full or delta) or a
    checkpoint directory -> the checkpoint directory."""
    from terarec.trainer.checkpoint.history import DELTAS, FULL, KEPT, latest_valid

    p = Path(path)
    if (p / "manifest.json").is_file() or not any((p / d).is_dir() for d in (FULL, KEPT, DELTAS)):
        return p
    return latest_valid(p) or p / FULL  # (none verifies: the error names checkpoint/)


def _train(args: argparse.Namespace) -> int:
    from terarec.launch import init_distributed, read_launch_env
    from terarec.trainer.loop import describe_final, train

    cfg = load_config(args.config, args.set)
    if args.name is not None:
        if not args.name or "/" in args.name:
            raise ConfigError(f"--name {args.name!r}: must be non-empty and contain no '/'")
        cfg.name = args.name
    resume: Optional[Path] = None
    if args.resume == "auto":  # the run's newest valid checkpoint, else a fresh start
        from terarec.trainer.checkpoint import latest_valid

        resume = latest_valid(Path(cfg.train.runs_dir) / cfg.name)
        print(f"--resume auto: {resume or 'no valid checkpoint, starting fresh'}")
    elif args.resume:
        from terarec.trainer.checkpoint.history import FULL, run_dir_of

        resume = _checkpoint_dir(args.resume)
        run = run_dir_of(resume)
        if args.name is None and (resume.name == FULL or run != resume.parent):
            cfg.name = run.name  # --resume runs/a continues run a, in runs/a
    try:
        if read_launch_env().distributed:  # torchrun / mpirun / srun with several ranks
            with init_distributed(cfg.dist, device=cfg.train.device) as ctx, ctx.guard():
                summary = train(cfg, resume=resume, dist=ctx)
            if ctx.rank != 0:
                return 0  # rank 0 prints the run's closing lines
        else:
            summary = train(cfg, resume=resume)
    except ConfigError as e:  # sections that only clash once built (tables vs model)
        raise ConfigError(f"{args.config}: {e}") from None
    print(describe_final(summary, cfg))
    written = "summary.json,metrics.jsonl,curves.png,config.yaml"
    if "checkpoint" in summary:
        written += ",checkpoint/"
    print(f"wrote {Path(cfg.train.runs_dir) / cfg.name}/{{{written}}}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from terarec.data import build_source
    from terarec.trainer.checkpoint import CheckpointError, load_checkpoint, read_manifest
    from terarec.trainer.loop import build_components, evaluate
    from terarec.trainer.report import to_jsonable
    from terarec.trainer.tiers import close_store, open_ssd_store, ssd_root, uses_ssd

    ckpt = _checkpoint_dir(args.run)
    manifest = read_manifest(ckpt, verify=False)
    if not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"{ckpt / 'manifest.json'}: has no run config to rebuild from")
    cfg = config_from_dict(manifest["config"], str(ckpt / "manifest.json"))
    if args.data:
        if cfg.data.kind == DataKind.SYNTHETIC:
            raise ConfigError("--data: the run trained on synthetic data, which has no files")
        cfg.data.eval_path = args.data
        cfg.data.eval_fraction = 0.0
    store, scratch = None, None
    try:
        if uses_ssd(cfg):
            # A scratch DB of its own, next to the run's (which a training run may hold
            # open), refilled from the checkpoint and removed afterwards.
            root = ssd_root(cfg, ckpt.parent)
            assert root is not None
            scratch = root / f"eval-{os.getpid()}"
            store = open_ssd_store(cfg, scratch)
        parts = build_components(cfg, ssd_store=store)
        step = load_checkpoint(ckpt, parts)
        src = build_source(cfg.data, "eval", seed=cfg.seed, device=parts.device)
        try:
            metrics = evaluate(parts.model, src, parts.device)
            metrics["data"] = src.stats() if hasattr(src, "stats") else {}
        finally:
            if hasattr(src, "close"):
                src.close()
    finally:
        close_store(store, quiet=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    metrics["step"] = step
    print(json.dumps(to_jsonable(metrics), indent=1, allow_nan=False))  # nan -> null
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from terarec.data.preprocess import preprocess

    cfg = load_config(args.config, args.set)
    if args.input:
        cfg.data.path = list(args.input)
    summary = preprocess(cfg.data, args.out, chunk_rows=args.chunk_rows, workers=args.workers,
                         show_progress=not args.no_progress)
    for split, s in summary.items():
        skipped = sum(s["bad_rows"].values())
        print(f"{split}: {s['rows']} rows in {s['parts']} part(s) -> {s['path']}"
              + (f" ({skipped} malformed rows skipped: {s['bad_rows']})" if skipped else ""))
    print("train on it with:\n  data:\n    kind: columnar\n    path: [" + summary["train"]["path"]
          + "]" + (f"\n    eval_path: [{summary['eval']['path']}]" if "eval" in summary else ""))
    return 0


def _topo(args: argparse.Namespace) -> int:
    from terarec.launch.bind import applied

    print(json.dumps(applied()), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="terarec", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=100 (repeatable)",
    )
    t.add_argument("--name", help="run name (default: the config's name)")
    t.add_argument(
        "--resume",
        help="continue from a checkpoint: runs/<name> or its checkpoint/ directory; auto: "
        "this run's newest checkpoint that verifies, or a fresh start when there is none",
    )
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="evaluate a trained run's checkpoint")
    e.add_argument("--run", required=True, help="runs/<name> or a checkpoint directory")
    e.add_argument("--data", nargs="+", help="eval files (default: the run's eval split)")
    e.set_defaults(fn=_eval)
    pp = sub.add_parser(
        "preprocess", help="text data (Criteo TSV, CSV, libFM; plain or .gz) -> the columnar "
        "format training reads without parsing (docs/data.md)")
    pp.add_argument("--config", required=True, help="YAML config whose data: section "
                    "describes the text data (kind criteo/csv/libfm, path, eval_path or "
                    "eval_fraction, dense_transform)")
    pp.add_argument("--out", required=True, help="output directory (a rerun resumes it)")
    pp.add_argument("--input", nargs="+", help="source files (default: the config's data.path)")
    pp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable)")
    pp.add_argument("--chunk-rows", type=int, default=131_072,
                    help="rows per chunk (default 131072)")
    pp.add_argument("--workers", type=int, default=1, help="files converted in parallel")
    pp.add_argument("--no-progress", action="store_true", help="no progress bar")
    pp.set_defaults(fn=_preprocess)
    o = sub.add_parser("topo", help="this machine's topology and placement plan: "
                       "terarec-topo's options (`terarec topo --help`), or --applied: what "
                       "the launcher applied to this process (JSON)")
    o.add_argument("--applied", action="store_true")
    o.set_defaults(fn=_topo)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["topo"] and argv[1:] != ["--applied"]:  # terarec-topo's own options
        from terarec.topology.cli import main as topo_main

        return topo_main(argv[1:])
    args = build_parser().parse_args(argv)
    # Our own loggers at INFO; third-party INFO chatter (fbgemm's .so loading) stays quiet.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("terarec").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"terarec: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from terarec.data import DataError
        from terarec.launch import LaunchError, PeerFailure
        from terarec.ps.tiers.ssd import SSDTierError
        from terarec.trainer.checkpoint import CheckpointError
        from terarec.trainer.loop import TrainingDiverged

        known = (DataError, CheckpointError, TrainingDiverged, SSDTierError, FileNotFoundError,
                 LaunchError, PeerFailure)
        if isinstance(e, known):
            print(f"terarec: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

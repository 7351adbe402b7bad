"""The ``terarec`` command: ``train``, ``eval``, ``preprocess``, ``export``, ``score``,
``serve`` and ``topo``.

terarec train --config configs/quickstart.yaml [--set train.steps=500 ...]
terarec preprocess --config configs/criteo.yaml --out data/criteo_prep [--workers 4]
terarec eval --run runs/quickstart [--data my_eval.tsv]
terarec export --run runs/quickstart --out bundles/quickstart [--row-dtype int8]
terarec score --bundle bundles/quickstart --request examples/quickstart_request.json
terarec serve --bundle bundles/quickstart [--host 127.0.0.1 --port 8080]
terarec topo [--check | --json | --from FILE ...]   (terarec-topo; --applied: this rank)

Under torchrun (``terarec-launch``), mpirun or srun every rank runs ``terarec train``
with the same arguments; rank 0 prints the closing lines (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from terarec import __version__
from terarec.config import ConfigError, DataKind, config_from_dict, load_config


def _checkpoint_dir(path: str) -> Path:
    """``runs/<name>`` (its newest checkpoint that verifies, full or delta) or a
    checkpoint directory -> the checkpoint directory."""
    from terarec.trainer.checkpoint.history import DELTAS, FULL, KEPT, latest_valid

    p = Path(path)
    kinds = (FULL, f"{FULL}.old", KEPT, DELTAS)  # .old: a save interrupted mid-swap
    if (p / "manifest.json").is_file() or not any((p / d).is_dir() for d in kinds):
        return p
    return latest_valid(p) or p / FULL  # (none verifies: the error names checkpoint/)


def _signal_exit(summary: dict[str, Any]) -> Optional[int]:
    """``128 + signal`` for a run stopped by a signal (``summary["signal"]``), else None."""
    import signal

    name = summary.get("signal")
    return 128 + int(signal.Signals[name]) if name else None


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
    restart = read_launch_env().restart_count
    if restart:  # terarec-launch --max-restarts: a restarted group continues the run
        from terarec.trainer.checkpoint import latest_valid

        resume = latest_valid(Path(cfg.train.runs_dir) / cfg.name)
        print(f"restart {restart}: resuming from "
              f"{resume or 'no valid checkpoint of the run yet: starting fresh'}", flush=True)
    try:
        if read_launch_env().distributed:  # torchrun / mpirun / srun with several ranks
            with init_distributed(cfg.dist, device=cfg.train.device) as ctx, ctx.guard():
                summary = train(cfg, resume=resume, dist=ctx)
            if ctx.rank != 0:  # rank 0 prints the run's closing lines
                return _signal_exit(summary) or 0
        else:
            summary = train(cfg, resume=resume)
    except ConfigError as e:  # sections that only clash once built (tables vs model)
        raise ConfigError(f"{args.config}: {e}") from None
    code = _signal_exit(summary)
    if code:  # SIGTERM / SIGINT: saved on the way out (trainer/signals.py)
        where = summary.get("checkpoint", "no checkpoint (train.save_checkpoint: false)")
        print(f"run {cfg.name}: stopped by {summary['signal']} at step {summary['steps']}; "
              f"saved {where}; continue with --resume auto")
        return code
    print(describe_final(summary, cfg))
    written = "summary.json,metrics.jsonl,curves.png,config.yaml"
    if cfg.train.tensorboard:
        written += ",tensorboard/"
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


def _export(args: argparse.Namespace) -> int:
    from terarec.serve.export import export_bundle

    if (args.run is None) == (args.checkpoint is None):
        raise ConfigError("export: give one of --run and --checkpoint")
    ckpt = Path(args.checkpoint) if args.checkpoint else _checkpoint_dir(args.run)
    m = export_bundle(ckpt, Path(args.out), args.row_dtype, overwrite=args.overwrite)
    rows = sum(t["rows"] for t in m["tables"].values())
    print(f"exported {ckpt} (step {m['step']}) -> {args.out}: {m['model']['mode']} "
          f"model ({', '.join(m['model']['programs'].values())}), {rows} rows "
          f"{m['row_dtype']}, {m['bytes'] / 2**20:.1f} MiB")
    print(f"computed once per request: {m['model']['shared']}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from terarec.serve.scorer import Request, Scorer

    scorer = Scorer.from_bundle(args.bundle, device=args.device,
                                dense_dtype=args.dense_dtype)
    try:
        data = json.loads(Path(args.request).read_text())
        res = scorer.score(Request(**data))
    finally:
        scorer.close()
    ids = res.ids or res.order.tolist()
    print(f"scored {len(ids)} candidates with the model of step {res.step}; top {args.top}:")
    for rank, (i, pos) in enumerate(zip(ids[: args.top], res.order.tolist()), 1):
        others = "".join(f"  p({k}) = {float(v[pos]):.4f}" for k, v in (res.tasks or {}).items()
                         if k != scorer.tasks[0])
        print(f"  {rank:>2}. {i}  p(click) = {float(res.scores[pos]):.4f}{others}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from terarec.serve.scorer import Scorer
    from terarec.serve.service import Service, build_app

    if args.threads:
        torch.set_num_threads(args.threads)
    def open_bundle(path: Path) -> Scorer:
        return Scorer.from_bundle(path, device=args.device,
                                  cache_bytes=int(args.cache_mb * 2**20),
                                  overlay_rows=args.overlay_rows,
                                  dense_dtype=args.dense_dtype,
                                  cuda_graphs=args.cuda_graphs)

    scorer = open_bundle(Path(args.bundle).resolve())
    service = Service(scorer, max_candidates=args.max_candidates,
                      max_body_bytes=int(args.max_body_mb * 2**20),
                      bundle=Path(args.bundle), opener=open_bundle)
    if args.follow or args.watch_bundle:
        service.follow(Path(args.follow) if args.follow else None, args.follow_every)
    # uvicorn's C HTTP parser and libuv loop halve the time a request spends outside
    # the scorer (serving.md); without them it falls back to h11 and asyncio
    import importlib.util

    fast = {m: importlib.util.find_spec(m) is not None for m in ("httptools", "uvloop")}
    print(f"serving {args.bundle} (step {scorer.step}) on http://{args.host}:{args.port}",
          flush=True)
    if not all(fast.values()):
        missing = " ".join(m for m, ok in fast.items() if not ok)
        print(f"note: {missing} not installed: each request spends about twice as long in "
              f"HTTP handling (pip install {missing})", file=sys.stderr, flush=True)
    uvicorn.run(build_app(service), host=args.host, port=args.port, log_level="warning",
                http="httptools" if fast["httptools"] else "h11",
                loop="uvloop" if fast["uvloop"] else "asyncio")
    return 0


def _topo(args: argparse.Namespace) -> int:
    from terarec.launch.bind import applied

    print(json.dumps(applied()), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="terarec", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"terarec {__version__}")
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
        "preprocess", help="text data (Criteo TSV, CSV, libFM; plain, .gz or .zst) -> the columnar "
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
    x = sub.add_parser("export", help="a checkpoint -> a serving bundle (docs/serving.md)")
    x.add_argument("--run", help="runs/<name>: its newest valid checkpoint")
    x.add_argument("--checkpoint", help="a checkpoint directory (full or delta)")
    x.add_argument("--out", required=True, help="the bundle directory to write")
    x.add_argument("--row-dtype", default="fp32", choices=["fp32", "fp16", "int8"])
    x.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    x.set_defaults(fn=_export)
    sc = sub.add_parser("score", help="score one JSON request with a bundle (no server)")
    sc.add_argument("--bundle", required=True)
    sc.add_argument("--request", required=True, help="JSON file: a POST /score body")
    sc.add_argument("--top", type=int, default=5, help="candidates printed")
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--dense-dtype", default="fp32", choices=["fp32", "int8"],
                    help="int8: the per-candidate MLP on FBGEMM's int8 GEMM (CPU)")
    sc.set_defaults(fn=_score)
    sv = sub.add_parser("serve", help="the HTTP scoring service over a bundle")
    sv.add_argument("--bundle", required=True)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    sv.add_argument("--cache-mb", type=float, default=256, help="row cache budget")
    sv.add_argument("--dense-dtype", default="fp32", choices=["fp32", "int8"],
                    help="int8: the per-candidate MLP on FBGEMM's int8 GEMM (CPU)")
    sv.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="on a GPU, replay the model as CUDA graphs (default on)")
    sv.add_argument("--max-candidates", type=int, default=10_000)
    sv.add_argument("--max-body-mb", type=float, default=8)
    sv.add_argument("--follow", help="runs/<name>: apply its new delta checkpoints live")
    sv.add_argument("--watch-bundle", action="store_true",
                    help="serve each new export the --bundle path comes to name (e.g. a "
                    "symlink switched to it); on with --follow")
    sv.add_argument("--follow-every", type=float, default=5.0, help="seconds between looks")
    sv.add_argument("--overlay-rows", type=int, default=1 << 22,
                    help="most rows live deltas may change before a new export")
    sv.set_defaults(fn=_serve)
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
    # (torch.fx's deprecation note to torchrec's developers is quieted in terarec/__init__)
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one elsewhere
        print("terarec: interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        if _first_to_say(f"config error: {e}"):
            print(f"terarec: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from terarec.data import DataError
        from terarec.launch import LaunchError, PeerFailure
        from terarec.models.split import SplitError
        from terarec.ps.tiers.ssd import SSDTierError
        from terarec.serve.bundle import BundleError
        from terarec.serve.scorer import RequestError
        from terarec.trainer.checkpoint import CheckpointError
        from terarec.trainer.loop import TrainingDiverged

        known = (DataError, CheckpointError, TrainingDiverged, SSDTierError, FileNotFoundError,
                 LaunchError, PeerFailure, BundleError, FileExistsError, SplitError,
                 RequestError)
        if isinstance(e, known):
            print(f"terarec: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        raise


def _first_to_say(message: str) -> bool:
    """False when another rank of this node's launched job already printed ``message``
    (every rank meets the same config error); True outside ``terarec-launch``."""
    said = os.environ.get("TERAREC_SAID_DIR")  # terarec.launch.torchrun.SAID_DIR
    if not said:
        return True
    name = hashlib.sha256(message.encode()).hexdigest()[:32]
    try:
        os.close(os.open(os.path.join(said, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())

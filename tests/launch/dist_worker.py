"""One rank of a multi-process test: ``python dist_worker.py MODE OUT_DIR [ARGS]``.

Reads its place in the job from the launcher's environment through
``terarec.launch.init_distributed`` (gloo, CPU) like any terarec entry point.

Modes:
    raise STEP: all-reduce every 50 ms; the last rank raises ValueError at STEP.
    metrics CONFIG_JSON: the rank's shard of the eval (and train) stream through the
        config's freshly built model, ``CTRMetrics(distributed=True)``; writes
        ``OUT_DIR/rank<r>.json`` with the global metrics and the rows the rank read.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from terarec.config import DistConfig
from terarec.launch import DistContext, PeerFailure, init_distributed


def _raise(ctx: DistContext, step: int) -> None:
    with ctx.guard():
        for i in range(10_000):
            if ctx.rank == ctx.world_size - 1 and i == step:
                raise ValueError(f"boom at step {i}")
            t = torch.ones(1)
            dist.all_reduce(t)
            if i == 0:
                print("looping", flush=True)
            time.sleep(0.05)


def _row_ids(batch) -> list[float]:  # noqa: ANN001 - a terarec Batch
    # Synthetic dense features are N(0, 1) float32 draws: the first two identify a row.
    d = batch.dense[:, :2].double()
    return (d[:, 0] * 1e4 + d[:, 1]).tolist()


def _metrics(ctx: DistContext, out: Path, cfg_json: str) -> None:
    from terarec.config import config_from_dict
    from terarec.data import build_source
    from terarec.trainer.loop import build_components
    from terarec.trainer.metrics import CTRMetrics

    cfg = config_from_dict(json.loads(cfg_json))
    parts = build_components(cfg)
    model = parts.model.eval()
    src = build_source(cfg.data, "eval", seed=cfg.seed, rank=ctx.rank,
                       world_size=ctx.world_size)
    m, only_rank0 = CTRMetrics(distributed=True), CTRMetrics(distributed=True)
    ids: list[float] = []
    with ctx.guard(), torch.no_grad():
        for b in src:
            probs = torch.sigmoid(model(b.dense, b.sparse))
            m.update(probs, b.labels)
            if ctx.rank == 0:  # the other ranks hold no samples at all
                only_rank0.update(probs, b.labels)
            ids += _row_ids(b)
        result = {"rank": ctx.rank, "global": m.compute(), "rank0_only": only_rank0.compute(),
                  "local": {"samples": m.samples_seen}, "eval_ids": ids}
        train = build_source(cfg.data, "train", seed=cfg.seed, rank=ctx.rank,
                             world_size=ctx.world_size)
        it = iter(train)
        first = [_row_ids(next(it)) for _ in range(2)]
        state = train.state_dict()
        nxt = _row_ids(next(it))
        train.close()
        again = build_source(cfg.data, "train", seed=cfg.seed, rank=ctx.rank,
                             world_size=ctx.world_size)
        again.load_state_dict(state)
        resumed = _row_ids(next(iter(again)))
        again.close()
        result.update(train_ids=first, train_state=state, resume_same=resumed == nxt)
        (out / f"rank{ctx.rank}.json").write_text(json.dumps(result))
        dist.barrier()


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    try:
        with init_distributed(DistConfig(timeout_s=float(sys.argv[4]) if len(sys.argv) > 4
                                         else 60.0), device="cpu") as ctx:
            if mode == "raise":
                _raise(ctx, int(sys.argv[3]))
            elif mode == "metrics":
                _metrics(ctx, out, sys.argv[3])
            else:
                raise SystemExit(f"unknown mode {mode}")
    except PeerFailure as e:
        print(f"PeerFailure: {e}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a finished run reports: its rows over the job and the closing lines it prints."""

from __future__ import annotations

import math
from typing import Any

from terarec.config import Config, DataKind
from terarec.trainer.components import Components
from terarec.trainer.metrics import metric_tasks
from terarec.trainer.ranks import all_sum
from terarec.trainer.tiers import describe_tiers


def global_rows(parts: Components) -> dict[str, int]:
    """Rows per table over the whole job: the fast group's shards summed (one replica;
    every fast group holds the same rows)."""
    local = parts.embedding.num_rows()
    d = parts.dist
    if d is None or d.world_size == 1:
        return local
    total = all_sum(list(local.values()), d)
    return {n: int(round(v / d.num_nodes)) for n, v in zip(local, total)}


def describe_final(summary: dict[str, Any], cfg: Config) -> str:
    """The closing lines printed after a run."""
    ev = summary["final_eval"]
    lines = [
        f"run {summary['name']}: {summary['steps']} steps, {summary['samples']:,} samples in "
        f"{summary['train_seconds']:.1f}s ({summary['samples_per_s']:,.0f} samples/s)",
        f"final eval: AUC {ev['auc']:.4f}  logloss {ev['logloss']:.4f}  "
        f"NE {ev.get('ne', math.nan):.4f}  calibration {ev.get('calibration', math.nan):.3f}",
    ]
    if summary.get("oracle_auc") is not None:
        gap = summary["oracle_auc"] - ev["auc"]
        lines.append(f"teacher oracle AUC {summary['oracle_auc']:.4f}  (gap {gap:+.4f})")
    for task in metric_tasks(ev):  # a multi-task model: each task's figures
        oracle = ev.get(f"{task}_oracle_auc")
        lines.append(f"  task {task}: AUC {ev[f'{task}_auc']:.4f}  logloss "
                     f"{ev[f'{task}_logloss']:.4f}"
                     + ("" if oracle is None else f"  (oracle AUC {oracle:.4f})"))
    if cfg.data.kind != DataKind.SYNTHETIC and summary.get("data"):
        lines.append(f"data: {summary['data']}")
    best = summary.get("best")
    if best and best.get("test"):
        t = best["test"]
        lines.append(f"best checkpoint (valid {best['metric']} {best['value']:.4f} at step "
                     f"{best['step']}): test AUC {t['auc']:.4f}  logloss {t['logloss']:.4f}")
    lines.append(f"rows: {summary['rows']}")
    lines += describe_tiers(summary.get("tiers", {}))
    return "\n".join(lines)

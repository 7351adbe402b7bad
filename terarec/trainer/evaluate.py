"""Evaluation: one pass of a model over an eval source, and the run's periodic eval."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn

from terarec.config import Config
from terarec.data import build_source, dense_feature_names, sparse_feature_names, task_names
from terarec.data.batch import Batch
from terarec.runtime import DistHandles
from terarec.trainer.components import Components
from terarec.trainer.gauc import GAUCMeter
from terarec.trainer.metrics import CTRMetrics, first_task, metric_tasks
from terarec.trainer.ranks import any_rank, dummy_batch, eval_batches


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    max_batches: Optional[int] = None,
    dist: Optional[DistHandles] = None,
    dummy: Optional[Batch] = None,
    gauc_feature: Optional[str] = None,
    tasks: Optional[list[str]] = None,
) -> dict[str, float]:
    """One pass of ``model`` over ``batches``: AUC, NE, logloss, calibration, CTR.

    When batches carry the synthetic teacher's probabilities, the same metrics of the
    teacher (the Bayes-optimal scorer) are added as ``oracle_auc`` / ``oracle_logloss``.

    Multi-task models (predictions and labels ``[B, T]``): the unprefixed metrics (and
    ``gauc``) are the first task's; every task's are added as ``{task}_{metric}``
    (e.g. ``conversion_auc``, ``conversion_oracle_auc``) for the task names ``tasks``.

    Args:
        model: the model (not its DDP wrapper).
        batches: this rank's eval batches.
        device: where the model runs.
        max_batches: cap on this rank's batches.
        dist: several ranks: ``batches`` is this rank's shard, every rank calls this and
            gets the metrics over all shards (a rank that runs out first keeps taking
            part in the forwards' exchange with ``dummy``, whose predictions are dropped).
        dummy: the padding batch for ``dist`` (:func:`terarec.trainer.ranks.dummy_batch`).
        gauc_feature: also ``gauc``, the AUC within the groups this sparse feature's
            first id makes (``trainer/gauc.py``).
    """
    multi = dist is not None and dist.world_size > 1
    was_training = model.training
    model.eval()
    names = tasks or ["label"]

    def meter() -> CTRMetrics:
        return CTRMetrics(distributed=multi, device=device if multi else "cpu")

    metrics, oracle = [meter() for _ in names], [meter() for _ in names]
    gauc = None if gauc_feature is None else GAUCMeter(gauc_feature, distributed=multi)
    has_oracle = False
    for batch, real in eval_batches(batches, dist if multi else None, dummy, max_batches):
        batch = batch.to(device, non_blocking=True)
        probs = torch.sigmoid(model(batch.dense, batch.sparse))
        if not real:
            continue
        _update(metrics, probs, batch.labels)
        if gauc is not None:
            gauc.update(*first_task(probs, batch.labels), batch.sparse)
        if batch.teacher_prob is not None:
            has_oracle = True
            _update(oracle, batch.teacher_prob.to(device), batch.labels)
    model.train(was_training)
    if multi:  # every rank must take part in the oracle's compute, or none
        has_oracle = any_rank(has_oracle, dist)
    per_task = []
    for m, o in zip(metrics, oracle):
        ev = m.compute()
        if has_oracle:
            oc = o.compute()
            ev["oracle_auc"], ev["oracle_logloss"] = oc["auc"], oc["logloss"]
        per_task.append(ev)
    out = dict(per_task[0])
    if gauc is not None:
        out["gauc"] = gauc.compute()
    if len(names) > 1:
        for name, ev in zip(names, per_task):
            out.update({f"{name}_{k}": v for k, v in ev.items() if k != "samples"})
    return out


def _update(meters: list[CTRMetrics], probs: torch.Tensor, labels: torch.Tensor) -> None:
    """Feeds each task's meter its column of ``[B, T]`` (one meter: ``[B]``)."""
    if len(meters) == 1:
        meters[0].update(*first_task(probs, labels))
        return
    if probs.dim() != 2 or probs.shape[1] != len(meters):
        raise ValueError(f"evaluate: {len(meters)} tasks but predictions of shape "
                         f"{list(probs.shape)}")
    for t, m in enumerate(meters):
        m.update(probs[:, t], labels[:, t])


def run_eval(cfg: Config, parts: Components, split: str = "eval") -> dict[str, float]:
    """The run's eval: ``train.eval_batches`` of this rank's shard of ``split`` (``eval``:
    the test split; ``valid``: the validation split), global metrics."""
    d = parts.dist
    rank, world = (d.rank, d.world_size) if d is not None else (0, 1)
    src = build_source(cfg.data, split, seed=cfg.seed, rank=rank, world_size=world,
                       device=parts.device)
    dummy = dummy_batch(sparse_feature_names(cfg.data), len(dense_feature_names(cfg.data)))
    try:
        return evaluate(
            parts.model, src, parts.device, cfg.train.eval_batches, dist=d, dummy=dummy,
            gauc_feature=cfg.train.gauc_feature, tasks=task_names(cfg.data),
        )
    finally:
        if hasattr(src, "close"):
            src.close()


def fmt_eval(step: int, ev: dict[str, float], split: str = "eval") -> str:
    """One line for the progress bar."""
    s = f"[{split} step {step}] auc {ev['auc']:.4f} logloss {ev['logloss']:.4f}"
    if "oracle_auc" in ev:
        s += f" (oracle auc {ev['oracle_auc']:.4f})"
    for task in metric_tasks(ev):
        s += f", {task}_auc {ev[f'{task}_auc']:.4f}"
    return s

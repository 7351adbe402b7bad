"""CTR metrics (AUC, NE, logloss, calibration, CTR) on top of ``torchrec.metrics``.

:class:`CTRMetrics` accumulates predicted probabilities and labels over a whole eval
pass (``window_size=None``: lifetime) or over a sliding window of the most recent
training samples (``window_size=N``), and reports plain floats::

    m = CTRMetrics()                      # eval pass
    for batch in eval_stream:
        m.update(torch.sigmoid(model(batch.dense, batch.sparse)), batch.labels)
    m.compute()  # {'auc': 0.79, 'ne': 0.86, 'logloss': 0.45, 'calibration': 1.01,
                 #  'ctr': 0.25, 'samples': 65536}

State and windowing are torchrec's (``AUCMetric``, ``NEMetric``, ``CalibrationMetric``,
``CTRMetric``, one ``RecTaskInfo``, ``UNFUSED_TASKS_COMPUTATION``). Two things differ
from stock torchrec, on purpose:

* **AUC with ties.** torchrec integrates the ROC curve sample by sample after an
  ``argsort``, so tied scores count as right or wrong depending on the sort order (a
  constant predictor can score anything in [0, 1]). Here tied scores form one ROC step,
  i.e. a positive/negative pair with equal scores counts 1/2 (Mann-Whitney), which is
  what ``sklearn.metrics.roc_auc_score`` reports. Same cost: one sort, one cumsum.
* **Units and undefined values.** ``logloss`` is in nats (torchrec's is in bits), so it
  matches ``BCEWithLogitsLoss``. When the labels hold a single class, AUC and NE are
  undefined and reported as ``nan`` (torchrec reports AUC 0.5 and a huge NE);
  calibration is ``nan`` when there are no positives. ``nan`` becomes ``null`` in
  ``metrics.jsonl``; comparisons such as ``auc > best`` are simply false.

Window semantics (``window_size=N``): AUC covers exactly the last ``min(N, seen)``
samples; the additive metrics (NE, logloss, calibration, CTR) cover the most recent
whole batches totalling at most ``N`` samples (and at most 1000 batches, torchrec's
``MAX_BUFFER_COUNT``). A batch larger than ``N`` is cut to its last ``N`` samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric, AUCMetricComputation
from torchrec.metrics.calibration import CalibrationMetric
from torchrec.metrics.ctr import CTRMetric
from torchrec.metrics.metrics_config import RecComputeMode, RecTaskInfo
from torchrec.metrics.metrics_namespace import MetricName, MetricPrefix
from torchrec.metrics.ne import NEMetric
from torchrec.metrics.rec_metric import MetricComputationReport, RecMetric

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]

_TASK = "ctr"
# "Lifetime" for the AUC state, which torchrec only keeps as a window.
_UNBOUNDED = 2**62
# Batches an accumulating (window_size=None) CTRMetrics stages before handing them to
# torchrec as one update: torchrec's per-update Python costs more host time than a GPU
# training step leaves free.
_STAGE_BATCHES = 64
METRIC_KEYS = ("auc", "ne", "logloss", "calibration", "ctr", "samples")


def _auc_with_ties(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted ROC AUC with tied scores counted as 1/2; ``nan`` for a single class.

    Args:
        scores: ``[N]`` float scores (any monotone scale: probabilities or logits).
        labels: ``[N]`` in [0, 1]; a soft label ``y`` counts ``y`` positive, ``1-y``
            negative.
        weights: ``[N]`` non-negative sample weights.

    Returns:
        0-d float64 tensor.
    """
    if scores.numel() == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=scores.device)
    order = torch.argsort(scores, descending=True)
    s = scores[order]
    w = weights[order].double()
    y = labels[order].double()
    cum_tp = torch.cumsum(w * y, dim=0)
    cum_fp = torch.cumsum(w * (1.0 - y), dim=0)
    # one ROC point per distinct score: the last sample of each run of ties
    ends = torch.ones_like(s, dtype=torch.bool)
    ends[:-1] = s[1:] != s[:-1]
    zero = cum_tp.new_zeros(1)
    tp = torch.cat([zero, cum_tp[ends]])
    fp = torch.cat([zero, cum_fp[ends]])
    denom = tp[-1] * fp[-1]
    auc = torch.trapezoid(tp, fp) / denom.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(denom > 0, auc, torch.full_like(auc, math.nan))


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def auc_of(scores: ArrayLike, labels: ArrayLike, weights: Optional[ArrayLike] = None) -> float:
    """ROC AUC of ``scores`` against ``labels`` (ties count 1/2; one class → ``nan``).

    The oracle AUC of the synthetic teacher is ``auc_of(batch.teacher_prob, labels)``
    over the eval stream. Same kernel as :class:`CTRMetrics`; 1M samples take ~0.2 s
    on one CPU core.

    Args:
        scores: ``[N]`` scores or probabilities.
        labels: ``[N]`` in {0, 1} (soft labels allowed).
        weights: optional ``[N]`` non-negative sample weights.

    Returns:
        The AUC as a Python float.
    """
    s = _as_tensor(scores).reshape(-1).float()
    y = _as_tensor(labels).reshape(-1).to(s.device)
    if y.numel() != s.numel():
        raise ValueError(f"auc_of: {s.numel()} scores but {y.numel()} labels")
    w = torch.ones_like(s) if weights is None else _as_tensor(weights).reshape(-1).to(s.device)
    return float(_auc_with_ties(s, y, w))


class _TieAwareAUCComputation(AUCMetricComputation):
    """torchrec's AUC state and windowing, with :func:`_auc_with_ties` as the kernel."""

    def _compute(self) -> list[MetricComputationReport]:
        preds, labels, weights = (
            torch.cat(list(getattr(self, name)), dim=-1)
            for name in ("predictions", "labels", "weights")
        )
        value = torch.stack([_auc_with_ties(p, y, w) for p, y, w in zip(preds, labels, weights)])
        return [
            MetricComputationReport(
                name=MetricName.AUC, metric_prefix=MetricPrefix.WINDOW, value=value
            )
        ]


class _TieAwareAUCMetric(AUCMetric):
    _computation_class = _TieAwareAUCComputation


class CTRMetrics:
    """AUC, NE, logloss, calibration and CTR over an eval pass or a sliding window.

    Args:
        window_size: ``None`` to accumulate everything since the last :meth:`reset`
            (an eval pass); ``N`` to report over the most recent ``N`` samples (a
            training window; see the module docstring for the exact semantics).
        device: where the state lives; inputs are moved there. Keep it on the model's
            device during training so ``update`` never synchronises with the host.
        distributed: ``True`` makes :meth:`compute` a collective over the default
            process group (every rank must call it; all ranks get the global metrics;
            ``window_size`` is then the global window, split evenly over ranks).
            ``False`` (default) computes this rank's metrics only.
    """

    def __init__(
        self,
        window_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        distributed: bool = False,
    ) -> None:
        if window_size is not None and window_size < 1:
            raise ValueError(f"window_size: must be >= 1 or None, got {window_size}")
        self.window_size = window_size
        self.device = torch.device(device)
        self.distributed = distributed
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        if window_size is not None and window_size < world_size:
            raise ValueError(f"window_size: {window_size} is smaller than the world size")
        self._prefix = "lifetime" if window_size is None else "window"
        common: dict[str, Any] = dict(
            world_size=world_size,
            my_rank=rank,
            batch_size=1,  # only checked against the window; batches may vary in size
            tasks=[RecTaskInfo(name=_TASK)],
            compute_mode=RecComputeMode.UNFUSED_TASKS_COMPUTATION,
            window_size=_UNBOUNDED if window_size is None else window_size,
            compute_on_all_ranks=True,
        )
        self._auc = _TieAwareAUCMetric(**common)
        self._others: list[RecMetric] = [
            NEMetric(**common, include_logloss=True),
            CalibrationMetric(**common),
            CTRMetric(**common),
        ]
        for m in (self._auc, *self._others):
            m.to(self.device)
        self._seen = 0
        # window_size=None: batches kept as given until compute() or _STAGE_BATCHES of
        # them, then fed to torchrec concatenated (sums over all samples: same metrics)
        self._staged: list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = []

    @property
    def samples_seen(self) -> int:
        """Samples passed to :meth:`update` since the last reset (this rank)."""
        return self._seen

    @torch.no_grad()
    def update(
        self,
        probs: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
    ) -> None:
        """Adds one batch.

        Args:
            probs: ``[B]`` predicted P(y=1) (apply the sigmoid to logits first).
            labels: ``[B]`` in {0, 1}.
            weights: optional ``[B]`` non-negative sample weights (default 1).
        """
        probs = probs.detach().reshape(-1).to(self.device, torch.float32)
        labels = labels.detach().reshape(-1).to(self.device, torch.float32)
        if labels.numel() != probs.numel():
            raise ValueError(f"update: {probs.numel()} predictions but {labels.numel()} labels")
        if weights is not None:
            weights = weights.detach().reshape(-1).to(self.device, torch.float32)
            if weights.numel() != probs.numel():
                raise ValueError(
                    f"update: {probs.numel()} predictions but {weights.numel()} weights"
                )
        if probs.numel() == 0:
            return
        local_window = None if self.window_size is None else self._auc._window_size
        if local_window is not None and probs.numel() > local_window:
            probs, labels = probs[-local_window:], labels[-local_window:]
            weights = None if weights is None else weights[-local_window:]
        self._seen += int(probs.numel())
        if self.window_size is None:  # copies: the caller may reuse its buffers
            self._staged.append((probs.clone(), labels.clone(),
                                 None if weights is None else weights.clone()))
            if len(self._staged) >= _STAGE_BATCHES:
                self._drain()
            return
        self._feed(probs, labels, weights)

    def _drain(self) -> None:
        """Feeds the staged batches to torchrec as one update."""
        staged, self._staged = self._staged, []
        if not staged:
            return
        probs = torch.cat([p for p, _, _ in staged])
        labels = torch.cat([y for _, y, _ in staged])
        weights = None
        if any(w is not None for _, _, w in staged):
            weights = torch.cat([torch.ones_like(p) if w is None else w for p, _, w in staged])
        self._feed(probs, labels, weights)

    def _feed(
        self, probs: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor]
    ) -> None:
        kwargs: dict[str, Any] = dict(
            predictions={_TASK: probs},
            labels={_TASK: labels},
            weights=None if weights is None else {_TASK: weights},
        )
        self._auc.update(**kwargs)
        for m in self._others:
            m.update(**kwargs)

    def compute(self) -> dict[str, float]:
        """Returns ``auc, ne, logloss, calibration, ctr, samples`` as Python numbers.

        ``logloss`` is the mean binary cross-entropy in nats; ``ne`` is logloss divided
        by the entropy of the observed CTR; ``calibration`` is sum(probs) / sum(labels)
        (weighted); ``samples`` counts the samples the AUC covers (for a window:
        ``min(window_size, seen)``). With no samples every metric is ``nan``.
        """
        self._drain()
        seen = self._seen
        if self.distributed:
            t = torch.tensor([seen], dtype=torch.int64, device=self.device)
            dist.all_reduce(t)
            seen = int(t.item())
        samples = seen if self.window_size is None else min(seen, self.window_size)
        if seen == 0:
            return {**dict.fromkeys(METRIC_KEYS[:-1], math.nan), "samples": 0}
        values: dict[str, torch.Tensor] = {}
        for m in (self._auc, *self._others):
            values.update(m.compute() if self.distributed else m.local_compute())

        scope = "" if self.distributed else "local_"  # torchrec's key prefix

        def get(namespace: str, name: str, prefix: Optional[str] = None) -> float:
            key = f"{namespace}-{_TASK}|{scope}{prefix or self._prefix}_{name}"
            return float(values[key])

        ctr = get("ctr", "ctr")
        single_class = ctr <= 0.0 or ctr >= 1.0
        return {
            "auc": get("auc", "auc", "window"),  # torchrec keeps AUC state as a window
            "ne": math.nan if single_class else get("ne", "ne"),
            "logloss": get("ne", "logloss") * math.log(2.0),  # bits -> nats
            "calibration": math.nan if ctr <= 0.0 else get("calibration", "calibration"),
            "ctr": ctr,
            "samples": samples,
        }

    def reset(self) -> None:
        """Forgets every sample (lifetime and window state)."""
        for m in (self._auc, *self._others):
            m.reset()
        self._seen = 0
        self._staged.clear()


def metric_tasks(ev: dict[str, Any]) -> list[str]:
    """The tasks whose metrics a multi-task eval added (``{task}_auc`` keys, the
    oracle's left out); empty for a single task."""
    return [k[: -len("_auc")] for k in ev if k.endswith("_auc") and "oracle" not in k]


def first_task(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first task's columns of multi-task ``[B, T]`` predictions and labels (the
    task that train-window metrics and model selection follow); ``[B]`` as they are."""
    if labels.dim() == 2:
        return probs[:, 0], labels[:, 0]
    return probs, labels

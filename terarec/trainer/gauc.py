"""Group AUC (GAUC): the ROC AUC of each user's impressions, averaged over users.

A model can rank well across users (AUC) while ranking each user's own ads poorly; what
a feed or an ad auction shows one user depends on the second. GAUC, as in DIN (Zhou et
al., 2018), is the impression-weighted mean of the per-group AUCs::

    GAUC = sum_g n_g * AUC_g / sum_g n_g     over the groups g with a click and a non-click

(``n_g``: the group's impressions; ties count 1/2, as in :func:`~terarec.trainer.metrics.auc_of`;
a group with one class has no AUC and is left out, its impressions too). The groups are
the values of one sparse feature (``train.gauc_feature``, e.g. the user id): a sample's
first id of that feature; samples without one are left out.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch


def gauc_of(scores: Any, labels: Any, groups: Any) -> float:
    """GAUC of ``scores`` ``[N]`` against ``labels`` ``[N]`` (a label > 0.5 is a click)
    within ``groups`` ``[N]`` (int64 group ids). ``nan`` when no group has both classes.

    One sort by (group, score), ranks averaged over ties, per-group rank sums by
    ``bincount``: no loop over groups or samples.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1) > 0.5
    g = np.asarray(groups, dtype=np.int64).reshape(-1)
    if not s.size == y.size == g.size:
        raise ValueError(f"gauc_of: {s.size} scores, {y.size} labels, {g.size} groups")
    if s.size == 0:
        return math.nan
    order = np.lexsort((s, g))  # by group, then score ascending
    s, y, g = s[order], y[order], g[order]
    n = s.size
    new_group = np.r_[True, g[1:] != g[:-1]]
    gid = np.cumsum(new_group) - 1  # [N] group index
    group_start = np.flatnonzero(new_group)  # [G]
    new_run = new_group | np.r_[True, s[1:] != s[:-1]]  # runs of one score in a group
    run_start = np.flatnonzero(new_run)
    run_len = np.diff(np.r_[run_start, n])
    # 1-based rank within the group, averaged over the run of ties
    run_rank = run_start - group_start[gid[run_start]] + (run_len + 1) / 2.0
    rank = run_rank[np.cumsum(new_run) - 1]
    size = np.bincount(gid).astype(np.float64)
    pos = np.bincount(gid, weights=y.astype(np.float64))
    neg = size - pos
    rank_pos = np.bincount(gid, weights=rank * y)
    ok = (pos > 0) & (neg > 0)
    if not ok.any():
        return math.nan
    auc = (rank_pos[ok] - pos[ok] * (pos[ok] + 1) / 2.0) / (pos[ok] * neg[ok])
    return float((auc * size[ok]).sum() / size[ok].sum())


def first_ids(sparse: Any, feature: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's first id of ``feature`` in a KJT, and which samples have one:
    ``(ids [B], present [B] bool)``."""
    jt = sparse[feature]
    lengths = jt.lengths().to(torch.int64)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    values = jt.values().to(torch.int64)
    present = lengths > 0
    idx = offsets[:-1].clamp(max=max(values.numel() - 1, 0))
    ids = values[idx] if values.numel() else torch.zeros_like(lengths)
    return ids, present


class GAUCMeter:
    """Collects (score, label, group) of an eval pass; :meth:`compute` gives the GAUC over
    every rank's samples (``distributed``: gathered to every rank, which must all call
    it)."""

    def __init__(self, feature: str, distributed: bool = False) -> None:
        self.feature = feature
        self.distributed = distributed
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, probs: torch.Tensor, labels: torch.Tensor, sparse: Any) -> None:
        ids, present = first_ids(sparse, self.feature)
        keep = present.to(probs.device)
        self._parts.append((probs.detach()[keep].float().cpu(),
                            labels.detach()[keep.to(labels.device)].float().cpu(),
                            ids[present].cpu()))

    def compute(self) -> float:
        if self._parts:
            parts = [torch.cat(p) for p in zip(*self._parts)]
        else:
            parts = [torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.int64)]
        if self.distributed:
            world = torch.distributed.get_world_size()
            everyone: list[Optional[list[torch.Tensor]]] = [None] * world
            torch.distributed.all_gather_object(everyone, parts)
            parts = [torch.cat([p[i] for p in everyone if p is not None]) for i in range(3)]
        return gauc_of(parts[0].numpy(), parts[1].numpy(), parts[2].numpy())

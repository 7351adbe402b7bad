"""Keeping replicas in step across fast groups: the one hook of the training loop.

Inside a fast group the dense gradients are all-reduced by ``DistributedDataParallel``
during backward and the embedding rows are sharded (one copy of each row). Across fast
groups (nodes) each group holds a replica; a :class:`ReplicaSync` keeps the replicas
together. The training pipeline calls it around every dense optimizer step::

    loss.backward()                  # DDP: dense grads averaged over the fast group
    sync.before_optimizer_step()     # k = 1: dense grads averaged over the cross group
    optimizer.step()
    sync.after_optimizer_step(step)  # k-step merging: every k steps, merge the replicas

:class:`CrossGradAllReduce` is the k = 1 policy: the dense gradients averaged over the
cross group every step, so that with fast groups of equal size every rank applies the
gradient averaged over the world, exactly as one DDP over all ranks would. (The rows'
gradients are combined across replicas by the embedding collection itself, given its
``replica_group``.) The k-step merging of ``optim/`` plugs in as another
:class:`ReplicaSync` built by :func:`build_replica_sync`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn

from terarec.config import SyncConfig
from terarec.optim.kstep import KStepMerger, all_reduce_mean
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection


class ReplicaSync(Protocol):
    """What the training loop calls around each dense optimizer step (see the module).

    Implementations hold whatever state they need (e.g. the parameters at the last
    merge); :meth:`state_dict` (the same on every replica) goes into the checkpoint's
    ``dense.pt`` and comes back through :meth:`load_state_dict` on resume. What differs
    between replicas (:meth:`local_state_dict`) is saved by every rank in its shard,
    together with its own dense optimizer state.
    """

    def before_optimizer_step(self) -> None:
        """After backward (dense grads are in ``.grad``), before the optimizer step."""

    def after_optimizer_step(self, step: int) -> None:
        """After the optimizer step of training step ``step`` (1-based, counting the
        steps of the run before a resume)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (may be empty)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""

    def local_state_dict(self) -> Optional[dict[str, Any]]:
        """This replica's own state, when replicas (and their dense optimizer states)
        differ at a checkpoint; None when they are identical."""

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`local_state_dict` (after :meth:`load_state_dict`)."""


class NoSync:
    """One fast group (a single node, or a single process): nothing to keep in step."""

    def before_optimizer_step(self) -> None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def local_state_dict(self) -> Optional[dict[str, Any]]:
        return None

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        return None


class CrossGradAllReduce(NoSync):
    """k = 1: averages the dense gradients over the cross group before every step.

    One all-reduce of the flattened gradients per step (per dtype and device). With DDP
    on the fast group having averaged them over the ``F`` ranks of the fast group, the
    result is the average over all ``F * C`` ranks of the world (fast groups of equal
    size; with unequal ones each group's average weighs the same).

    Args:
        params: the dense parameters (those without a gradient are skipped; all ranks
            of the model skip the same ones).
        group: the cross group (``DistContext.cross_group``).
        size: its number of ranks.
    """

    def __init__(self, params: Iterable[nn.Parameter], group: dist.ProcessGroup,
                 size: int) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.size = size

    def before_optimizer_step(self) -> None:
        all_reduce_mean([p.grad for p in self.params if p.grad is not None],
                        self.group, self.size)


def build_replica_sync(
    model: nn.Module,
    cross_group: Optional[dist.ProcessGroup],
    cross_size: int,
    sync: Optional[SyncConfig] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    embedding: Optional[HierarchicalEmbeddingBagCollection] = None,
) -> ReplicaSync:
    """The replica policy of a run: :class:`NoSync` with one fast group; else the
    ``sync:`` config's :class:`~terarec.optim.kstep.KStepMerger` (k = 1: the dense
    gradients averaged over the cross group every step, as :class:`CrossGradAllReduce`
    does, with the bytes counted; k > 1: merges every k steps), or
    :class:`CrossGradAllReduce` when no ``sync`` config is given.

    Args:
        model: the dense model (its parameters, not the DDP wrapper's).
        cross_group: this rank's cross group, None in a single process.
        cross_size: the cross group's size (the number of fast groups / replicas).
        sync: the ``sync:`` section; with it, ``optimizer`` (the dense optimizer) and
            ``embedding`` (its table groups are merged, its ``sync_replicas`` switched).
    """
    if cross_group is None or cross_size <= 1:
        return NoSync()
    if sync is None:
        return CrossGradAllReduce(model.parameters(), cross_group, cross_size)
    if optimizer is None or embedding is None:
        raise ValueError("a sync config needs the dense optimizer and the embedding")
    return KStepMerger(sync, model.parameters(), optimizer, embedding.groups, cross_group,
                       cross_size, embedding)


def sync_figures(sync: ReplicaSync, local_samples: int) -> Optional[dict[str, float]]:
    """The cross-node traffic of a :class:`~terarec.optim.kstep.KStepMerger` (None for
    the other policies): its counters (``merges``, ``bytes`` = ``dense_bytes`` +
    ``sparse_bytes`` sent by this rank, ``rows_merged``, ``merge_s``) and
    ``bytes_per_sample``: this rank's bytes over the samples it trained."""
    stats = getattr(sync, "stats", None)
    if stats is None:
        return None
    out: dict[str, float] = stats()
    out["bytes_per_sample"] = out["bytes"] / max(local_samples, 1)
    return out

"""What a run is made of: the embedding collection, the model, the dense optimizer.

:func:`build_components` builds them for a config (on one process, or as one rank of a
multi-rank job: tables sharded over the fast group, the model in DDP, replicas kept in
step by a ``ReplicaSync``); the run loop (``trainer/loop.py``), checkpoints
(``trainer/checkpoint/``) and tools take them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from terarec.config import Config, ConfigError
from terarec.data import dense_feature_names, sparse_feature_names, task_names
from terarec.models import build_model
from terarec.optim.dense import build_dense_optimizer
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.ssd import SSDStore
from terarec.runtime import DeviceUnavailable, DistHandles, resolve_device
from terarec.trainer.ranks import broadcast_dense, fast_group_twin, wrap_ddp
from terarec.trainer.sync import NoSync, ReplicaSync, build_replica_sync


@dataclass
class Components:
    """What a run is made of (built by :func:`build_components`).

    Attributes:
        embedding: the embedding collection (sharded over the fast group on several
            ranks).
        model: the dense model (holding ``embedding``); what is saved and evaluated.
        dense_optimizer: over ``model``'s parameters.
        device: where this rank trains.
        train_model: what the training step calls: ``model`` in DDP on the fast group
            when it has several ranks, else ``model`` itself.
        sync: keeps the replicas of several fast groups in step (``trainer/sync.py``).
        dist: the job's group handles; None for one process.
    """

    embedding: HierarchicalEmbeddingBagCollection
    model: nn.Module
    dense_optimizer: torch.optim.Optimizer
    device: torch.device
    train_model: Optional[nn.Module] = None
    sync: ReplicaSync = field(default_factory=NoSync)
    dist: Optional[DistHandles] = None

    def __post_init__(self) -> None:
        if self.train_model is None:
            self.train_model = self.model


def build_components(
    cfg: Config, ssd_store: Optional[SSDStore] = None, dist: Optional[DistHandles] = None
) -> Components:
    """Embedding collection, model and dense optimizer for ``cfg``.

    Args:
        cfg: the run's config.
        ssd_store: the rank's SSD store (see :func:`open_ssd_store`); required when a
            table has ``host_rows``, unused otherwise. The caller closes it.
        dist: the job's group handles (several ranks): the tables are sharded over the
            fast group (and their gradients combined over the cross group), the dense
            weights start as global rank 0's on every rank, the model is wrapped in DDP
            on the fast group and replicas are kept in step across fast groups.

    Raises:
        ConfigError: ``train.device`` is not available, the tables do not fit the data's
            features, or the model does not fit the tables (e.g. a DLRM bottom MLP not
            ending in the embedding dim); each section validates alone, so these are only
            found here.
    """
    multi = dist is not None and dist.world_size > 1
    try:
        device = dist.device if dist is not None else resolve_device(cfg.train.device)
    except DeviceUnavailable as e:
        raise ConfigError(str(e)) from None
    torch.manual_seed(cfg.seed)
    features = sparse_feature_names(cfg.data)
    if cfg.train.gauc_feature is not None and cfg.train.gauc_feature not in features:
        raise ConfigError(f"train.gauc_feature: {cfg.train.gauc_feature!r} is not a sparse "
                          f"feature of the data (it has {features})")
    groups: dict[str, Any] = {}
    if multi:
        assert dist is not None
        # A fast group of one rank still goes through the exchange: its replicas (the
        # same rank on the other nodes) combine their row gradients there.
        groups = {
            "process_group": dist.fast_group,
            "replica_group": dist.cross_group if dist.num_nodes > 1 else None,
            # the pipeline's background prefetch talks on a group of its own
            "prefetch_group": fast_group_twin(dist) if uses_prefetch(cfg) else None,
        }
    try:
        embedding = HierarchicalEmbeddingBagCollection(
            cfg.tables,
            features,
            cfg.optimizer.sparse,
            device=device,
            seed=cfg.seed,
            ssd_store=ssd_store,
            **groups,
        )
    except ValueError as e:
        raise ConfigError(f"tables: {e}") from None
    # the model's feature order is the pooled order of the table groups (as it always
    # was: a trained model's interaction slots keep their meaning)
    dims = [embedding.feature_dims[f] for f in embedding.group_features]
    try:
        model = build_model(
            cfg.model, embedding, embedding.group_features, dims,
            len(dense_feature_names(cfg.data)), len(task_names(cfg.data)),
        ).to(device)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    dense_opt = build_dense_optimizer(cfg.optimizer.dense, model.parameters())
    if not multi:
        return Components(embedding, model, dense_opt, device)
    assert dist is not None
    broadcast_dense(model, dist)
    sync = build_replica_sync(
        model, dist.cross_group, len(dist.cross_ranks), cfg.sync, dense_opt, embedding
    )
    return Components(embedding, model, dense_opt, device, wrap_ddp(model, dist), sync, dist)


def uses_prefetch(cfg: Config) -> bool:
    """``train.prefetch``; null (the default): on when a table has tiers. Without tiers
    the pipeline only reads the next batch ahead, which the data source already does."""
    if cfg.train.prefetch is not None:
        return cfg.train.prefetch
    return any(t.device_rows is not None for t in cfg.tables)

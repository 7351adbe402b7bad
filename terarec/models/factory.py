"""The one place that turns a :class:`~terarec.config.ModelConfig` into a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from terarec.models.dcn import DCNv2
from terarec.models.dlrm import DLRM
from terarec.models.fm import DeepFM, WideDeep

if TYPE_CHECKING:  # config is plain data; models need it only for the type
    from terarec.config import ModelConfig


def build_model(
    cfg: ModelConfig,
    embedding: nn.Module,
    feature_names: Sequence[str],
    feature_dims: Sequence[int],
    num_dense: int,
    num_tasks: int = 1,
) -> nn.Module:
    """Builds the model named by ``cfg.kind`` around an embedding module.

    Args:
        cfg: the ``model:`` section of the run config.
        embedding: module with ``forward(kjt) -> KeyedTensor``, pooled per feature.
        feature_names: sparse features the model consumes, in order.
        feature_dims: pooled dim of each feature (DLRM: all equal).
        num_dense: number of dense features.
        num_tasks: labels per sample (``terarec.data.task_names``); ``> 1``: one head
            per task.

    Returns:
        A module with ``forward(dense [B, num_dense], sparse KJT) -> logits [B]``
        (``[B, num_tasks]`` for several tasks).

    Raises:
        ValueError: the config and the features do not fit the model (e.g. DLRM with
            mixed feature dims, or a bottom MLP not ending in the embedding dim).
    """
    kind = getattr(cfg.kind, "value", cfg.kind)
    if cfg.task_weights and len(cfg.task_weights) != num_tasks:
        raise ValueError(f"model.task_weights: {len(cfg.task_weights)} weights for "
                         f"{num_tasks} task(s) of the data")
    if kind == "dlrm":
        dims = sorted(set(feature_dims))
        if len(dims) != 1:
            per_feature = dict(zip(feature_names, feature_dims))
            raise ValueError(
                f"model.kind dlrm: all sparse features must share one embedding dim, got "
                f"{per_feature}; give every table the same dim or use model.kind: dcn"
            )
        return DLRM(
            embedding,
            feature_names,
            embedding_dim=dims[0],
            num_dense=num_dense,
            bottom_mlp=cfg.bottom_mlp,
            top_mlp=cfg.top_mlp,
            num_tasks=num_tasks,
        )
    if kind == "dcn":
        return DCNv2(
            embedding,
            feature_names,
            feature_dims,
            num_dense=num_dense,
            deep_mlp=cfg.top_mlp,
            num_layers=cfg.dcn_layers,
            low_rank=cfg.dcn_low_rank,
            num_tasks=num_tasks,
        )
    if kind in ("deepfm", "wide_deep"):
        cls = DeepFM if kind == "deepfm" else WideDeep
        return cls(embedding, feature_names, feature_dims, num_dense=num_dense,
                   deep_mlp=cfg.top_mlp, num_tasks=num_tasks)
    raise ValueError(f"model.kind: unknown model {kind!r} (known: dlrm, dcn, deepfm, "
                     f"wide_deep)")

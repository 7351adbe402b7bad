"""DCN-v2 (Wang et al., 2021), stacked: cross network → deep MLP → logit.

Built from torchrec's :class:`~torchrec.modules.crossnet.LowRankCrossNet` (or the
full-rank :class:`~torchrec.modules.crossnet.CrossNet`) and
:class:`~torchrec.modules.mlp.MLP`. Unlike DLRM, features may have different dims: the
cross network runs on the flat concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.models.dlrm import (
    check_dense,
    check_features,
    concat_pooled,
    logit_head,
)


class DCNv2(nn.Module):
    """DCN-v2: ``x0 = [dense, e_f0, e_f1, ...]`` → cross layers → deep MLP → logit.

    Shapes: ``x0`` is ``[B, N]`` with ``N = num_dense + sum(feature_dims)``; each cross
    layer maps ``[B, N] → [B, N]`` (``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``, with
    ``W_l = U_l V_l`` of rank ``low_rank`` when ``low_rank > 0``); the deep MLP and the
    1-wide linear logit map it to ``[B, 1]``; forward returns ``[B]``.

    Args:
        embedding: module with ``forward(kjt) -> KeyedTensor``, pooled per feature.
        feature_names: sparse features consumed, in this order.
        feature_dims: pooled dim of each feature (may differ).
        num_dense: number of dense features (``>= 0``), fed to the cross net raw.
        deep_mlp: hidden sizes of the ReLU MLP after the cross net (``ModelConfig.top_mlp``);
            may be empty.
        num_layers: number of cross layers (``>= 1``).
        low_rank: rank of each cross layer's kernel; 0 = full rank (``N x N``).
        num_tasks: ``T``: with ``T > 1`` one deep MLP per task and forward returns
            ``[B, T]``.
    """

    def __init__(
        self,
        embedding: nn.Module,
        feature_names: Sequence[str],
        feature_dims: Sequence[int],
        num_dense: int,
        deep_mlp: Sequence[int],
        num_layers: int,
        low_rank: int,
        num_tasks: int = 1,
    ) -> None:
        super().__init__()
        check_features(feature_names, feature_dims)
        if num_dense < 0:
            raise ValueError(f"num_dense: must be >= 0, got {num_dense}")
        if num_layers < 1:
            raise ValueError(f"num_layers: DCN needs >= 1 cross layer, got {num_layers}")
        if low_rank < 0:
            raise ValueError(f"low_rank: must be >= 0 (0 = full rank), got {low_rank}")
        self.embedding = embedding
        self.feature_names: list[str] = list(feature_names)
        self.feature_dims: list[int] = list(feature_dims)
        self.num_dense = num_dense
        in_features = num_dense + sum(self.feature_dims)
        self.in_features = in_features
        self.crossnet: nn.Module = (
            LowRankCrossNet(in_features, num_layers, low_rank=low_rank)
            if low_rank > 0
            else CrossNet(in_features, num_layers)
        )
        self.num_tasks = num_tasks
        self.head = logit_head(in_features, deep_mlp, num_tasks)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Scores a batch.

        Args:
            dense: ``[B, num_dense]`` float dense features.
            sparse: KJT with (at least) ``feature_names`` as keys, batch size ``B``.

        Returns:
            ``[B]`` raw logits (``[B, T]`` for ``T`` tasks).
        """
        check_dense(dense, self.num_dense)
        pooled = concat_pooled(self.embedding(sparse), self.feature_names, self.feature_dims)
        x0 = torch.cat([dense.to(pooled.dtype), pooled], dim=1) if self.num_dense else pooled
        return self.head(self.crossnet(x0)).squeeze(-1)

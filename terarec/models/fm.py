"""DeepFM (Guo et al., 2017) and Wide & Deep (Cheng et al., 2016).

Both need a first-order ("wide") weight per id next to its embedding. The rows carry
it: a feature's row is ``[w | v]``, ``w`` the id's first-order weight and ``v`` its
``D``-dim embedding, so a table of dim ``D + 1`` serves both parts with one lookup
(TorchRec models do this with a second, dim-1 table per feature). Sum pooling sums both
(a multi-hot bag's first-order term is the sum of its ids' weights).

* **DeepFM**: ``logit = b + sum_f w_f + <a, x> + FM(v) + deep([v_f..., x])`` with ``x``
  the dense features, ``FM(v) = 1/2 sum_d ((sum_f v_fd)^2 - sum_f v_fd^2)`` (= the sum
  of ``<v_i, v_j>`` over feature pairs ``i < j``: the paper's field-wise FM; TorchRec's
  ``FactorizationMachine`` sums over the flattened vector instead, which pairs every
  scalar with every other) and ``deep`` TorchRec's ``DeepFM`` module over a ReLU MLP
  ending in one unit.
* **Wide & Deep**: ``logit = b + sum_f w_f + <a, x> + deep([v_f..., x])``: the wide
  part is the linear model over the ids (and dense features), the deep part an MLP.

Shapes: pooled ``[B, F (D + 1)]`` in model feature order, dense ``[B, num_dense]``;
forward returns logits ``[B]``. With ``T > 1`` tasks each task has its own deep MLP
(the wide and FM terms are shared) and forward returns ``[B, T]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.modules.deepfm import DeepFM as TorchRecDeepFM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.models.dlrm import (
    check_dense,
    check_features,
    concat_pooled,
    logit_head,
)


def fm_pairs(v: torch.Tensor) -> torch.Tensor:
    """``sum_{i<j} <v_i, v_j>`` of ``v [B, F, D]`` as ``[B]`` (the FM identity)."""
    s = v.sum(1)
    return 0.5 * (s * s - (v * v).sum(1)).sum(1)


class _WideAndEmbeddings(nn.Module):
    """What both models share: the feature layout, the wide part, the deep MLP."""

    def __init__(self, embedding: nn.Module, feature_names: Sequence[str],
                 feature_dims: Sequence[int], num_dense: int, deep_mlp: Sequence[int],
                 kind: str, num_tasks: int = 1) -> None:
        super().__init__()
        check_features(feature_names, feature_dims)
        dims = sorted(set(feature_dims))
        if len(dims) != 1 or dims[0] < 2:
            per = dict(zip(feature_names, feature_dims))
            raise ValueError(f"model.kind {kind}: every feature needs one row width D + 1 "
                             f"(the first-order weight, then a D-dim embedding; D >= 1), "
                             f"got {per}")
        if num_dense < 0:
            raise ValueError(f"num_dense: must be >= 0, got {num_dense}")
        self.embedding = embedding
        self.feature_names: list[str] = list(feature_names)
        self.feature_dims: list[int] = list(feature_dims)
        self.num_dense = num_dense
        self.embedding_dim = dims[0] - 1
        self.bias = nn.Parameter(torch.zeros(()))
        self.dense_linear = nn.Linear(num_dense, 1, bias=False) if num_dense else None
        self.num_tasks = num_tasks
        self.deep = TorchRecDeepFM(logit_head(
            len(self.feature_names) * self.embedding_dim + num_dense, deep_mlp, num_tasks))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """``dense [B, num_dense]``, ``sparse`` KJT (at least ``feature_names``) →
        logits ``[B]``."""
        check_dense(dense, self.num_dense)
        pooled = concat_pooled(self.embedding(sparse), self.feature_names, self.feature_dims)
        return self.forward_pooled(dense, pooled)

    def parts(self, dense: torch.Tensor, pooled: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The wide logit ``[B]`` (``[B, 1]`` for several tasks), the embeddings ``v [B,
        F, D]`` and the deep logit ``[B]`` (``[B, T]``) of pooled rows ``[B, F (D + 1)]``."""
        b = pooled.shape[0]
        rows = pooled.view(b, len(self.feature_names), self.embedding_dim + 1)
        v = rows[:, :, 1:]
        wide = self.bias + rows[:, :, 0].sum(1)
        deep_in = [v]
        if self.dense_linear is not None:
            x = dense.to(pooled.dtype)
            wide = wide + self.dense_linear(x).squeeze(-1)
            deep_in.append(x.unsqueeze(1))
        if self.num_tasks > 1:
            return wide.unsqueeze(-1), v, self.deep(deep_in)
        return wide, v, self.deep(deep_in).squeeze(-1)

    def forward_pooled(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DeepFM(_WideAndEmbeddings):
    """DeepFM: first-order + field-wise FM + deep MLP (see the module docstring).

    Args:
        embedding: module with ``forward(kjt) -> KeyedTensor``, pooled per feature.
        feature_names: sparse features consumed, in this order.
        feature_dims: pooled row width of each feature: ``D + 1`` for all.
        num_dense: dense features (first-order weights and deep-MLP inputs).
        deep_mlp: hidden sizes of the deep ReLU MLP (a 1-wide logit follows).
        num_tasks: ``T``: one deep MLP per task; forward returns ``[B, T]`` for ``T > 1``.
    """

    def __init__(self, embedding: nn.Module, feature_names: Sequence[str],
                 feature_dims: Sequence[int], num_dense: int, deep_mlp: Sequence[int],
                 num_tasks: int = 1) -> None:
        super().__init__(embedding, feature_names, feature_dims, num_dense, deep_mlp,
                         "deepfm", num_tasks)

    def forward_pooled(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` of pooled rows ``[B, F (D + 1)]`` and ``dense``."""
        wide, v, deep = self.parts(dense, pooled)
        fm = fm_pairs(v)
        return wide + (fm.unsqueeze(-1) if self.num_tasks > 1 else fm) + deep


class WideDeep(_WideAndEmbeddings):
    """Wide & Deep: the linear model over ids and dense features + a deep MLP (see
    the module docstring; arguments as :class:`DeepFM`'s)."""

    def __init__(self, embedding: nn.Module, feature_names: Sequence[str],
                 feature_dims: Sequence[int], num_dense: int, deep_mlp: Sequence[int],
                 num_tasks: int = 1) -> None:
        super().__init__(embedding, feature_names, feature_dims, num_dense, deep_mlp,
                         "wide_deep", num_tasks)

    def forward_pooled(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` of pooled rows ``[B, F (D + 1)]`` and ``dense``."""
        wide, _, deep = self.parts(dense, pooled)
        return wide + deep

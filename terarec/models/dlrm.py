"""DLRM (Naumov et al., 2019) over any pooled-embedding module.

The embedding module is injected: anything with ``forward(kjt) -> KeyedTensor`` that
pools one vector per feature (``torchrec.EmbeddingBagCollection`` or terarec's
``HierarchicalEmbeddingBagCollection``). The arches are torchrec's own
(:class:`~torchrec.models.dlrm.DenseArch`, :class:`~torchrec.models.dlrm.InteractionArch`,
:class:`~torchrec.models.dlrm.OverArch`); this module only wires them to an external
embedding and checks the shapes once, with errors that say what to change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


def concat_pooled(
    kt: KeyedTensor, feature_names: Sequence[str], feature_dims: Sequence[int]
) -> torch.Tensor:
    """Concatenates pooled embeddings in ``feature_names`` order, checking their dims.

    Args:
        kt: pooled embeddings, one ``[B, D_f]`` block per key (any key order; extra
            keys are ignored).
        feature_names: the features the model consumes, in model order.
        feature_dims: ``D_f`` per entry of ``feature_names``.

    Returns:
        ``[B, sum(D_f)]`` float tensor.

    Raises:
        ValueError: a feature is missing from ``kt`` or has a different dim.
    """
    keys = kt.keys()
    dims = kt.length_per_key()
    if list(keys) == list(feature_names) and list(dims) == list(feature_dims):
        return kt.values()  # the common case: no copy
    by_key = dict(zip(keys, dims))
    for name, dim in zip(feature_names, feature_dims):
        if name not in by_key:
            raise ValueError(
                f"embedding output has no feature {name!r} (it has {list(keys)}); the "
                "model's feature_names must be features of the embedding module"
            )
        if by_key[name] != dim:
            raise ValueError(
                f"feature {name!r}: embedding output dim is {by_key[name]}, the model "
                f"was built for {dim}"
            )
    return torch.cat([kt[name] for name in feature_names], dim=1)


def check_features(feature_names: Sequence[str], feature_dims: Sequence[int]) -> None:
    """Raises ValueError unless names are unique, non-empty and match the dims."""
    if len(feature_names) == 0:
        raise ValueError("feature_names: a CTR model needs at least one sparse feature")
    if len(set(feature_names)) != len(feature_names):
        raise ValueError(f"feature_names: duplicate names in {list(feature_names)}")
    if len(feature_dims) != len(feature_names):
        raise ValueError(
            f"feature_dims: {len(feature_dims)} dims for {len(feature_names)} features"
        )
    if min(feature_dims) < 1:
        raise ValueError(f"feature_dims: must all be >= 1, got {list(feature_dims)}")


def check_dense(dense: torch.Tensor, num_dense: int) -> None:
    """Raises ValueError unless ``dense`` is ``[B, num_dense]``."""
    if dense.dim() != 2 or dense.shape[1] != num_dense:
        raise ValueError(f"dense: expected shape [B, {num_dense}], got {list(dense.shape)}")


def logit_head(in_features: int, hidden: Sequence[int], num_tasks: int = 1) -> nn.Module:
    """ReLU MLP of sizes ``hidden`` followed by a 1-wide linear logit (no activation):
    ``[B, in_features] -> [B, 1]``; with ``num_tasks > 1`` one such tower per task
    (:class:`TaskTowers`, ``-> [B, num_tasks]``).

    ``hidden`` may be empty: then the head is one ``Linear(in_features, 1)``.

    Raises:
        ValueError: ``num_tasks < 1``.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks: must be >= 1, got {num_tasks}")
    if num_tasks > 1:
        return TaskTowers(in_features, hidden, num_tasks)
    if len(hidden) == 0:
        return nn.Linear(in_features, 1)
    # OverArch = MLP(relu) over all but the last size, then a plain Linear.
    return OverArch(in_features, [*hidden, 1])


class TaskTowers(nn.Module):
    """Multi-task heads over one shared input (shared-bottom multi-task learning): a
    :func:`logit_head` tower per task, ``[B, in_features] -> [B, num_tasks]`` logits.

    Everything below the heads (embeddings, interaction, cross net) is shared by the
    tasks; each task has its own MLP.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"num_tasks: TaskTowers is for >= 2 tasks, got {num_tasks}")
        self.towers = nn.ModuleList(logit_head(in_features, hidden) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([t(x) for t in self.towers], dim=1)


class DLRM(nn.Module):
    """DLRM: bottom MLP on dense features, pairwise dot interaction, top MLP → logit.

    All sparse features must share one embedding dim ``D`` and the bottom MLP must end
    in ``D`` (the dense vector joins the dot products). With ``num_dense == 0`` there is
    no bottom MLP: a learned constant ``D``-vector takes the dense slot, so the
    interaction still carries one learned first-order term per feature
    (``<c, e_f>``) next to the ``F choose 2`` sparse-sparse dots.

    Shapes (``F`` features, dim ``D``): interaction output is
    ``[B, D + F + F*(F-1)/2]``; the top MLP maps it to ``[B, 1]``; forward returns ``[B]``
    (``[B, T]`` for ``T`` tasks).

    Args:
        embedding: module with ``forward(kjt) -> KeyedTensor``, pooled per feature.
        feature_names: sparse features consumed, in this order.
        embedding_dim: ``D``, the dim of every feature.
        num_dense: number of dense features (``>= 0``).
        bottom_mlp: layer sizes of the dense arch; the last must equal ``D``. Ignored
            when ``num_dense == 0``.
        top_mlp: hidden sizes of the over arch; a 1-wide linear logit follows.

    Example:
        >>> ebc = EmbeddingBagCollection(tables=[...])  # two features of dim 8
        >>> model = DLRM(ebc, ["f0", "f1"], 8, num_dense=13, bottom_mlp=[32, 8],
        ...              top_mlp=[16])
        >>> model(dense, kjt).shape
        torch.Size([B])
    """

    def __init__(
        self,
        embedding: nn.Module,
        feature_names: Sequence[str],
        embedding_dim: int,
        num_dense: int,
        bottom_mlp: Sequence[int],
        top_mlp: Sequence[int],
        num_tasks: int = 1,
    ) -> None:
        super().__init__()
        check_features(feature_names, [embedding_dim] * len(feature_names))
        if num_dense < 0:
            raise ValueError(f"num_dense: must be >= 0, got {num_dense}")
        if num_dense > 0:
            if len(bottom_mlp) == 0:
                raise ValueError("bottom_mlp: needs at least one layer when num_dense > 0")
            if bottom_mlp[-1] != embedding_dim:
                raise ValueError(
                    f"bottom_mlp: the last size ({bottom_mlp[-1]}) must equal the "
                    f"embedding dim ({embedding_dim}) for DLRM's dot interaction; e.g. "
                    f"bottom_mlp: {[*bottom_mlp[:-1], embedding_dim]}"
                )
        self.embedding = embedding
        self.feature_names: list[str] = list(feature_names)
        self.embedding_dim = embedding_dim
        self.num_dense = num_dense
        f, d = len(self.feature_names), embedding_dim
        self.dense_arch: nn.Module | None = (
            DenseArch(num_dense, list(bottom_mlp)) if num_dense > 0 else None
        )
        # Stand-in for the bottom MLP output when there are no dense features.
        self.dense_const: nn.Parameter | None = (
            nn.Parameter(torch.empty(d).uniform_(-(d**-0.5), d**-0.5)) if num_dense == 0 else None
        )
        self.inter_arch = InteractionArch(num_sparse_features=f)
        self.num_tasks = num_tasks
        self.over_arch = logit_head(d + f + f * (f - 1) // 2, top_mlp, num_tasks)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Scores a batch.

        Args:
            dense: ``[B, num_dense]`` float dense features.
            sparse: KJT with (at least) ``feature_names`` as keys, batch size ``B``.

        Returns:
            ``[B]`` raw logits (``[B, T]`` for ``T`` tasks).
        """
        check_dense(dense, self.num_dense)
        f, d = len(self.feature_names), self.embedding_dim
        pooled = concat_pooled(self.embedding(sparse), self.feature_names, [d] * f)
        b = pooled.shape[0]
        if self.dense_arch is not None:
            dense_vec = self.dense_arch(dense)
        else:
            assert self.dense_const is not None
            dense_vec = self.dense_const.unsqueeze(0).expand(b, d)
        inter = self.inter_arch(dense_vec, pooled.view(b, f, d))
        return self.over_arch(inter).squeeze(-1)

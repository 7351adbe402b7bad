"""A trained model cut for request-centric scoring: the user side once, candidates by N.

A ranking request carries one user (user/context features, maybe dense features) and
``N`` candidate ads. :func:`split_model` turns a trained model into tensor-only modules
that ``torch.export`` can trace (the embedding lookup stays outside them: they take
pooled embeddings):

* **split** (DLRM with at least one user-side feature): ``user(dense, pooled) ->
  (slots, partial)`` runs once per user; ``candidate(slots, partial, owner, dense,
  pooled) -> logits`` runs on the ``N`` candidates, ``owner [N]`` naming each
  candidate's user (several requests can share one call).
* **single** (DCN-v2, whose cross layers mix every feature with every other from the
  first layer on; or a model with no user-side feature): ``model(dense, pooled) ->
  logits`` on ``[N, ...]``; the caller still looks the user side up once and repeats
  the pooled vectors.

What DLRM shares. DLRM's interaction takes the dot product of every pair of *slots*
(slot 0: the bottom MLP's output, then one pooled embedding per feature), and its top
MLP starts with a linear layer ``h1 = W x + b`` over ``x = [z, dots]``. The user side
``S`` (the user features, and slot 0 when the dense features are user-side or the
model has none) and the candidate side ``T`` give::

    h1 = (W_z z + W_SS dots(S, S) + b)          # user part: once per user
       + W_T [z] + W_ST dots(S, T) + W_TT dots(T, T)   # per candidate

so per user: the bottom MLP (user-side dense), the user pooled embeddings, their
``|S|(|S|-1)/2`` dots and their share of the first layer; per candidate: ``|T|`` pooled
embeddings, ``|T||S| + |T|(|T|-1)/2`` dots, a first layer over those columns only and
the rest of the top MLP. The sums are the model's own up to float rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from terarec.models.dcn import DCNv2
from terarec.models.dlrm import DLRM


class SplitError(ValueError):
    """The user/candidate split does not fit the model (names the config field)."""


@dataclass
class ModelSplit:
    """What :func:`split_model` returns.

    Attributes:
        mode: ``"split"`` (``user`` and ``candidate``) or ``"single"`` (``candidate``
            is the whole model on pooled inputs; ``user`` is None).
        user_features: user-side features, in the order ``user`` takes them.
        candidate_features: candidate-side features, in the order ``candidate`` takes
            them (``"single"``: every feature, in model order).
        user_dense: dense features are an input of ``user`` (else of ``candidate``).
        user: ``(dense [U, Du], pooled [U, Fu, D]) -> (slots [U, |S|, D],
            partial [U, H1])``.
        candidate: split: ``(slots [U, |S|, D], partial [U, H1], owner [N] int64,
            dense [N, Dc], pooled [N, Fc, D]) -> logits [N]``; single: ``(dense
            [N, num_dense], pooled [N, sum dims]) -> logits [N]``.
        shared: what is computed once per request, in words.
    """

    mode: str
    user_features: list[str]
    candidate_features: list[str]
    user_dense: bool
    user: Optional[nn.Module]
    candidate: nn.Module
    shared: str


def split_model(
    model: nn.Module, user_features: Sequence[str], user_dense: bool
) -> ModelSplit:
    """Cuts ``model`` (a trained DLRM or DCN-v2) for request-centric scoring.

    Args:
        model: the trained model (its embedding module is not used).
        user_features: the user/context-side sparse features (``model.user_features``).
        user_dense: the dense features are user-side (``model.user_dense``).

    Raises:
        SplitError: a user feature the model does not have, or no candidate-side input
            left (every candidate would get the same score).
    """
    names: list[str] = list(model.feature_names)  # type: ignore[arg-type]
    unknown = [f for f in user_features if f not in names]
    if unknown:
        raise SplitError(f"model.user_features: {unknown} are not features of the model "
                         f"(it has {names})")
    user = [f for f in names if f in set(user_features)]
    cand = [f for f in names if f not in set(user_features)]
    num_dense = int(model.num_dense)  # type: ignore[arg-type]
    if not cand and (user_dense or num_dense == 0):
        raise SplitError("model.user_features: every input is user-side, so every "
                         "candidate would get the same score; leave the ad features out")
    if isinstance(model, DLRM) and user:
        return ModelSplit(
            "split", user, cand, user_dense, _DLRMUser(model, user, user_dense),
            _DLRMCandidate(model, user, cand, user_dense),
            "bottom MLP (user-side dense features), user pooled embeddings, their "
            "pairwise dots and their share of the top MLP's first layer")
    if not isinstance(model, (DLRM, DCNv2)):
        raise SplitError(f"model: cannot export a {type(model).__name__}")
    why = ("DCN-v2's cross layers mix every feature from the first layer on"
           if isinstance(model, DCNv2) else "no user-side feature (model.user_features)")
    return ModelSplit("single", [], names, user_dense, None, _Pooled(model),
                      f"the user-side embedding lookup only ({why})")


def _slots(names: list[str], side: list[str]) -> list[int]:
    """Interaction slots of the features ``side`` (slot 0 is the dense vector)."""
    return [1 + names.index(f) for f in side]


def _pair_columns(n: int, pairs: list[tuple[int, int]], offset: int) -> list[int]:
    """Columns of the slot pairs ``(a, b)`` in DLRM's flat triu output over ``n`` slots."""
    tri = torch.triu_indices(n, n, offset=1)
    where = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(tri[0], tri[1]))}
    return [offset + where[(min(a, b), max(a, b))] for a, b in pairs]


def _first_layer(model: DLRM) -> tuple[nn.Linear, nn.Module]:
    """The top MLP's first linear layer and what follows it (activation included)."""
    head = model.over_arch
    if isinstance(head, nn.Linear):
        return head, nn.Identity()
    mlp, last = head.model[0], head.model[1]
    layers = list(mlp._mlp)
    return layers[0]._linear, nn.Sequential(nn.ReLU(), *copy.deepcopy(layers[1:]),
                                            copy.deepcopy(last))


def _dense_user(model: DLRM, user_dense: bool) -> bool:
    """Slot 0 (dense vector) is user-side: user dense features, or a learned constant."""
    return user_dense or model.dense_arch is None


class _DLRMUser(nn.Module):
    """User part of a DLRM (see the module docstring)."""

    def __init__(self, model: DLRM, user: list[str], user_dense: bool) -> None:
        super().__init__()
        names, d = model.feature_names, model.embedding_dim
        self.dense_slot = _dense_user(model, user_dense)
        self.dense_arch = copy.deepcopy(model.dense_arch) if user_dense else None
        const = model.dense_const
        self.dense_const = None if const is None else nn.Parameter(const.detach().clone())
        slots = ([0] if self.dense_slot else []) + _slots(names, user)
        n = len(names) + 1
        pairs = [(slots[i], slots[j]) for i in range(len(slots))
                 for j in range(i + 1, len(slots))]
        cols = (list(range(d)) if self.dense_slot else []) + _pair_columns(n, pairs, d)
        first, _ = _first_layer(model)
        self.weight = nn.Parameter(first.weight.detach()[:, cols].clone())
        self.bias = nn.Parameter(first.bias.detach().clone())
        self.register_buffer("tri", torch.triu_indices(len(slots), len(slots), offset=1),
                             persistent=False)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """dense ``[U, Du]``, pooled ``[U, Fu, D]`` → slots ``[U, |S|, D]``, partial
        ``[U, H1]``."""
        parts = [pooled]
        if self.dense_arch is not None:
            parts.insert(0, self.dense_arch(dense).unsqueeze(1))
        elif self.dense_const is not None:
            u, d = pooled.shape[0], pooled.shape[2]
            parts.insert(0, self.dense_const.view(1, 1, d).expand(u, 1, d))
        slots = torch.cat(parts, 1) if len(parts) > 1 else pooled
        dots = torch.bmm(slots, slots.transpose(1, 2))[:, self.tri[0], self.tri[1]]
        x = torch.cat([slots[:, 0], dots], 1) if self.dense_slot else dots
        return slots, nn.functional.linear(x, self.weight, self.bias)


class _DLRMCandidate(nn.Module):
    """Candidate part of a DLRM (see the module docstring)."""

    def __init__(self, model: DLRM, user: list[str], cand: list[str],
                 user_dense: bool) -> None:
        super().__init__()
        names, d = model.feature_names, model.embedding_dim
        dense_user = _dense_user(model, user_dense)
        self.dense_arch = None if dense_user else copy.deepcopy(model.dense_arch)
        s = ([0] if dense_user else []) + _slots(names, user)
        t = ([] if dense_user else [0]) + _slots(names, cand)
        n = len(names) + 1
        cross = [(a, b) for a in t for b in s]  # row-major [|T|, |S|], as bmm gives it
        inner = [(t[i], t[j]) for i in range(len(t)) for j in range(i + 1, len(t))]
        cols = ([] if dense_user else list(range(d))) + _pair_columns(n, cross + inner, d)
        first, rest = _first_layer(model)
        self.weight = nn.Parameter(first.weight.detach()[:, cols].clone())
        self.rest = rest
        self.register_buffer("tri", torch.triu_indices(len(t), len(t), offset=1),
                             persistent=False)

    def forward(self, slots: torch.Tensor, partial: torch.Tensor, owner: torch.Tensor,
                dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """See :class:`ModelSplit`; returns logits ``[N]``."""
        mine = pooled
        if self.dense_arch is not None:
            mine = torch.cat([self.dense_arch(dense).unsqueeze(1), pooled], 1)
        cross = torch.bmm(mine, slots[owner].transpose(1, 2)).flatten(1)
        inner = torch.bmm(mine, mine.transpose(1, 2))[:, self.tri[0], self.tri[1]]
        parts = [cross, inner]
        if self.dense_arch is not None:
            parts.insert(0, mine[:, 0])
        h = partial[owner] + nn.functional.linear(torch.cat(parts, 1), self.weight)
        return self.rest(h).squeeze(-1)


class _Pooled(nn.Module):
    """A whole DLRM / DCN-v2 on pooled inputs ``(dense [N, num_dense], pooled [N,
    sum dims])`` in model feature order → logits ``[N]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        emb = model.embedding
        model.embedding = nn.Identity()  # never copy the tables
        try:
            self.model = copy.deepcopy(model)
        finally:
            model.embedding = emb
        self.is_dlrm = isinstance(model, DLRM)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        m = self.model
        if not self.is_dlrm:
            x0 = torch.cat([dense.to(pooled.dtype), pooled], 1) if m.num_dense else pooled
            return m.head(m.crossnet(x0)).squeeze(-1)
        b, d = pooled.shape[0], m.embedding_dim
        if m.dense_arch is not None:
            z = m.dense_arch(dense)
        else:
            z = m.dense_const.unsqueeze(0).expand(b, d)
        inter = m.inter_arch(z, pooled.view(b, -1, d))
        return m.over_arch(inter).squeeze(-1)

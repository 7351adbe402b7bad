"""A trained model cut for request-centric scoring: the user side once, candidates by N.

A ranking request carries one user (user/context features, maybe dense features) and
``N`` candidate ads. :func:`split_model` turns a trained model into tensor-only modules
that ``torch.export`` can trace (the embedding lookup stays outside them: they take
pooled embeddings):

* **split** (DLRM with at least one user-side feature): ``user(dense, pooled) ->
  (state, partial)`` runs once per user (several users in one call);
  ``candidate(state, partial, dense, pooled) -> logits`` runs on the ``N`` candidates
  of one user.
* **single** (DCN-v2, whose cross layers mix every feature with every other from the
  first layer on; DeepFM and Wide & Deep, whose deep MLP does; or a model with no
  user-side feature): ``model(dense, pooled) ->
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

The cross term is linear in the candidate's embeddings, so it can also be *folded*
into the user part: ``W_ST dots(S, T) = G e_T`` with ``G = sum_s W_(s,t) u_s`` (``[|T| D,
H1]``, once per user), which costs ``|T| D H1`` per candidate instead of
``|T||S| D + |T||S| H1``. :func:`split_model` folds when that is cheaper (small ``D``
against ``|S|``); ``state`` is then ``G``, else the user slots.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from terarec.models.dcn import DCNv2
from terarec.models.dlrm import DLRM, TaskTowers
from terarec.models.fm import DeepFM, WideDeep


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
        user: ``(dense [U, Du], pooled [U, Fu, D]) -> (state, partial [U, H1])``
            with ``state`` the user slots ``[U, |S|, D]`` or, folded, ``G [U, |T| D,
            H1]``.
        candidate: split: ``(state [1, ...], partial [1, H1], dense [N, Dc], pooled
            [N, Fc, D]) -> logits [N]`` for one user's ``N`` candidates; single:
            ``(dense [N, num_dense], pooled [N, sum dims]) -> logits [N]``.
        folded: the cross term is folded into the user part.
        shared: what is computed once per request, in words.
    """

    mode: str
    user_features: list[str]
    candidate_features: list[str]
    user_dense: bool
    user: Optional[nn.Module]
    candidate: nn.Module
    shared: str
    folded: bool = False


def split_model(
    model: nn.Module, user_features: Sequence[str], user_dense: bool,
    fold: Optional[bool] = None,
) -> ModelSplit:
    """Cuts ``model`` (a trained DLRM or DCN-v2) for request-centric scoring.

    Args:
        model: the trained model (its embedding module is not used).
        user_features: the user/context-side sparse features (``model.user_features``).
        user_dense: the dense features are user-side (``model.user_dense``).
        fold: fold the cross term into the user part; None: when it costs less.

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
        d, h1 = model.embedding_dim, _first_layer(model)[0].out_features
        s = len(user) + int(_dense_user(model, user_dense))
        fold = d * h1 < s * d + s * h1 if fold is None else fold
        return ModelSplit(
            "split", user, cand, user_dense, _DLRMUser(model, user, cand, user_dense, fold),
            _DLRMCandidate(model, user, cand, user_dense, fold),
            "bottom MLP (user-side dense features), user pooled embeddings, their "
            "pairwise dots and their share of the top MLP's first layer"
            + (" (the user-candidate dots folded into it)" if fold else ""), fold)
    if not isinstance(model, (DLRM, DCNv2, DeepFM, WideDeep)):
        raise SplitError(f"model: cannot export a {type(model).__name__}")
    why = ("DCN-v2's cross layers mix every feature from the first layer on"
           if isinstance(model, DCNv2) else
           "its deep MLP mixes every feature from the first layer on"
           if isinstance(model, (DeepFM, WideDeep)) else
           "no user-side feature (model.user_features)")
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
    """The top MLP's first linear layer and what follows it (activation included).

    Several tasks: the towers' first layers stacked into one ``[sum H1, in]`` linear
    (one GEMM for all tasks) and a module taking its ``[N, sum H1]`` output to logits
    ``[N, T]``."""
    head = model.over_arch
    if isinstance(head, TaskTowers):
        parts = [_tower_first(t) for t in head.towers]
        lin = nn.Linear(parts[0][0].in_features, sum(f.out_features for f, _ in parts))
        with torch.no_grad():
            lin.weight.copy_(torch.cat([f.weight for f, _ in parts]))
            lin.bias.copy_(torch.cat([f.bias for f, _ in parts]))
        return lin, _TowerRests([r for _, r in parts], [f.out_features for f, _ in parts])
    return _tower_first(head)


class _TowerRests(nn.Module):
    """Each task tower's layers after its first, on its slice of the stacked first
    layer's output ``[N, sum H1]`` → logits ``[N, T]``."""

    def __init__(self, rests: list[nn.Module], widths: list[int]) -> None:
        super().__init__()
        self.rests = nn.ModuleList(rests)
        self.widths = widths

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([r(x) for r, x in zip(self.rests, h.split(self.widths, 1))], 1)


def _tower_first(head: nn.Module) -> tuple[nn.Linear, nn.Module]:
    """:func:`_first_layer` of one ``logit_head``."""
    if isinstance(head, nn.Linear):
        return head, nn.Identity()
    mlp, last = head.model[0], head.model[1]
    layers = list(mlp._mlp)
    return layers[0]._linear, nn.Sequential(nn.ReLU(), *copy.deepcopy(layers[1:]),
                                            copy.deepcopy(last))


def _dense_user(model: DLRM, user_dense: bool) -> bool:
    """Slot 0 (dense vector) is user-side: user dense features, or a learned constant."""
    return user_dense or model.dense_arch is None


class _Sides:
    """The slots and first-layer columns of a DLRM split (see the module docstring)."""

    def __init__(self, model: DLRM, user: list[str], cand: list[str], user_dense: bool
                 ) -> None:
        names, d = model.feature_names, model.embedding_dim
        self.dense_user = _dense_user(model, user_dense)
        self.s = ([0] if self.dense_user else []) + _slots(names, user)
        self.t = ([] if self.dense_user else [0]) + _slots(names, cand)
        n, s, t = len(names) + 1, self.s, self.t
        first, self.rest = _first_layer(model)
        w = first.weight.detach()
        self.bias = first.bias.detach()
        # dots(S, S) as the full [|S|, |S|] product (no gather): weight 0 off the
        # upper triangle
        self.w_user = torch.zeros(w.shape[0], (d if self.dense_user else 0) + len(s) ** 2,
                                  dtype=w.dtype)
        if self.dense_user:
            self.w_user[:, :d] = w[:, :d]
        at = d if self.dense_user else 0
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                self.w_user[:, at + i * len(s) + j] = w[:, _pair_columns(n, [(s[i], s[j])],
                                                                        d)[0]]
        self.w_cross = w[:, _pair_columns(n, [(a, b) for a in t for b in s], d)]
        # dots(T, T) as the full [|T|, |T|] product (no gather): weight 0 off the
        # upper triangle
        nt = len(t)
        self.w_inner = torch.zeros(w.shape[0], nt * nt, dtype=w.dtype)
        for i in range(nt):
            for j in range(i + 1, nt):
                self.w_inner[:, i * nt + j] = w[:, _pair_columns(n, [(t[i], t[j])], d)[0]]
        self.w_z = w[:, [] if self.dense_user else list(range(d))]


class _DLRMUser(nn.Module):
    """User part of a DLRM (see the module docstring)."""

    def __init__(self, model: DLRM, user: list[str], cand: list[str], user_dense: bool,
                 fold: bool) -> None:
        super().__init__()
        sides = _Sides(model, user, cand, user_dense)
        self.dense_slot = sides.dense_user
        self.dense_arch = copy.deepcopy(model.dense_arch) if user_dense else None
        const = model.dense_const
        self.dense_const = None if const is None else nn.Parameter(const.detach().clone())
        self.weight = nn.Parameter(sides.w_user.clone())
        self.bias = nn.Parameter(sides.bias.clone())
        n_s, n_t = len(sides.s), len(sides.t)
        # folded: G[u] = sum_s W_(t,s) u_s, as [|T| D, H1]; the weight as [H1 |T|, |S|]
        self.fold = (nn.Parameter(sides.w_cross.reshape(-1, n_s).clone()) if fold else None)
        self.n_t = n_t

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """dense ``[U, Du]``, pooled ``[U, Fu, D]`` → state, partial ``[U, H1]``."""
        parts = [pooled]
        if self.dense_arch is not None:
            parts.insert(0, self.dense_arch(dense).unsqueeze(1))
        elif self.dense_const is not None:
            u, d = pooled.shape[0], pooled.shape[2]
            parts.insert(0, self.dense_const.view(1, 1, d).expand(u, 1, d))
        slots = torch.cat(parts, 1) if len(parts) > 1 else pooled
        u, s, d = slots.shape
        dots = torch.bmm(slots, slots.transpose(1, 2)).reshape(u, s * s)
        x = torch.cat([slots[:, 0], dots], 1) if self.dense_slot else dots
        partial = nn.functional.linear(x, self.weight, self.bias)
        if self.fold is None:
            return slots, partial
        g = torch.matmul(self.fold, slots)  # [U, H1 |T|, D]
        g = g.reshape(u, -1, self.n_t, d).permute(0, 2, 3, 1)
        return g.reshape(u, self.n_t * d, -1), partial


class _DLRMCandidate(nn.Module):
    """Candidate part of a DLRM for one user's candidates (see the module docstring).

    The first layer's candidate columns are one matrix ``w_cand`` over ``[dots(S, T)
    (unfolded), dots(T, T), z (candidate-side dense)]``: one GEMM per request."""

    def __init__(self, model: DLRM, user: list[str], cand: list[str], user_dense: bool,
                 fold: bool) -> None:
        super().__init__()
        sides = _Sides(model, user, cand, user_dense)
        self.dense_arch = None if sides.dense_user else copy.deepcopy(model.dense_arch)
        self.folded = fold
        cols = ([] if fold else [sides.w_cross]) + [sides.w_inner, sides.w_z]
        self.w_cand = nn.Parameter(torch.cat(cols, 1).clone())
        self.rest = copy.deepcopy(sides.rest)

    def forward(self, state: torch.Tensor, partial: torch.Tensor, dense: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """See :class:`ModelSplit`; returns logits ``[N]`` (``[N, T]``: several tasks)."""
        mine = pooled
        if self.dense_arch is not None:
            mine = torch.cat([self.dense_arch(dense).unsqueeze(1), pooled], 1)
        n, t, d = mine.shape
        cols = [torch.bmm(mine, mine.transpose(1, 2)).reshape(n, t * t)]  # dots(T, T)
        if not self.folded:  # state: the user slots [1, |S|, D]
            cols.insert(0, (mine.reshape(n * t, d) @ state[0].t()).reshape(n, -1))
        if self.dense_arch is not None:
            cols.append(mine[:, 0])
        h = nn.functional.linear(torch.cat(cols, 1), self.w_cand) + partial
        if self.folded:  # state: G [1, |T| D, H1]
            h = h + mine.reshape(n, t * d) @ state[0]
        return self.rest(h).squeeze(-1)


class _Pooled(nn.Module):
    """A whole DLRM / DCN-v2 / DeepFM / Wide & Deep on pooled inputs ``(dense [N,
    num_dense], pooled [N, sum dims])`` in model feature order → logits ``[N]``."""

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
        if hasattr(m, "forward_pooled"):  # DeepFM, Wide & Deep
            return m.forward_pooled(dense, pooled)
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

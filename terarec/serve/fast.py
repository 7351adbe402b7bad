"""The scorer's fast path for the common request: a split model whose features share one
table, and one integer id per feature and entry.

The general path (``Scorer.score_many``) turns every feature into its own column (raw
ids, lengths), hashes them together, splits them again, looks each table's keys up and
stacks the candidates' pooled rows. When every candidate sends one integer id per
feature, the candidates' ids are one ``[Fc, N]`` array: salted and mixed in one pass,
laid out candidate-major, and looked up with the user's ``Fu`` keys in one call, the
rows come back as ``[Fu + N Fc, D]``: the user's ``[Fu, D]``, then the candidates'
``[N, Fc, D]`` as the candidate program takes them, with no copy. A request that does
not fit (a missing feature, a list of ids, strings, floats, ids past int64) takes the
general path, which scores it the same way or names what is wrong.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from terarec.data.keys import feature_salts, salted_by


class FastPath:
    """Keys of a fitting request (see the module docstring).

    Args:
        user: the user-side features, in the user program's order.
        cand: the candidate-side features, in the candidate program's order.
        table: the one table of every feature.
    """

    def __init__(self, user: list[str], cand: list[str], table: str) -> None:
        self.user, self.cand, self.table = list(user), list(cand), table
        self.salt_u = feature_salts(self.user)
        self.salt_c = feature_salts(self.cand)[:, None]

    @staticmethod
    def of(mode: str, user: list[str], cand: list[str], table_of: dict[str, str],
           semantic: dict[str, int]) -> Optional[FastPath]:
        """The fast path of a bundle, or None where it does not apply (single-program
        models, features of several tables, semantic-id features)."""
        tables = {table_of[f] for f in [*user, *cand]}
        if mode != "split" or semantic or len(tables) != 1 or not user or not cand:
            return None
        return FastPath(user, cand, tables.pop())

    def keys(self, user: dict[str, Any], candidates: dict[str, Any], n: int
             ) -> Optional[torch.Tensor]:
        """int64 ``[Fu + n Fc]``: the user's keys in ``self.user`` order, then each
        candidate's in ``self.cand`` order; None when the request does not fit."""
        if len(user) != len(self.user) or len(candidates) != len(self.cand):
            return None
        try:
            u = [user[f] for f in self.user]
            c = [candidates[f] for f in self.cand]
        except KeyError:
            return None
        if not all(type(v) is int for v in u):
            return None
        try:
            uid = np.array(u, np.int64)
            cid = np.array(c)  # int64 [Fc, n] when every entry is one integer id
        except (OverflowError, ValueError, TypeError):
            return None
        if cid.dtype != np.int64 or cid.shape != (len(self.cand), n):
            return None
        ku = salted_by(uid, self.salt_u)
        kc = salted_by(cid, self.salt_c)  # [Fc, n]
        return torch.from_numpy(np.concatenate([ku, kc.T.reshape(-1)]))

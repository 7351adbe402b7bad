"""Pairs changed since the last checkpoint: what a delta checkpoint writes.

A delta checkpoint (``trainer/checkpoint/delta.py``) holds the rows changed since the
previous checkpoint, and the keys deleted since then. :class:`ChangedPairs` is that
bookkeeping for one table group: the ``(composite key, table)`` pairs a training step
prepared (trained or, with admission, looked at), the pairs a k-step merge overwrote,
and the pairs a TTL sweep deleted, each once. It holds keys only, never rows: at save
time the rows are read through the store (``TableGroup.lookup_rows``), and a recorded
pair that has no row any more is a deletion. Its size is bounded by the distinct pairs
changed between two checkpoints.

A pair is identified by its composite key (``TableGroup.composite``), as in the group's
index; two pairs of different tables of one group with equal composite keys (a ~2^-64
event per pair with hashed ids) raise ``ValueError`` rather than lose one of them.
:class:`PairLog` is the append-only set both this and ``ps/touched.py`` keep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from terarec.ps.index.key_map import KeyMap


class PairLog:
    """Unique ``(composite key, table)`` pairs in first-record order: a KeyMap of the
    keys and one column per tensor in ``_columns`` (grown together).

    Args:
        device: where the pairs live (the group's training device).
    """

    _columns: tuple[str, ...] = ("_comp", "_tables")
    _user = "this record"  # who could not tell two tables' pairs apart (the error says)

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._reset(1024)

    def _reset(self, capacity: int) -> None:
        self._map = KeyMap(self.device, capacity=2 * capacity)
        self._comp = torch.empty(capacity, dtype=torch.int64, device=self.device)
        self._tables = torch.empty(capacity, dtype=torch.int64, device=self.device)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _collision(self) -> ValueError:
        return ValueError(f"two tables of one group share a composite key: {self._user} "
                          "cannot tell their rows apart (put the tables in separate groups)")

    def _append(self, comp: torch.Tensor, tables: torch.Tensor,
                fill: Optional[Callable[[torch.Tensor, slice], None]] = None) -> None:
        """Appends the pairs of unique ``comp`` / ``tables`` ``[U]`` not recorded yet;
        ``fill(positions in comp [M], rows slice)`` fills the other columns first."""
        comp, tables = comp.to(self.device), tables.to(self.device, torch.int64)
        at_old = self._map.find(comp)
        seen = (at_old >= 0).nonzero().squeeze(1)
        if seen.numel() and bool((self._tables[at_old[seen]] != tables[seen]).any()):
            raise self._collision()
        new = (at_old < 0).nonzero().squeeze(1)
        m = new.numel()
        if m == 0:
            return
        self._reserve(self._n + m)
        span = slice(self._n, self._n + m)
        self._comp[span] = comp[new]
        self._tables[span] = tables[new]
        if fill is not None:
            fill(new, span)
        self._map.insert(comp[new], torch.arange(self._n, self._n + m, device=self.device))
        self._n += m

    def _reserve(self, n: int) -> None:
        cap = self._comp.numel()
        if n <= cap:
            return
        new_cap = max(n, 2 * cap)
        for name in self._columns:
            old = getattr(self, name)
            grown = torch.empty((new_cap, *old.shape[1:]), dtype=old.dtype, device=self.device)
            grown[: self._n] = old[: self._n]
            setattr(self, name, grown)


class ChangedPairs(PairLog):
    """The unique pairs recorded since the last :meth:`clear`, in first-record order.

    Args:
        device: where the keys live (the group's training device).

    Example::

        c = ChangedPairs("cpu")
        c.record(torch.tensor([5, 9]), torch.tensor([0, 0]))
        c.record(torch.tensor([9, 2]), torch.tensor([0, 0]))
        c.pairs()    # (tensor([5, 9, 2]), tensor([0, 0, 0]))
        c.clear()    # after the checkpoint that holds them is in place
    """

    _user = "a delta checkpoint"

    def record(self, comp: torch.Tensor, tables: torch.Tensor) -> None:
        """Records pairs (``comp``, ``tables``: int64 ``[N]``; repeats are fine)."""
        if comp.numel() == 0:
            return
        comp, order = torch.unique(comp.to(self.device), return_inverse=True)
        first = torch.full((comp.numel(),), order.numel(), dtype=torch.int64,
                           device=self.device)
        first.scatter_reduce_(0, order, torch.arange(order.numel(), device=self.device),
                              "amin")
        tables = tables.to(self.device, torch.int64)
        if bool((tables != tables[first][order]).any()):
            raise self._collision()
        self._append(comp, tables[first])

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(comp [C], tables [C])``: the pairs recorded since the last :meth:`clear`."""
        return self._comp[: self._n].clone(), self._tables[: self._n].clone()

    def clear(self) -> None:
        """Forgets every record (a checkpoint holding them is in place)."""
        self._reset(1024)

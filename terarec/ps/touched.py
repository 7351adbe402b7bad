"""Rows touched since the last merge of the replicas (k-step merging, ``optim/kstep.py``).

Across nodes each replica trains its own copy of the tables for ``k`` steps; then the
rows touched on any replica since the last merge are merged as

    merged = snapshot + mean over replicas of (row - snapshot)

where ``snapshot`` is the row as it was at the last merge (the same on every replica)
and a replica that did not touch the row contributes 0. :class:`TouchedRows` is the
"dirty since merge" bookkeeping of one table group: the pairs trained since the last
merge and, for each, a copy of its row (weights + optimizer state) taken just before
its first update since then. It lives beside the tiers, not in them: a row evicted to
the host or SSD tier before the merge keeps its snapshot here, and the merge reads the
row's current value through the tiers (``TableGroup.lookup_rows``) and writes the merged
value back wherever the row lives (``TableGroup.overwrite_rows``). Its size is bounded
by the distinct pairs trained in ``k`` steps.

A pair is identified by its composite key (``TableGroup.composite``), as in the group's
own index; two pairs of different tables of one group with equal composite keys (a
~2^-64 event per pair with hashed ids) would share one record: :meth:`TouchedRows.record`
raises ``ValueError`` then, instead of merging one row into another.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from terarec.ps.changes import PairLog


class TouchedRows(PairLog):
    """Pairs trained since the last merge, with their rows at first touch since then.

    Args:
        row_width: floats per row (weights + optimizer state).
        device: where the snapshots live (the group's training device).

    Example::

        t = TouchedRows(row_width=3, device="cpu")
        t.record(comp=[5, 9], tables=[0, 0], rows=lambda pos: rows_of_5_9[pos])  # step 1
        t.record(comp=[9, 2], ...)        # step 2: only 2 is new (9 keeps step 1's row)
        comp, tables, snap = t.take()     # [5, 9, 2], ..., [3, row_width]; t is empty
    """

    _columns = ("_comp", "_tables", "_rows")
    _user = "k-step merging"

    def __init__(self, row_width: int, device: torch.device | str = "cpu") -> None:
        self.row_width = row_width
        super().__init__(device)

    def _reset(self, capacity: int) -> None:
        super()._reset(capacity)
        self._rows = torch.empty(capacity, self.row_width, device=self.device)

    @property
    def nbytes(self) -> int:
        """Bytes held for the recorded pairs (keys, tables, snapshots)."""
        return self._n * (16 + 4 * self.row_width)

    def record(
        self,
        comp: torch.Tensor,
        tables: torch.Tensor,
        rows: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Records the pairs of a training step before their update.

        Args:
            comp: int64 ``[U]`` unique composite keys of the pairs the step trains
                (pairs without a row, left out by admission, must not be passed).
            tables: int64 ``[U]`` their tables.
            rows: ``rows(positions [M]) -> [M, row_width]``: the rows, before the step's
                update, of the pairs at those positions; asked once, for the pairs not
                recorded since the last :meth:`take`.
        """
        if comp.numel() == 0:
            return

        def fill(new: torch.Tensor, span: slice) -> None:
            self._rows[span] = rows(new).to(self.device, torch.float32)

        self._append(comp, tables, fill)

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs recorded since the last call, and forgets them.

        Returns:
            ``(comp [T], tables [T], snapshots [T, row_width])`` in first-touch order.
        """
        n = self._n
        out = (self._comp[:n].clone(), self._tables[:n].clone(), self._rows[:n].clone())
        self._reset(max(1024, n))
        return out

    def clear(self) -> None:
        """Forgets every record (e.g. when every-step sync takes over)."""
        self._reset(1024)

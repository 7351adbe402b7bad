"""Rows addressed by slot: what the memory tiers (``HostTier``, ``CacheTier``) share.

One float32 array ``_rows [cap, row_width]`` and the metadata arrays ``_last`` and
``_freq`` (int64 ``[cap]``: the last step that used the row, how many steps did); the
training path reads, writes and updates rows in place by slot.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from terarec.ps.tiers.protocol import FREQ, LAST


class SlotRows:
    """Slot access to ``_rows``, ``_last`` and ``_freq`` (set by the subclass)."""

    _rows: torch.Tensor
    _last: torch.Tensor
    _freq: torch.Tensor

    def read(self, slots: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
        """Rows at ``slots`` ``[N, row_width]`` (a copy); only the first ``cols`` columns
        (e.g. the weights without the optimizer state) when given."""
        src = self._rows if cols is None else self._rows[:, :cols]
        return src.index_select(0, slots)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites the rows at unique ``slots`` with ``rows [N, row_width]``."""
        self._rows.index_copy_(0, slots, rows.to(self._rows.dtype))

    def update_rows(self, slots: torch.Tensor, grad: torch.Tensor, optimizer: Any) -> None:
        """One fused optimizer step on the rows at unique ``slots`` in place
        (``grad [N, dim]``; ``optimizer`` a ``RowOptimizer``)."""
        optimizer.update_at(self._rows, slots, grad)

    def touch(self, slots: torch.Tensor, step: int) -> None:
        """Records a use at ``step`` of the rows at unique ``slots``: ``last = step``;
        ``freq`` counts steps, so a row touched twice in one step (prefetched, then
        trained) counts once."""
        if slots.numel() == 0:
            return
        new_step = self._last.index_select(0, slots) != step
        self._freq.index_add_(0, slots, new_step.to(torch.int64))
        self._last.index_fill_(0, slots, step)

    def read_meta(self, slots: torch.Tensor) -> torch.Tensor:
        """Metadata ``(last_step, freq)`` at ``slots``: int64 ``[N, 2]`` (a copy)."""
        return torch.stack(
            [self._last.index_select(0, slots), self._freq.index_select(0, slots)], 1
        )

    def write_meta(self, slots: torch.Tensor, meta: torch.Tensor) -> None:
        """Sets the metadata at unique ``slots`` (int64 ``[N, 2]``)."""
        meta = meta.to(self._last.device)
        self._last.index_copy_(0, slots, meta[:, LAST].contiguous())
        self._freq.index_copy_(0, slots, meta[:, FREQ].contiguous())

"""One embedding table: its row optimizer, its tier(s), first-touch row creation."""

from __future__ import annotations

from typing import Any, Optional

import torch

from terarec.config import SparseOptimConfig, TableConfig
from terarec.hashing import salt_for
from terarec.optim.sparse import RowOptimizer, build_row_optimizer
from terarec.ps.host_tier import HostTier
from terarec.ps.initializer import init_rows


def table_seed(seed: int, name: str) -> int:
    """Per-table initializer seed derived from the run seed and the table name."""
    return (seed * 1_000_003 + salt_for(name)) % (1 << 62)


class EmbeddingTable:
    """Rows of one table keyed by int64 ids; weights and optimizer state side by side.

    Args:
        cfg: the table's config (dim, init, ...).
        optim: the sparse optimizer config shared by all tables.
        device: where the training tier lives.
        seed: run seed (rows are a pure function of (seed, name, key) at creation).
    """

    def __init__(
        self, cfg: TableConfig, optim: SparseOptimConfig, device: torch.device, seed: int
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.dim = cfg.dim
        self.optimizer: RowOptimizer = build_row_optimizer(optim, cfg.dim)
        self.row_width = cfg.dim + self.optimizer.state_width
        self.seed = table_seed(seed, cfg.name)
        self.device = device
        self.tier = HostTier(self.row_width, device)
        self.version = 0  # bumped by every optimizer step (stale-gather detection)

    def __len__(self) -> int:
        return len(self.tier)

    def new_rows(self, keys: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Initial rows (weights + optimizer state) for new keys ``[M]``.

        Args:
            keys: int64 ``[M]``.
            out: optional ``[M, row_width]`` destination (e.g. the tier's row block).
        Returns:
            ``[M, row_width]`` (``out`` when given).
        """
        if out is None:
            out = torch.empty(keys.numel(), self.row_width, device=keys.device)
        out[:, : self.dim] = init_rows(keys, self.dim, self.cfg.init, self.seed)
        out[:, self.dim :] = self.optimizer.init_state(keys.numel(), keys.device)
        return out

    def initial_weights(self, keys: torch.Tensor) -> torch.Tensor:
        """Weights a key gets on first touch ``[N, dim]`` (the dense reference's init)."""
        return init_rows(keys, self.dim, self.cfg.init, self.seed)

    def lookup_for_training(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots and rows of unique keys, creating rows on first touch.

        Returns:
            ``(slots [U], rows [U, row_width])``: rows is a copy (weights, then state).
        """
        slots = self.tier.slots_for(keys, self.new_rows)
        return slots, self.tier.read(slots)

    def lookup_for_inference(self, keys: torch.Tensor) -> torch.Tensor:
        """Weights of keys ``[N, dim]``; unknown keys read as zeros and are not created."""
        slots = self.tier.lookup_slots(keys)
        out = torch.zeros(keys.numel(), self.dim, device=keys.device)
        found = (slots >= 0).nonzero().squeeze(1)
        out[found] = self.tier.read(slots[found])[:, : self.dim]
        return out

    def apply_gradients(
        self, slots: torch.Tensor, grad: torch.Tensor, rows: Optional[torch.Tensor] = None
    ) -> None:
        """Fused optimizer step on the rows at unique ``slots``.

        Args:
            slots: int64 ``[U]`` unique.
            grad: ``[U, dim]`` summed per key.
            rows: the current rows at ``slots`` if the caller holds an up-to-date copy
                (updated in place); read from the tier otherwise.
        """
        if rows is None:
            rows = self.tier.read(slots)
        self.tier.write(slots, self.optimizer.update(rows, grad.to(rows.dtype)))
        self.version += 1

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys [R], rows [R, row_width])`` of every row."""
        return self.tier.export()

    def state_dict(self) -> dict[str, Any]:
        keys, rows = self.export()
        return {"keys": keys, "rows": rows, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = state["rows"]
        if rows.dim() != 2 or rows.shape[1] != self.row_width:
            raise ValueError(
                f"table {self.name}: checkpoint rows are {tuple(rows.shape)}, expected "
                f"[*, {self.row_width}] (dim {self.dim} + optimizer state); was it saved "
                "with another dim or optimizer?"
            )
        self.tier.load(state["keys"], rows)
        self.optimizer.load_state_dict(state["optimizer"])

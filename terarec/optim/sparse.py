"""Fused sparse row optimizers: the state is stored next to the row.

A table row is one float32 vector ``[dim + state_width]``: the embedding weights first,
then the optimizer state, so a tier moves weights and state together. Each optimizer
updates a block of *unique* rows in one vectorised call:

    rows  = table.data[slots]            # [U, dim + S]
    rows' = opt.update(rows, grad)        # grad: [U, dim], already summed per key
    table.data[slots] = rows'

On CUDA (with triton) ``update_at`` runs one fused kernel that updates the rows in place
by slot instead (``terarec.optim.triton_rows``: each row read and written once); the
torch path stays the reference and the CPU path.

Semantics match the torch optimizers on a sparse gradient (rows absent from a step are
untouched): SGD = ``torch.optim.SGD``, Adagrad = ``torch.optim.Adagrad``, Adam =
``torch.optim.SparseAdam`` (one step counter per table, bias correction from it), and
row-wise Adagrad as in FBGEMM (one accumulator per row: the mean of g^2 over the row).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch

from terarec.config import SparseOptimConfig, SparseOptimKind
from terarec.optim import triton_rows


class RowOptimizer(ABC):
    """Updates ``[U, dim + state_width]`` row blocks in place of a sparse optimizer."""

    kernel: int  # the triton_rows optimizer code
    # State columns right after the weights that hold a first moment (Adam's m, ``dim``
    # of them; 0: none): what ``sync.sparse: delta+m`` merges beside the weights.
    first_moment_width: int = 0

    def __init__(self, cfg: SparseOptimConfig, dim: int) -> None:
        self.cfg = cfg
        self.dim = dim
        self.step = 0  # number of update() calls (per table)
        self.lr = cfg.lr  # the learning rate now (a schedule may move it)

    def fused_on(self, device: torch.device, fused: Optional[bool] = None) -> bool:
        """Whether :meth:`update_at` runs the fused kernel on ``device``: ``fused=None``
        (auto) on CUDA when triton is present; ``True`` demands it (an error where it
        cannot run, e.g. CPU without ``TRITON_INTERPRET=1``); ``False`` never."""
        if fused is None:
            return device.type == "cuda" and triton_rows.available(device)
        if fused and not triton_rows.available(device):
            raise ValueError(
                f"the fused row optimizer needs triton and a CUDA device (got {device})"
            )
        return fused

    @property
    @abstractmethod
    def state_width(self) -> int:
        """Floats of optimizer state per row."""

    def init_state(self, n: int, device: torch.device) -> torch.Tensor:
        """Initial state for ``n`` new rows: ``[n, state_width]``."""
        return torch.zeros(n, self.state_width, device=device)

    def update(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Updates rows **in place** and returns them.

        Args:
            rows: ``[U, dim + state_width]`` current weights and state of unique keys (a
                gathered copy owned by the caller).
            grad: ``[U, dim]`` gradient summed over every occurrence of each key.
        Returns:
            ``rows``, holding the new weights and state.
        """
        self.step += 1
        return self._update(rows, grad)

    def update_at(self, storage: torch.Tensor, slots: torch.Tensor, grad: torch.Tensor) -> None:
        """One fused step on ``storage[slots]`` **in place** (one triton kernel).

        Args:
            storage: float32 ``[N, dim + state_width]`` row storage of a tier.
            slots: int64 ``[U]`` unique rows of ``storage`` (-1: skipped).
            grad: ``[U, dim]`` gradient summed over every occurrence of each key.
        """
        self.step += 1
        c = self.cfg
        triton_rows.row_update_(
            storage, slots, grad, self.kernel, lr=self.lr, eps=c.eps, beta1=c.beta1,
            beta2=c.beta2, step_size=self._step_size(),
        )

    def _step_size(self) -> float:
        return self.lr

    @abstractmethod
    def _update(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class RowSGD(RowOptimizer):
    state_width = 0
    kernel = triton_rows.SGD

    def _update(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        rows[:, : self.dim].add_(grad, alpha=-self.lr)
        return rows


class RowAdagrad(RowOptimizer):
    """``torch.optim.Adagrad`` (lr_decay = 0): s += g^2; w -= lr * g / (sqrt(s) + eps)."""

    kernel = triton_rows.ADAGRAD

    @property
    def state_width(self) -> int:
        return self.dim

    def init_state(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.full((n, self.dim), self.cfg.initial_accumulator_value, device=device)

    def _update(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        d = self.dim
        w, s = rows[:, :d], rows[:, d:]
        s.addcmul_(grad, grad)
        w.addcdiv_(grad, s.sqrt().add_(self.cfg.eps), value=-self.lr)
        return rows


class RowWiseAdagrad(RowOptimizer):
    """FBGEMM ``EXACT_ROWWISE_ADAGRAD``: one accumulator per row, s += mean(g^2)."""

    state_width = 1
    kernel = triton_rows.ROWWISE_ADAGRAD

    def init_state(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.full((n, 1), self.cfg.initial_accumulator_value, device=device)

    def _update(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        d = self.dim
        w, s = rows[:, :d], rows[:, d:]
        s.add_(grad.pow(2).mean(dim=1, keepdim=True))
        w.addcdiv_(grad, s.sqrt().add_(self.cfg.eps), value=-self.lr)
        return rows


class RowAdam(RowOptimizer):
    """``torch.optim.SparseAdam``: moments of present rows only, per-table step count."""

    kernel = triton_rows.ADAM

    def __init__(self, cfg: SparseOptimConfig, dim: int) -> None:
        super().__init__(cfg, dim)
        self.first_moment_width = dim

    def _step_size(self) -> float:  # called after the step counter moved
        c = self.cfg
        return self.lr * math.sqrt(1 - c.beta2**self.step) / (1 - c.beta1**self.step)

    @property
    def state_width(self) -> int:
        return 2 * self.dim

    def _update(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        d, c = self.dim, self.cfg
        w, m, v = rows[:, :d], rows[:, d : 2 * d], rows[:, 2 * d :]
        # Same operation order as torch.optim._functional.sparse_adam.
        m_upd = grad.sub(m).mul_(1 - c.beta1)
        v_upd = grad.pow(2).sub_(v).mul_(1 - c.beta2)
        m.add_(m_upd)
        v.add_(v_upd)
        denom = v.sqrt().add_(c.eps)
        w.add_(-self._step_size() * m.div(denom))
        return rows


_OPTIMIZERS: dict[SparseOptimKind, type[RowOptimizer]] = {
    SparseOptimKind.SGD: RowSGD,
    SparseOptimKind.ADAGRAD: RowAdagrad,
    SparseOptimKind.ROWWISE_ADAGRAD: RowWiseAdagrad,
    SparseOptimKind.ADAM: RowAdam,
}


def build_row_optimizer(cfg: SparseOptimConfig, dim: int) -> RowOptimizer:
    """The one place that switches on the sparse optimizer kind."""
    return _OPTIMIZERS[cfg.kind](cfg, dim)

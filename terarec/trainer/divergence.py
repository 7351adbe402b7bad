"""A run that goes NaN/Inf: the error that says what to lower and where to resume.

The loss is checked every step by :class:`LossGuard`, before the step's updates (a host
sync a step) or one step late without a sync (``train.loss_check``); rows and weights
are checked when a checkpoint is written (:class:`NonFiniteState`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from terarec.config import Config, LossCheck
from terarec.trainer.checkpoint import NonFiniteState


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the rows of that step were not updated."""


def diverged(what: str, cfg: Config, last_ckpt: Optional[tuple[Path, int]]) -> TrainingDiverged:
    """The error for a run that went NaN/Inf: what happened, what to lower, where to resume.

    Args:
        what: the first sentence (which value went non-finite at which step).
        cfg: the run's config (its learning rates and name).
        last_ckpt: ``(directory, step)`` of the last checkpoint known good, if any.
    """
    msg = (
        f"{what} Lower optimizer.sparse.lr ({cfg.optimizer.sparse.lr}) or optimizer.dense.lr "
        f"({cfg.optimizer.dense.lr}), or check the data for extreme dense values "
        "(criteo needs data.dense_transform: log1p)."
    )
    if last_ckpt is not None:
        path, at = last_ckpt
        msg += (
            f" The last good checkpoint is {path} (step {at}); continue from it with lower "
            f"rates, e.g. terarec train --config <config> --name {cfg.name} --resume {path} "
            f"--set optimizer.sparse.lr={cfg.optimizer.sparse.lr / 2:g} "
            f"--set optimizer.dense.lr={cfg.optimizer.dense.lr / 2:g}"
        )
    elif cfg.train.checkpoint_every:
        msg += (
            " No checkpoint of this run was saved before the failure "
            f"(train.checkpoint_every: {cfg.train.checkpoint_every}); start it again with "
            "lower rates."
        )
    else:
        msg += (
            " No checkpoint of this run was saved before the failure; set "
            "train.checkpoint_every to save one every N steps and resume from the last."
        )
    return TrainingDiverged(msg)


def check_finite(
    loss: torch.Tensor, step: int, cfg: Config, last_ckpt: Optional[tuple[Path, int]] = None
) -> None:
    """Raises :class:`TrainingDiverged` if ``loss`` (of step ``step``, 1-based) is NaN/Inf."""
    if not torch.isfinite(loss):
        raise diverged(
            f"loss is {loss.item()} at step {step}; training stopped and the step's updates "
            "were not applied.",
            cfg,
            last_ckpt,
        )


class LossGuard:
    """Stops a run at the first non-finite loss, checked as ``train.loss_check`` says.

    * ``before_update``: :meth:`before_update` (the pipeline's ``check_loss``) reads
      the loss before backward, so the failed step updates nothing; reading it is a
      host sync every step, which on a GPU leaves the device idle while the host
      queues the backward.
    * ``deferred``: :meth:`after_step` queues the check of a step's loss (``isfinite``
      on the device, copied into pinned host memory behind an event) and reads the
      previous step's result, long done; nothing waits. A NaN loss is then found one
      step late, after the updates of its step and the next were applied in memory;
      :meth:`flush` (before every log line, eval, checkpoint and at the end) reads the
      last one, so nothing is evaluated or saved past an unchecked step.
    * ``auto``: deferred on CUDA, before_update elsewhere (where the check costs
      nothing: the host runs the step itself).

    Args:
        cfg: the run's config (``train.loss_check``, and the error's advice).
        device: the training device.
        last_ckpt: returns ``(directory, step)`` of the last checkpoint known good.
    """

    def __init__(self, cfg: Config, device: torch.device,
                 last_ckpt: Callable[[], Optional[tuple[Path, int]]]) -> None:
        mode = cfg.train.loss_check
        if mode == LossCheck.AUTO:
            mode = LossCheck.DEFERRED if device.type == "cuda" else LossCheck.BEFORE_UPDATE
        self.deferred = mode == LossCheck.DEFERRED
        self.cfg, self.last_ckpt = cfg, last_ckpt
        cuda = device.type == "cuda"
        # two slots: step t's result lands in one while step t-1's is read from the other
        self._host = torch.zeros(2, dtype=torch.bool, pin_memory=cuda)
        self._events = [torch.cuda.Event() for _ in range(2)] if cuda else None
        self._pending: Optional[tuple[int, torch.Tensor]] = None  # (step, loss) queued

    def before_update(self, loss: torch.Tensor, step: int) -> None:
        """The check before backward (``before_update`` mode; a no-op when deferred)."""
        if not self.deferred:
            check_finite(loss, step, self.cfg, self.last_ckpt())

    def after_step(self, loss: torch.Tensor, step: int) -> None:
        """Queues the check of ``loss`` (of step ``step``, 1-based) and reads the one
        queued before it (deferred mode; a no-op otherwise).

        Raises:
            TrainingDiverged: the previous step's loss was NaN/Inf.
        """
        if not self.deferred:
            return
        slot = step % 2
        self._host[slot : slot + 1].copy_(torch.isfinite(loss.detach()).reshape(1),
                                          non_blocking=True)
        if self._events is not None:
            self._events[slot].record()
        previous, self._pending = self._pending, (step, loss)
        if previous is not None:
            self._read(*previous)

    def flush(self) -> None:
        """Reads the last queued check (waits for that step's loss only)."""
        previous, self._pending = self._pending, None
        if previous is not None:
            self._read(*previous)

    def _read(self, step: int, loss: torch.Tensor) -> None:
        slot = step % 2
        if self._events is not None:
            self._events[slot].synchronize()
        if not bool(self._host[slot]):
            self._pending = None
            raise diverged(
                f"loss is {loss.item()} at step {step}; training stopped. The loss is "
                "checked without stalling the GPU (train.loss_check: deferred), so the "
                f"updates of step {step} and at most one step after it were applied in "
                "memory; nothing after the last checkpoint was saved.",
                self.cfg,
                self.last_ckpt(),
            )


def save_or_diverge(
    save: Callable[[], Path],
    step: int,
    cfg: Config,
    last_ckpt: Optional[tuple[Path, int]],
) -> Path:
    """Runs ``save`` (a checkpoint of step ``step``), turning NaN/Inf state into
    :class:`TrainingDiverged`."""
    try:
        return save()
    except NonFiniteState as e:
        # A finite loss does not prove finite rows: an overflowing update to a row that
        # no later batch has read yet shows up only here.
        raise diverged(
            f"the state after step {step} is not finite although its loss was: {e} and "
            "training stopped.",
            cfg,
            last_ckpt,
        ) from None

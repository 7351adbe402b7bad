"""A run that goes NaN/Inf: the error that says what to lower and where to resume.

The loss is checked every step (on the device, with the pipeline's one sync per step);
rows and weights are checked when a checkpoint is written (:class:`NonFiniteState`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from terarec.config import Config
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

"""Model selection on the validation split: the best checkpoint and early stopping.

With validation data (``data.valid_path``, ``data.valid_fraction`` or
``data.synthetic.valid_samples``) the periodic evals (``train.eval_every``) score the
validation split, logged as ``split: "valid"``; the test split (``eval``) is scored at
the end only. ``train.keep_best: <metric>`` keeps the checkpoint of the best validation
score: when a validation eval improves on the best so far, a full checkpoint of that
step is written and named in ``runs/<name>/best.json``; the checkpoint history never
prunes it (``checkpoint/history.py``). ``train.early_stopping: N`` stops the run after
``N`` validation evals without improvement. At the end the best checkpoint is restored
and scored on the test split beside the last step's model (``summary["best"]``).

``best.json``: ``{"step", "metric", "value", "manifest_sha256"}``, written atomically by
rank 0 after the checkpoint it names; a resumed run reads it back (a best from past the
resumed step is dropped with that future, ``history.drop_after``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from terarec.config import Config, ConfigError, DataKind
from terarec.trainer.report import atomic_write_text

FILE = "best.json"
HIGHER = {"auc": True, "gauc": True, "logloss": False, "ne": False}


def has_validation(cfg: Config) -> bool:
    """Whether the data config has a validation split."""
    d = cfg.data
    if d.kind == DataKind.SYNTHETIC:
        return d.synthetic.valid_samples > 0
    return bool(d.valid_path) or d.valid_fraction > 0


def check_selection(cfg: Config) -> None:
    """Raises ``ConfigError`` when ``train.keep_best`` has no validation split to use."""
    if cfg.train.keep_best and not has_validation(cfg):
        raise ConfigError("train.keep_best: needs a validation split (data.valid_path, "
                          "data.valid_fraction or data.synthetic.valid_samples): the test "
                          "split must not choose the model")


def read_best(run_dir: Path) -> Optional[dict[str, Any]]:
    """``best.json`` of ``run_dir``, or None (none yet, or unreadable)."""
    try:
        out = json.loads((Path(run_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) and isinstance(out.get("step"), int) else None


class BestKeeper:
    """The best validation score so far and the evals since it (see the module
    docstring). ``write``: this rank writes ``best.json`` (rank 0)."""

    def __init__(self, cfg: Config, run_dir: Path, write: bool, resumed_at: Optional[int]
                 ) -> None:
        t = cfg.train
        self.validates = has_validation(cfg)
        self.metric = t.keep_best
        self.patience = t.early_stopping  # (check_selection ran before the run)
        self.run_dir, self.write = Path(run_dir), write
        self.best: Optional[dict[str, Any]] = None
        self.since = 0  # validation evals since the best
        if resumed_at is not None and self.metric:
            got = read_best(self.run_dir)
            if got is not None and got.get("metric") == self.metric and got["step"] <= resumed_at:
                self.best = got
                self.since = (resumed_at - got["step"]) // max(t.eval_every, 1)

    def improved(self, step: int, ev: dict[str, float]) -> bool:
        """Whether the validation metrics ``ev`` of ``step`` beat the best so far (a NaN
        score never does); counts the evals without improvement."""
        if not self.metric:
            return False
        value = ev.get(self.metric)
        better = value is not None and not math.isnan(value) and (
            self.best is None or (value > self.best["value"] if HIGHER[self.metric]
                                  else value < self.best["value"]))
        self.since = 0 if better else self.since + 1
        return bool(better)

    @property
    def exhausted(self) -> bool:
        """``train.early_stopping`` evals passed without improvement."""
        return bool(self.patience) and self.since >= self.patience

    def record(self, step: int, value: float, manifest_sha256: Optional[str]) -> None:
        """The checkpoint of ``step`` (its manifest's sha256, as rank 0 read it) is the
        new best."""
        self.best = {"step": step, "metric": self.metric, "value": value,
                     "manifest_sha256": manifest_sha256}
        if self.write:
            atomic_write_text(self.run_dir / FILE, json.dumps(self.best) + "\n")

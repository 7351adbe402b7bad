"""Run reporting: ``runs/<name>/{metrics.jsonl, summary.json, config.yaml, curves.png}``.

:class:`RunReporter` is the only writer of a run directory's human-facing files:

* ``metrics.jsonl``: one JSON object per :meth:`RunReporter.log` call, appended and
  flushed at once so a crashed run keeps every line it logged::

      {"step": 500, "split": "train", "time": 1718000000.1, "loss": 0.47, "samples_per_s": 91000.0}
      {"step": 500, "split": "eval", "time": 1718000003.9, "auc": 0.781, "ne": null}

  Values are made JSON-safe: tensors and numpy values become Python numbers or lists,
  ``nan``/``inf`` become ``null`` (strict JSON has no NaN).
* ``summary.json`` and ``config.yaml``: written atomically (temp file + ``os.replace``),
  so a reader never sees half a file.
* ``curves.png``: train loss, train and eval AUC (with the oracle AUC as a dashed line
  when known), eval logloss, throughput, tier hit rates and rows held against the
  step; drawn with the Agg canvas directly (no pyplot, no display, no global
  matplotlib state).
* ``tensorboard/`` (``tensorboard=True``): the same numbers as TensorBoard scalars,
  ``<split>/<name>`` (nested records flattened: ``train/tiers/sparse/device_hit_rate``),
  through ``torch.utils.tensorboard``; a resumed run (:meth:`RunReporter.resume_at`)
  purges the events logged after its checkpoint, as ``metrics.jsonl`` drops its lines.

Metric names the plot looks for: ``loss`` (train), ``auc`` and ``logloss`` (eval),
``samples_per_s`` (train), ``oracle_auc`` (summary or eval lines).
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import yaml

log = logging.getLogger("terarec.trainer")

LOSS_KEY = "loss"
AUC_KEY = "auc"
LOGLOSS_KEY = "logloss"
THROUGHPUT_KEY = "samples_per_s"
ROWS_KEY = "rows"
ORACLE_AUC_KEY = "oracle_auc"
_RESERVED = ("step", "split", "time")


def to_jsonable(value: Any) -> Any:
    """Plain-JSON view of ``value``: numbers, strings, lists, dicts, ``None``.

    Tensors and numpy arrays become numbers (0-d) or nested lists; non-finite floats
    become ``None``; enums their value; paths strings; tuples/sets lists.

    Raises:
        TypeError: for an object with no JSON meaning (the message names its type).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, (np.ndarray, np.generic)):
        return to_jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    raise TypeError(f"cannot write a {type(value).__name__} to a run report: {value!r}")


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so readers see the old file or the new one, never half.

    Writes a temp file in the same directory, fsyncs it, then ``os.replace``s it. The
    file gets the permissions of any other file the run writes (``0o666`` less the
    umask; ``mkstemp`` would make it private).
    """
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parses ``metrics.jsonl``; a torn last line (crash mid-write) is skipped."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the run died while writing its last line
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return rows


class RunReporter:
    """Writes a run's metrics log, summary, config and curves into ``run_dir``.

    Args:
        run_dir: the run directory, conventionally ``<runs_dir>/<run name>``; created
            (with parents) if missing. An existing ``metrics.jsonl`` is appended to, so
            a resumed run keeps one log.
        write: False for the ranks of a multi-rank job other than rank 0: nothing is
            written (``log`` still returns the record); one writer per run directory.
        tensorboard: also write TensorBoard event files under ``run_dir/tensorboard``.

    Example:
        >>> rep = RunReporter(Path("runs/quickstart"))
        >>> rep.log(100, "train", {"loss": 0.52, "samples_per_s": 8.1e4})
        >>> rep.log(100, "eval", metrics.compute())
        >>> rep.write_summary({"best_auc": 0.78, "oracle_auc": 0.80})
        >>> rep.plot()
    """

    def __init__(self, run_dir: Union[str, Path], write: bool = True,
                 tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.write = write
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.name = self.run_dir.resolve().name
        self.tensorboard = tensorboard and write
        self._events: Any = None  # the SummaryWriter, opened at the first record
        self._purge: Optional[int] = None

    @property
    def events_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    def resume_at(self, step: int) -> None:
        """A resumed run goes on from ``step``: TensorBoard events logged after it (by
        the run that died) are purged when the first new one is written."""
        self._purge = step + 1

    def reset(self) -> None:
        """Removes an earlier run's ``metrics.jsonl`` and TensorBoard events (a new run
        under its name)."""
        self.close()
        self.metrics_path.unlink(missing_ok=True)
        shutil.rmtree(self.events_dir, ignore_errors=True)

    def close(self) -> None:
        """Flushes and closes the event file (a later :meth:`log` opens a new one)."""
        if self._events is not None:
            self._events.close()
            self._events = None

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.run_dir / "summary.json"

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def curves_path(self) -> Path:
        return self.run_dir / "curves.png"

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Appends one line ``{"step", "split", "time", **metrics}`` to ``metrics.jsonl``.

        Args:
            step: the global training step the metrics belong to.
            split: ``"train"`` or ``"eval"`` (any non-empty name is accepted).
            metrics: name → number (tensor, numpy and ``nan`` allowed; ``nan`` → null).

        Returns:
            The record as written.
        """
        if not split:
            raise ValueError("log: split must be a non-empty string, e.g. 'train' or 'eval'")
        clash = sorted(set(metrics) & set(_RESERVED))
        if clash:
            raise ValueError(f"log: metric names {clash} are reserved ({', '.join(_RESERVED)})")
        record = {"step": int(step), "split": split, "time": time.time()}
        record.update(to_jsonable(dict(metrics)))
        line = json.dumps(record, allow_nan=False)
        if not self.write:
            return record
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.tensorboard:
            self._scalars(int(step), split, record)
        return record

    def _scalars(self, step: int, split: str, record: Mapping[str, Any]) -> None:
        """The record's finite numbers as TensorBoard scalars ``split/name``."""
        if self._events is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard

            self._events = SummaryWriter(str(self.events_dir), purge_step=self._purge)
            self._purge = None
        for name, v in _flat(record):
            if name not in _RESERVED:
                self._events.add_scalar(f"{split}/{name}", v, step)
        self._events.flush()  # a crashed run keeps what it logged, as metrics.jsonl

    def records(self, split: Optional[str] = None) -> list[dict[str, Any]]:
        """The logged records, optionally only those of ``split``."""
        rows = read_jsonl(self.metrics_path)
        return rows if split is None else [r for r in rows if r.get("split") == split]

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Atomically writes ``summary.json`` (JSON-safe, ``nan`` → null)."""
        text = json.dumps(to_jsonable(dict(summary)), indent=2, allow_nan=False, sort_keys=True)
        if not self.write:
            return self.summary_path
        atomic_write_text(self.summary_path, text + "\n")
        self.close()
        return self.summary_path

    def read_summary(self) -> dict[str, Any]:
        """``summary.json`` as a dict (empty if not written yet)."""
        if not self.summary_path.exists():
            return {}
        return json.loads(self.summary_path.read_text(encoding="utf-8"))

    def save_config(self, cfg_dict: Mapping[str, Any]) -> Path:
        """Atomically writes ``config.yaml`` (e.g. ``config_to_dict(cfg)``), keys in order."""
        text = yaml.safe_dump(to_jsonable(dict(cfg_dict)), sort_keys=False)
        if not self.write:
            return self.config_path
        atomic_write_text(self.config_path, text)
        return self.config_path

    def plot(self, oracle_auc: Optional[float] = None) -> Path:
        """Draws ``curves.png`` from ``metrics.jsonl`` (:meth:`figure`).

        Args:
            oracle_auc: dashed reference line on the AUC panel; default: ``oracle_auc``
                from ``summary.json``, else the last ``oracle_auc`` in the eval lines.

        Returns:
            The path of the PNG.
        """
        self.figure(oracle_auc).savefig(self.curves_path, format="png")
        return self.curves_path

    def figure(self, oracle_auc: Optional[float] = None) -> Any:
        """The matplotlib ``Figure`` of ``metrics.jsonl``, 2x3 panels: train loss, train
        and eval AUC, eval logloss, samples/s, tier hit rates, rows held (see
        :meth:`plot` for ``oracle_auc``)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator, StrMethodFormatter

        train, evals = self.records("train"), self.records("eval")
        if oracle_auc is None:
            oracle_auc = _finite(self.read_summary().get(ORACLE_AUC_KEY))
        if oracle_auc is None:
            oracle_auc = next(
                (v for r in reversed(evals) if (v := _finite(r.get(ORACLE_AUC_KEY))) is not None),
                None,
            )

        fig = Figure(figsize=(15, 7.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 3)
        fig.suptitle(f"terarec run: {self.name}", fontsize=14, fontweight="bold")
        panels = [
            (axes[0, 0], train, LOSS_KEY, "Train loss", "tab:blue"),
            (axes[0, 1], evals, AUC_KEY, "AUC (eval; train: its window)", "tab:green"),
            (axes[0, 2], evals, LOGLOSS_KEY, "Eval logloss (nats)", "tab:red"),
            (axes[1, 0], train, THROUGHPUT_KEY, "Train throughput (samples/s)", "tab:purple"),
            (axes[1, 2], train, ROWS_KEY, "Rows held (all tables)", "tab:brown"),
        ]
        for ax, rows, key, title, color in panels:
            steps, values = _series(rows, key)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if steps:
                marker = "o" if len(steps) <= 30 else None
                ax.plot(steps, values, color=color, marker=marker, markersize=4,
                        label=f"eval {key}" if ax is axes[0, 1] else key)
            else:
                _empty(ax, f"no '{key}' logged")
        steps, values = _series(train, AUC_KEY)
        if steps:
            axes[0, 1].plot(steps, values, color="tab:blue", alpha=0.6, label="train auc")
            axes[0, 1].legend(loc="lower right")
        _hit_rates(axes[1, 1], train)
        if oracle_auc is not None:
            ax = axes[0, 1]
            ax.axhline(oracle_auc, color="black", linestyle="--", linewidth=1.2,
                       label=f"oracle AUC {oracle_auc:.4f}")
            ax.legend(loc="lower right")
            _, aucs = _series(evals + train, AUC_KEY)
            lo = min([oracle_auc, *aucs])
            ax.set_ylim(max(0.0, lo - 0.02), min(1.0, max([oracle_auc, *aucs]) + 0.02))
        axes[1, 0].yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        axes[1, 2].yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        return fig


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.3, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _hit_rates(ax: Any, train: list[dict[str, Any]]) -> None:
    """Each table's tier hit rates (``tiers.<table>.<tier>_hit_rate`` of the train
    lines) against the step."""
    ax.set_title("Tier hit rates")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in train:
        for table, figs in (r.get("tiers") or {}).items():
            for key, v in (figs or {}).items():
                if key.endswith("_hit_rate") and (f := _finite(v)) is not None:
                    s = series.setdefault(f"{table} {key[:-len('_hit_rate')]}", ([], []))
                    s[0].append(int(r["step"]))
                    s[1].append(f)
    if not series:
        _empty(ax, "no tiers (in-memory tables)")
        return
    for label, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, label=label)
    ax.set_ylim(0.0, 1.02)
    ax.legend(loc="lower right", fontsize=8)


def _flat(record: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """``(name, value)`` of every finite number in ``record``, nested dicts joined by
    ``/`` (``tiers/sparse/device_hit_rate``)."""
    out: list[tuple[str, float]] = []
    for k, v in record.items():
        if isinstance(v, Mapping):
            out += _flat(v, f"{prefix}{k}/")
        elif (f := _finite(v)) is not None:
            out.append((f"{prefix}{k}", f))
    return out


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over ``rows``, skipping null / missing values."""
    steps: list[int] = []
    values: list[float] = []
    for r in rows:
        v = _finite(r.get(key))
        if v is not None:
            steps.append(int(r["step"]))
            values.append(v)
    return steps, values


def drop_records_after(path: Path, step: int) -> None:
    """Cuts ``metrics.jsonl`` back to ``step``, the step a resumed run starts from.

    A run that died after its last checkpoint logged lines that the resumed run logs
    again (and maybe a torn last line); kept, they would be in the log twice.
    """
    if not path.exists():
        return
    records = read_jsonl(path)
    keep = [r for r in records if r.get("step", 0) <= step]
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(keep) < len(lines):
        log.info("%s: dropping %d lines logged after step %d", path, len(lines) - len(keep), step)
        atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))

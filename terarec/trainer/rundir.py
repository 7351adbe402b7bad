"""A run's directory: one run owns it at a time, and a resume never mixes two runs.

* :func:`owned`: a run holds an exclusive ``flock`` on its directory while it trains
  (rank 0 of a multi-rank job, which alone writes the run's files); a second run under
  the same name fails at once with :class:`RunDirInUse` instead of both writing the same
  files and the last one winning. The lock goes with the process (a killed run leaves
  no stale lock).
* :func:`check_resume`: resuming from another run's checkpoint into a directory that
  holds a run already is refused (its ``metrics.jsonl`` would mix two runs); into a new
  directory it starts that run from the checkpoint.
* :func:`changed_on_resume`: the settings a resume changes that change the run's data
  or its sampling (seed, batch size, vocabulary...), which the run warns about.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from terarec.config import ConfigError


class RunDirInUse(ConfigError):
    """Another process is training in this run directory."""


@contextmanager
def owned(run_dir: Path, hold: bool = True) -> Iterator[None]:
    """Holds ``run_dir``'s lock for the block (``hold`` False: does nothing, e.g. on
    ranks other than 0). The directory must exist; the lock is an ``flock`` on the
    directory itself (no file is added to the run)."""
    if not hold:
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirInUse(
                f"{run_dir}: another run is training there; give this run another name "
                "(--name) or wait for that one to finish"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def check_resume(resume: Optional[Path], run_dir: Path) -> None:
    """Raises ConfigError when resuming from another run's checkpoint into ``run_dir``
    while ``run_dir`` holds a run of its own."""
    if resume is None:
        return
    from terarec.trainer.checkpoint.history import run_dir_of

    source_run = run_dir_of(Path(resume).resolve())
    if source_run == Path(run_dir).resolve():
        return  # continuing this run
    if (Path(run_dir) / "metrics.jsonl").exists():
        raise ConfigError(
            f"--resume {resume}: that checkpoint is another run's ({source_run.name}), and "
            f"{run_dir} holds a run already; continue {source_run.name} with --name "
            f"{source_run.name}, or start a new run from the checkpoint under a new --name"
        )


# Settings whose change on resume changes the data a run sees or how it is drawn: legal
# (e.g. a larger batch after a warm-up), but a continuation only in name.
WATCHED = ("seed", "data.kind", "data.path", "data.batch_size", "data.shuffle_buffer",
           "data.dense_transform", "data.synthetic.vocab_size", "data.synthetic.num_sparse",
           "data.synthetic.num_dense", "data.synthetic.zipf_alpha",
           "data.synthetic.values_per_feature")


def changed_on_resume(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for each :data:`WATCHED` setting that differs between the
    checkpoint's config (``saved``, as in its manifest) and the run's (``now``)."""
    out = []
    for key in WATCHED:
        a, b = saved, now
        for part in key.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if a is not None and a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out

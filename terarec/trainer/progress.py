"""The console side of a run: a progress bar on a terminal, plain lines elsewhere.

On a terminal (stderr is a TTY) with ``train.progress: true`` the run shows a tqdm bar
whose postfix is the last log interval's figures. Anywhere else (a log file, a CI job,
``nohup``, a scheduler's captured output) a bar is a stream of ``\\r`` redraws, so the
run prints one plain line per log interval instead; and with ``train.progress: false``
the same lines, so a long run is never silent until its end. Only rank 0 prints.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

from tqdm import tqdm


class LineProgress:
    """The bar's interface (update, set_postfix, write, close), printing one line per
    log interval: ``step 200/1000 (20%): loss 0.4513 auc 0.7402 sps 51,234 rows 9,876``."""

    def __init__(self, total: Optional[int], initial: int, out: TextIO) -> None:
        self.total, self.n, self.out = total, initial, out
        self.t0 = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, postfix: dict[str, Any]) -> None:
        of = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
        figures = " ".join(f"{k} {v}" for k, v in postfix.items())
        elapsed = time.monotonic() - self.t0
        print(f"step {self.n}{of}: {figures} [{elapsed:.0f}s]", file=self.out, flush=True)

    def write(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def close(self) -> None:
        return None


def make_progress(show_bar: bool, main: bool, total: Optional[int], initial: int) -> Any:
    """A tqdm bar on a terminal when ``show_bar`` (``train.progress``), else plain lines
    on stdout (:class:`LineProgress`); nothing on ranks other than 0 (``main``)."""
    if not main:
        return tqdm(disable=True)
    if show_bar and sys.stderr.isatty():
        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    return LineProgress(total, initial, sys.stdout)

"""Errors and the malformed-row policy shared by every file reader."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger("terarec.data")


class DataError(RuntimeError):
    """Bad input data or a data-layer misuse; the message names file:line where known."""


class BadRows:
    """Counts skipped rows by reason, logs the first few, or raises in strict mode.

    One instance per source; readers call :meth:`report` once per chunk with the bad
    rows of that chunk (sorted by line), so the per-row work is vectorised and only the
    logged rows are formatted.

    Args:
        strict: raise :class:`DataError` at the first bad row instead of skipping it.
        log_limit: how many skipped rows to log (with ``file:line`` and the reason).
    """

    def __init__(self, strict: bool, log_limit: int) -> None:
        self.strict = strict
        self.log_limit = log_limit
        self.counts: dict[str, int] = {}
        self.logged = 0
        self._lock = threading.Lock()

    def report(
        self,
        path: str,
        lines: np.ndarray,
        reasons: Sequence[str],
        details: Sequence[Any],
    ) -> None:
        """Records bad rows of one chunk.

        Args:
            path: the file the rows came from.
            lines: int64 ``[k]`` 1-based line numbers, ascending.
            reasons: ``k`` reason codes (e.g. ``"wrong_column_count"``).
            details: ``k`` callables or strings describing each row; callables are only
                evaluated for rows that are logged or raised.
        """
        if len(lines) == 0:
            return
        if self.strict:
            raise DataError(f"{path}:{int(lines[0])}: {reasons[0]}: {_text(details[0])}")
        with self._lock:
            for r in reasons:
                self.counts[r] = self.counts.get(r, 0) + 1
            todo = min(self.log_limit - self.logged, len(lines))
            for i in range(max(todo, 0)):
                logger.warning(
                    "skipping malformed row %s:%d: %s: %s",
                    path, int(lines[i]), reasons[i], _text(details[i]),
                )
            self.logged += max(todo, 0)
            if todo >= 0 and self.logged == self.log_limit and len(lines) > todo:
                logger.warning("further malformed rows are skipped silently (see stats())")
                self.logged += 1  # log the notice once

    def count(self, reason: str, k: int) -> None:
        """Counts ``k`` harmless skips (e.g. empty lines): never logged, never strict."""
        if k:
            with self._lock:
                self.counts[reason] = self.counts.get(reason, 0) + k

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def _text(detail: Any) -> str:
    return str(detail() if callable(detail) else detail)

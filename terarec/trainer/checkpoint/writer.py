"""Writing a taken checkpoint on a background thread (``train.async_checkpoint``).

The training loop takes a checkpoint (``history.prepare``: the pause) and hands the
returned call to a :class:`BackgroundWriter`, which runs it on a daemon thread while
training goes on. One write at a time: the loop waits for the previous one before it
takes the next checkpoint, and before the run's final one. A write that fails raises
in the training loop when it is collected (:meth:`BackgroundWriter.wait`). A process
that dies mid-write leaves the previous checkpoint in place (the write is atomic).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional


class BackgroundWriter:
    """At most one checkpoint write in flight, on a daemon thread."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._out: list[Any] = []
        self.info: dict[str, Any] = {}

    def start(self, write: Callable[[], Path], info: dict[str, Any]) -> None:
        """Runs ``write`` on the thread; ``info`` (step, kind, pause) is kept for the
        record written when it is collected."""
        assert self._thread is None, "collect the previous write first (wait)"
        self._out = []
        self.info = dict(info)
        t0 = time.perf_counter()

        def run() -> None:
            try:
                self._out.append(("ok", write()))
            except BaseException as e:  # re-raised by wait(), in the training loop
                self._out.append(("error", e))
            self.info["write_s"] = time.perf_counter() - t0

        self._thread = threading.Thread(target=run, name="terarec-checkpoint", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """A write was started and not collected yet."""
        return self._thread is not None

    @property
    def done(self) -> bool:
        """The write in flight has finished (collect it with :meth:`wait`)."""
        return self._thread is not None and not self._thread.is_alive()

    def wait(self) -> Path:
        """Waits for the write in flight; returns its checkpoint's directory or raises
        its error."""
        assert self._thread is not None
        self._thread.join()
        self._thread = None
        (status, value), = self._out
        if status == "error":
            raise value
        return value

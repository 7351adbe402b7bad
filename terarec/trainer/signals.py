"""SIGTERM and SIGINT during ``terarec train``: stop after the step, save, exit cleanly.

A preempted job (SIGTERM from a scheduler or ``kill``) or a Ctrl-C (SIGINT) does not
lose what it trained since its last checkpoint: :class:`StopSignals` records the signal,
the training loop finishes the step it is in, stops (several ranks: all at the same
step, agreed at the next log step) and writes its checkpoint, skipping the final eval.
The save has ``train.grace_seconds``; one that outlives them is abandoned (the process
exits, the checkpoint directory still holds the previous checkpoint: saves replace it
atomically). The process then exits with ``128 + signal`` (143 for SIGTERM, 130 for
SIGINT), as a process killed by that signal does, so schedulers and ``terarec-launch``
see a terminated job that ``--resume auto`` continues. A second Ctrl-C aborts at once.

Handlers are installed only on the main thread (Python delivers signals there) and the
previous ones are restored when the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any, Optional

log = logging.getLogger("terarec.trainer")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Records the first SIGTERM / SIGINT of a run (use as a context manager).

    Attributes:
        signum: the signal received, or None.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: abort now
            return
        self.signum = signum
        log.warning("%s: stopping after this step and saving a checkpoint (Ctrl-C again "
                    "aborts without saving)", self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """``128 + signal``, as the shell reports a process killed by it."""
        return 128 + int(self.signum or 0)

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """After a signal: the body (the save) gets ``seconds``; past them the process
        exits with :attr:`exit_code`, leaving the previous checkpoint. No-op otherwise."""
        if self.signum is None:
            yield
            return
        done = threading.Event()

        def expire() -> None:
            if not done.wait(seconds):
                log.error("%s: the checkpoint save outlived train.grace_seconds (%gs) and "
                          "was abandoned; the previous checkpoint stays", self.name, seconds)
                logging.shutdown()
                os._exit(self.exit_code)

        t = threading.Thread(target=expire, name="terarec-grace", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()

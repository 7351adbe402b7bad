"""Fail fast when a rank dies or hangs, and say which one.

A collective that waits on a dead rank either errors at once (gloo: the socket closed)
or blocks until the process-group timeout (NCCL), and neither error says *which* rank is
gone. Each rank therefore runs a :class:`HealthMonitor` thread on its own connection to
the job's store, every ``interval_s``:

1. bumps its heartbeat counter ``hb/<rank>``;
2. checks the processes of the ranks on its own host (same pid namespace) by pid: a
   rank whose process is gone (or a zombie) before it said ``done/<rank>`` has died;
3. watches the heartbeat of one other rank, ``(rank + 1) % world`` (a ring: every
   rank is watched once, O(1) store traffic per rank): a counter that has not moved for
   ``timeout_s`` means that rank is hung, stopped or cut off;
4. reads the job-wide ``failed`` key, where the first rank to see a failure (or a rank
   whose own code raised) writes what happened.

On a failure the monitor publishes it, then gives the main thread ``grace_s`` to stop
on its own (a gloo collective has usually raised already, and ``DistContext.guard``
turns that error into a :class:`PeerFailure` naming the rank); a main thread still
blocked after that (an NCCL collective, a long computation) is ended with
``os._exit(1)`` after the message is printed: no rank waits past ``timeout_s`` plus a
few intervals for a peer that will never come.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

logger = logging.getLogger("terarec.launch")

EXIT_PEER_FAILED = 1


class PeerFailure(RuntimeError):
    """Another rank of the job died, hung, or failed; the message names it."""


@dataclass(frozen=True)
class ProcInfo:
    """Where a rank runs (gathered from every rank when the group starts).

    Attributes:
        rank: global rank.
        host: host name.
        pid: process id.
        pid_space: host name + pid namespace: ranks with the same value can check each
            other's pids.
        local_rank: rank on its node, as the launcher said.
        env_node: the node index the launcher gave (torchrun, Slurm), else None.
    """

    rank: int
    host: str
    pid: int
    pid_space: str
    local_rank: int
    env_node: Optional[int]

    def where(self) -> str:
        return f"rank {self.rank} (pid {self.pid} on {self.host})"


def pid_space() -> str:
    """This process's pid namespace: host name plus the namespace inode on Linux."""
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = "?"
    return f"{socket.gethostname()}:{ns}"


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _default_on_failure(monitor: HealthMonitor, message: str) -> None:
    """Lets the main thread stop on its own for ``grace_s``, then ends the process."""
    if monitor.wait_stop(monitor.grace_s):
        return  # the main thread is handling it (DistContext.guard / close)
    print(
        f"terarec: PeerFailure: rank {monitor.rank}: {message}; exiting",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_PEER_FAILED)


class HealthMonitor:
    """The per-rank watchdog described in the module docstring.

    Args:
        connect: opens this thread's own client connection to the job's store (already
            prefixed for terarec's keys).
        procs: every rank's :class:`ProcInfo`, indexed by rank.
        rank: this rank.
        timeout_s: silence after which a watched rank counts as hung (``dist.timeout_s``).
        interval_s: heartbeat and check period (default ``timeout_s / 10`` in
            [0.2 s, 5 s]).
        on_failure: called once, on the monitor thread, with the message; the default
            waits ``grace_s`` and ends the process.
        store_owner: who hosts the store, for the message when it vanishes.
        endpoint: the store's (host, port): when a store call fails, a plain TCP connect
            there tells a store that is gone (refused: failure at once) from a slow one.
    """

    def __init__(
        self,
        connect: Callable[[], dist.Store],
        procs: list[ProcInfo],
        rank: int,
        timeout_s: float,
        interval_s: Optional[float] = None,
        on_failure: Optional[Callable[[HealthMonitor, str], None]] = None,
        store_owner: str = "rank 0",
        endpoint: Optional[tuple[str, int]] = None,
    ) -> None:
        self.connect = connect
        self.procs = procs
        self.rank = rank
        self.world = len(procs)
        self.timeout_s = timeout_s
        self.interval_s = interval_s or min(max(timeout_s / 10.0, 0.2), 5.0)
        self.grace_s = max(2.0 * self.interval_s, 1.0)
        self.on_failure = on_failure or _default_on_failure
        self.store_owner = store_owner
        self.endpoint = endpoint
        me = procs[rank].pid_space
        self.local_peers = [p for p in procs if p.pid_space == me and p.rank != rank]
        self.watched = (rank + 1) % self.world
        self._failure: Optional[str] = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    @property
    def failure(self) -> Optional[str]:
        """What failed (first failure seen), or None."""
        return self._failure

    def wait_stop(self, seconds: float) -> bool:
        """Waits up to ``seconds`` for :meth:`stop`; True if it was called."""
        return self._stop.wait(seconds)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        store = self.connect()  # in the caller: a connection error surfaces here
        self._thread = threading.Thread(
            target=self._run, args=(store,), name=f"terarec-health-{self.rank}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread (a rank leaving normally calls this before ``done``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 10.0)
        self._thread = None

    def diagnose(self, wait_s: Optional[float] = None) -> Optional[str]:
        """What failed, asked by the main thread after a collective raised.

        First the watchdog checks at once (pids on this host, the ``failed`` key) and
        this waits up to ``wait_s`` (default ``grace_s``) for it. If that names no one,
        every rank's heartbeat is read twice, ``3 * interval_s`` apart: ranks whose
        counter did not move and that did not say ``done`` are named (and published).
        This covers a rank alone on a host that died, which no pid check can see.

        Returns:
            The failure's message, or None when no peer could be blamed.
        """
        if self._poll(self.grace_s if wait_s is None else wait_s):
            return self._failure
        try:
            store = self.connect()
            before = self._beats(store)
            if self._poll(3.0 * self.interval_s):
                return self._failure
            after = self._beats(store)
            silent = [r for r in range(self.world) if r != self.rank
                      and before[r] == after[r] and not self._done(store, r)]
        except Exception:  # noqa: BLE001 - the store is gone: the watchdog says so
            self._poll(self.grace_s)
            return self._failure
        if silent:
            names = ", ".join(self.procs[r].where() for r in silent[:4])
            more = f" and {len(silent) - 4} more" if len(silent) > 4 else ""
            self.report(store, f"{names}{more} stopped sending heartbeats "
                               f"(dead, hung or cut off)")
        return self._failure

    def _poll(self, seconds: float) -> bool:
        """Wakes the watchdog until it reports a failure or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while self._failure is None and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(min(0.1, self.interval_s))
        return self._failure is not None

    def _beats(self, store: dist.Store) -> list[int]:
        keys = [f"hb/{r}" for r in range(self.world)]
        if store.check(keys):
            return [int(v) for v in store.multi_get(keys)]
        return [int(store.add(k, 0)) for k in keys]

    def report(self, store: dist.Store, message: str) -> None:
        """Publishes a failure of this rank's own (e.g. an exception in its code)."""
        with self._lock:
            if self._failure is None:
                self._failure = message
        try:
            if not store.check(["failed"]):
                store.set("failed", message)
        except Exception:  # noqa: BLE001 - the store may be gone already
            pass

    # ---------------------------------------------------------------- the thread
    def _fail(self, store: Optional[dist.Store], message: str) -> None:
        with self._lock:
            if self._failure is not None or self._stop.is_set():
                return
            self._failure = message
        logger.info("rank %d: %s", self.rank, message)
        if store is not None:
            try:
                if not store.check(["failed"]):
                    store.set("failed", message)
            except Exception:  # noqa: BLE001 - best effort; our own exit still follows
                pass
        self.on_failure(self, message)

    def _done(self, store: dist.Store, rank: int) -> bool:
        return bool(store.check([f"done/{rank}"]))

    def _run(self, store: dist.Store) -> None:
        last_value, last_change = -1, time.monotonic()
        lost_since: Optional[float] = None
        while not self._stop.is_set():
            try:
                self._check(store, last_value, last_change)
                value = int(store.add(f"hb/{self.watched}", 0))
                if value != last_value:
                    last_value, last_change = value, time.monotonic()
                lost_since = None
            except Exception as e:  # noqa: BLE001 - the store is unreachable
                if self._stop.is_set():
                    return
                now = time.monotonic()
                lost_since = lost_since or now
                if self._store_gone() or now - lost_since >= self.grace_s:
                    self._fail(
                        None,
                        f"lost the job's rendezvous store (hosted by {self.store_owner}): "
                        f"{self.store_owner} died or is unreachable ({type(e).__name__}: {e})",
                    )
                    return
            if self._failure is not None:
                return
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _store_gone(self) -> bool:
        """A TCP connect to the store's endpoint is refused: its process has exited."""
        if self.endpoint is None:
            return False
        try:
            with socket.create_connection(self.endpoint, timeout=min(self.interval_s, 2.0)):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False  # slow or unreachable: the grace period decides

    def _check(self, store: dist.Store, last_value: int, last_change: float) -> None:
        store.add(f"hb/{self.rank}", 1)
        if store.check(["failed"]):
            self._fail(None, store.get("failed").decode(errors="replace"))
            return
        for p in self.local_peers:
            if not process_alive(p.pid) and not self._done(store, p.rank):
                self._fail(store, f"{p.where()} died (its process is gone)")
                return
        silent = time.monotonic() - last_change
        if last_value >= 0 and silent > self.timeout_s:
            if not self._done(store, self.watched):
                p = self.procs[self.watched]
                self._fail(
                    store,
                    f"{p.where()} sent no heartbeat for {silent:.0f} s (> dist.timeout_s="
                    f"{self.timeout_s:g}): hung, stopped or cut off",
                )

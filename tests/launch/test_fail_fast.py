"""A rank that dies, hangs or fails makes the others stop, naming it, within the timeout.

The health monitor is tested in-process first (a HashStore, fake peers), then on real
2-process gloo jobs on loopback: SIGKILL a rank, SIGSTOP one, kill the rank hosting the
store, a rank raising in its own code, and a rank that never starts.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from launch_helpers import PROBE, PY, WORKER, Ranks, free_port, torchrun_env

from terarec.launch.health import HealthMonitor, ProcInfo, pid_space, process_alive


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


class _Catch:
    """on_failure that records the message instead of ending the process."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.event = threading.Event()

    def __call__(self, monitor: HealthMonitor, message: str) -> None:
        self.messages.append(message)
        self.event.set()


def _monitor(peer_pid: int, timeout_s: float = 30.0):  # noqa: ANN202
    store = dist.PrefixStore("t", dist.HashStore())
    me = ProcInfo(0, socket.gethostname(), 1, pid_space(), 0, None)
    peer = ProcInfo(1, socket.gethostname(), peer_pid, pid_space(), 1, None)
    catch = _Catch()
    mon = HealthMonitor(lambda: store, [me, peer], 0, timeout_s, interval_s=0.05,
                        on_failure=catch)
    return mon, store, catch


def test_process_alive_counts_zombies_as_dead() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while process_alive(p.pid):  # exits, and stays a zombie until we reap it
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert Path(f"/proc/{p.pid}").exists()  # not reaped yet: a zombie
    finally:
        p.wait()
    assert not process_alive(p.pid)


def test_monitor_names_a_dead_local_peer() -> None:
    mon, store, catch = _monitor(_dead_pid())
    mon.start()
    try:
        assert catch.event.wait(10)
    finally:
        mon.stop()
    assert catch.messages[0].startswith("rank 1 (pid ") and "died" in catch.messages[0]
    assert store.get("failed").decode() == catch.messages[0]  # told the other ranks


def test_monitor_ignores_a_peer_that_left_normally() -> None:
    mon, store, catch = _monitor(_dead_pid())
    store.set("done/1", "1")
    mon.start()
    time.sleep(0.5)
    mon.stop()
    assert catch.messages == []


def test_monitor_names_a_silent_peer_after_the_timeout() -> None:
    import os

    mon, _, catch = _monitor(os.getpid(), timeout_s=0.5)  # alive, never beats
    t0 = time.monotonic()
    mon.start()
    try:
        assert catch.event.wait(10)
    finally:
        mon.stop()
    assert 0.5 <= time.monotonic() - t0 < 5
    assert "rank 1" in catch.messages[0] and "no heartbeat" in catch.messages[0]


def test_monitor_relays_a_failure_published_by_another_rank() -> None:
    import os

    mon, store, catch = _monitor(os.getpid())
    store.set("failed", "rank 7 failed: DataError: bad file")
    mon.start()
    try:
        assert catch.event.wait(10)
    finally:
        mon.stop()
    assert catch.messages == ["rank 7 failed: DataError: bad file"]


def test_diagnose_names_a_silent_peer_on_another_host() -> None:
    # A rank alone on its host died: no pid check can see it; its heartbeat stopped.
    store = dist.PrefixStore("t", dist.HashStore())
    me = ProcInfo(0, socket.gethostname(), 1, pid_space(), 0, None)
    far = ProcInfo(1, "elsewhere", 4242, "elsewhere:1", 0, None)
    catch = _Catch()
    mon = HealthMonitor(lambda: store, [me, far], 0, 30.0, interval_s=0.05,
                        on_failure=catch)
    store.add("hb/1", 1)
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(0.01):
            store.add("hb/1", 1)

    t = threading.Thread(target=beat)
    t.start()
    mon.start()
    try:
        assert mon.diagnose(0.1) is None  # alive and beating: nobody to blame
        beating.set()
        t.join()
        msg = mon.diagnose(0.1)
    finally:
        mon.stop()
    assert msg == "rank 1 (pid 4242 on elsewhere) stopped sending heartbeats " \
        "(dead, hung or cut off)"
    assert store.get("failed").decode() == msg


# ----------------------------------------------------------------- real 2-rank jobs

TIMEOUT_S = 20.0  # dist.timeout_s of the jobs below


def _probe_job(ranks: Ranks, timeout_s: float = TIMEOUT_S) -> None:
    port = free_port()
    for r in range(2):
        ranks.start([*PROBE, "--steps", "100000", "--sleep-s", "0.05",
                     "--timeout-s", str(timeout_s)], torchrun_env(r, 2, port))
    for r in range(2):
        ranks.wait_for(r, '"rank": ', timeout=50)


def _wait_exit(ranks: Ranks, i: int, within: float) -> tuple[int, float, str]:
    t0 = time.monotonic()
    try:
        code = ranks.procs[i].wait(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank {i} still running {within} s after the failure:\n"
                    + ranks.output(i)[-2000:])
    return code, time.monotonic() - t0, ranks.output(i)


def test_killed_rank_makes_the_other_fail_fast_naming_it(tmp_path: Path) -> None:
    with Ranks(tmp_path) as ranks:
        _probe_job(ranks)
        ranks.kill(1)
        code, took, out = _wait_exit(ranks, 0, TIMEOUT_S)
    assert code != 0
    assert "PeerFailure: rank 0 stops: rank 1 (pid" in out and "died" in out, out[-2000:]
    assert took < TIMEOUT_S


def test_killed_store_host_names_rank_0(tmp_path: Path) -> None:
    with Ranks(tmp_path) as ranks:
        _probe_job(ranks)
        ranks.kill(0)
        code, took, out = _wait_exit(ranks, 1, TIMEOUT_S)
    assert code != 0
    assert "PeerFailure: rank 1 stops: lost the job's rendezvous store (hosted by rank 0)" \
        in out, out[-2000:]


def test_stopped_rank_fails_the_other_after_the_timeout(tmp_path: Path) -> None:
    timeout_s = 4.0
    with Ranks(tmp_path) as ranks:
        _probe_job(ranks, timeout_s)
        ranks.kill(1, signal.SIGSTOP)  # hung: alive, silent
        code, took, out = _wait_exit(ranks, 0, timeout_s + 15)
    assert code != 0
    assert "rank 1 (pid" in out and "no heartbeat" in out, out[-2000:]
    assert timeout_s * 0.9 <= took < timeout_s + 10


def test_a_rank_that_raises_stops_the_others_with_its_error(tmp_path: Path) -> None:
    port = free_port()
    with Ranks(tmp_path) as ranks:
        for r in range(2):
            ranks.start([PY, WORKER, "raise", str(tmp_path), "20", str(TIMEOUT_S)],
                        torchrun_env(r, 2, port))
        codes = ranks.wait(60)
        out0, out1 = ranks.output(0), ranks.output(1)
    assert codes[1] == 1 and "ValueError: boom at step 20" in out1  # its own traceback
    assert codes[0] == 3, out0[-2000:]
    assert "PeerFailure: rank 0 stops: rank 1 failed: ValueError: boom at step 20" in out0


def test_a_rank_that_never_comes_is_named_at_the_timeout(tmp_path: Path) -> None:
    with Ranks(tmp_path) as ranks:
        t0 = time.monotonic()
        ranks.start([*PROBE, "--timeout-s", "3"], torchrun_env(0, 3, free_port()))
        (code,) = ranks.wait(40)
        out = ranks.output(0)
    assert code == 1
    assert "rank(s) [1, 2] of 3 did not join the rendezvous within dist.timeout_s=3 s" in out
    assert time.monotonic() - t0 < 40

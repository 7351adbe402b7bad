"""Starting several local ranks for the launch tests (loopback only) and cleaning up."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
WORKER = str(Path(__file__).with_name("dist_worker.py"))
PROBE = [PY, "-m", "terarec.launch.probe", "--device", "cpu"]  # gloo on CPU, GPU or not
LAUNCHER_VARS = re.compile(
    r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|GROUP_WORLD_SIZE|ROLE_\w+"
    r"|MASTER_ADDR|MASTER_PORT|TORCHELASTIC_\w+|OMPI_\w+|PMI_\w+|PMIX_\w+|MPI_LOCAL\w+"
    r"|SLURM_\w+)$"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    """This environment without any launcher's variables, quiet and single-threaded."""
    env = {k: v for k, v in os.environ.items() if not LAUNCHER_VARS.match(k)}
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO), TORCH_CPP_LOG_LEVEL="ERROR")
    return env


def torchrun_env(rank: int, world: int, port: int, local_world: Optional[int] = None,
                 **extra: str) -> dict[str, str]:
    """What torchrun would set for ``rank`` (nodes of ``local_world`` ranks each)."""
    lw = local_world or world
    env = base_env()
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % lw),
               LOCAL_WORLD_SIZE=str(lw), GROUP_RANK=str(rank // lw),
               GROUP_WORLD_SIZE=str(world // lw), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), **extra)
    return env


class Ranks:
    """Local processes, one per rank, logging to files; all killed on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.tmp / f"proc{len(self.procs)}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(list(cmd), env=env, stdout=f, stderr=subprocess.STDOUT,
                                 cwd=REPO, start_new_session=True)
        self.procs.append(p)
        self.logs.append(log)
        return p

    def output(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait_for(self, i: int, text: str, timeout: float) -> None:
        """Waits until process ``i`` printed ``text`` (fails if it exits first)."""
        deadline = time.monotonic() + timeout
        while text not in self.output(i):
            if self.procs[i].poll() is not None:
                raise AssertionError(f"process {i} exited {self.procs[i].returncode}:\n"
                                     + self.output(i)[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"process {i}: no {text!r} in {timeout} s:\n"
                                     + self.output(i)[-3000:])
            time.sleep(0.1)

    def wait_for_lines(self, path: Path, lines: int, timeout: float) -> None:
        """Waits until ``path`` (a run's ``metrics.jsonl``) holds ``lines`` lines, every
        process still running (fails with process 0's output otherwise)."""
        deadline = time.monotonic() + timeout
        while not (path.exists() and path.read_text().count("\n") >= lines):
            assert time.monotonic() < deadline, self.output(0)[-3000:]
            assert all(p.poll() is None for p in self.procs), self.output(0)[-3000:]
            time.sleep(0.1)

    def wait(self, timeout: float) -> list[int]:
        """Exit codes of every process (all must end within ``timeout``)."""
        deadline = time.monotonic() + timeout
        codes = []
        for i, p in enumerate(self.procs):
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"process {i} still running after {timeout} s:\n" + self.output(i)[-3000:]
                ) from None
        return codes

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.procs[i].pid, sig)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait(timeout=30)

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

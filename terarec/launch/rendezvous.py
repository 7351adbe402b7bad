"""The rendezvous store every rank of a job connects to.

One ``torch.distributed.TCPStore`` per job, at an endpoint that depends on the launcher:

* **torchrun** (or ``MASTER_ADDR`` / ``MASTER_PORT`` set by hand): that endpoint; when
  torchrun's agent already hosts the store there (``TORCHELASTIC_USE_AGENT_STORE``),
  every rank is a client, else rank 0 hosts it.
* **mpirun** (Open MPI, MPICH): rank 0 starts the store (``dist.master_port``, or a free
  port when 0) and sends its address and port to every rank over mpi4py (``bcast``),
  so nothing has to be agreed on beforehand. The address is ``dist.master_addr``, else
  loopback when every rank runs on rank 0's host, else rank 0's host name.
* **Slurm** (``srun``): rank 0 hosts the store at ``dist.master_addr`` /
  ``dist.master_port``, else the step's first node and a port derived from the job id.

The process group, the health monitor and ``terarec``'s own keys all live in this store
(under prefixes). Every wait is bounded by ``dist.timeout_s``.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from terarec.config import DistConfig
from terarec.launch.env import LaunchEnv, LaunchError

logger = logging.getLogger("terarec.launch")

LOOPBACK = "127.0.0.1"


@dataclass
class Rendezvous:
    """A connected store and where it is.

    Attributes:
        store: this process's client of the job's store (a ``HashStore`` for one process).
        addr, port: the store's endpoint (None for one process).
        hosting: this process runs the store's server (it must outlive the others).
        where: who hosts it, for messages ("rank 0", "torchrun's agent").
    """

    store: dist.Store
    addr: Optional[str]
    port: Optional[int]
    hosting: bool
    where: str

    def connect(self, timeout_s: float) -> dist.Store:
        """A new client connection to the same store (for another thread)."""
        if self.addr is None or self.port is None:
            return self.store  # a HashStore is in-process and thread-safe
        return dist.TCPStore(
            self.addr, self.port, is_master=False, timeout=timedelta(seconds=timeout_s)
        )


def _tcp_store(
    addr: str, port: int, env: LaunchEnv, hosting: bool, timeout_s: float
) -> dist.TCPStore:
    try:
        return dist.TCPStore(
            addr,
            port,
            world_size=env.world_size,
            is_master=hosting,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
    except Exception as e:  # noqa: BLE001 - torch raises several types here
        if hosting:
            raise LaunchError(
                f"rank {env.rank}: cannot start the rendezvous store on port {port} "
                f"({type(e).__name__}: {e}); pick another with MASTER_PORT or dist.master_port"
            ) from None
        raise LaunchError(
            f"rank {env.rank}: cannot reach the rendezvous store of rank 0 at {addr}:{port} "
            f"within dist.timeout_s={timeout_s:g} s ({type(e).__name__}: {e}); is rank 0 "
            "running, and is the address reachable from this host?"
        ) from None


def _mpi_rendezvous(env: LaunchEnv, cfg: DistConfig) -> Rendezvous:
    """Rank 0 starts the store; its endpoint reaches every rank by ``MPI_Bcast``."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError(
            f"launched by {env.launcher} ({env.describe()}) without MASTER_ADDR/MASTER_PORT, "
            "so rank 0 shares the rendezvous endpoint over MPI, which needs mpi4py: "
            "pip install 'terarec[mpi]' (or set MASTER_ADDR and MASTER_PORT)"
        ) from None
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (env.rank, env.world_size):
        raise LaunchError(
            f"MPI says rank {comm.Get_rank()} of {comm.Get_size()} but the environment says "
            f"{env.describe()}: mixed launchers?"
        )
    hosts = comm.allgather(socket.gethostname())
    payload: tuple[Optional[str], int, Optional[str]] = (None, 0, None)
    store: Optional[dist.Store] = None
    if env.rank == 0:
        addr = env.master_addr or cfg.master_addr
        if addr is None:
            addr = LOOPBACK if len(set(hosts)) == 1 else hosts[0]
        port = env.master_port or cfg.master_port
        try:
            store = _tcp_store(addr, port, env, True, cfg.timeout_s)
            payload = (addr, int(store.port), None)
        except LaunchError as e:
            payload = (None, 0, str(e))
    addr, port, err = comm.bcast(payload, root=0)
    if err is not None:
        raise LaunchError(err if env.rank == 0 else f"rank 0 failed to start: {err}")
    assert addr is not None
    if store is None:
        store = _tcp_store(addr, port, env, False, cfg.timeout_s)
    return Rendezvous(store, addr, port, env.rank == 0, "rank 0")


def connect(env: LaunchEnv, cfg: DistConfig) -> Rendezvous:
    """Connects this process to its job's store (see the module docstring).

    Raises:
        LaunchError: no endpoint can be found, rank 0 cannot host the store, or the
            store cannot be reached within ``cfg.timeout_s``.
    """
    if env.world_size == 1:
        return Rendezvous(dist.HashStore(), None, None, True, "this process")
    if env.launcher in ("openmpi", "mpich") and (
        env.master_addr is None or env.master_port is None
    ):
        return _mpi_rendezvous(env, cfg)
    addr = env.master_addr or cfg.master_addr or env.fallback_addr
    port = env.master_port or cfg.master_port or env.fallback_port
    if addr is None or not port:
        raise LaunchError(
            f"{env.describe()}: no rendezvous endpoint: set MASTER_ADDR and MASTER_PORT "
            "(torchrun sets them), or dist.master_addr and dist.master_port"
        )
    hosting = env.rank == 0 and not env.agent_store
    where = "torchrun's agent" if env.agent_store else "rank 0"
    store = _tcp_store(addr, port, env, hosting, cfg.timeout_s)
    return Rendezvous(store, addr, port, hosting, where)


def await_ranks(store: dist.Store, env: LaunchEnv, timeout_s: float) -> None:
    """Returns once every rank has connected; else names the ranks that never came.

    Raises:
        LaunchError: ``rank(s) [3] did not arrive within 300 s``.
    """
    store.set(f"arrived/{env.rank}", env.describe())
    keys = [f"arrived/{r}" for r in range(env.world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - a timeout or a lost store
        try:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
        except Exception:  # noqa: BLE001 - the store itself is gone
            raise LaunchError(
                f"rank {env.rank}: lost the rendezvous store while waiting for the other "
                f"ranks ({type(e).__name__}: {e})"
            ) from None
        shown = missing[:16] + (["..."] if len(missing) > 16 else [])  # type: ignore[list-item]
        raise LaunchError(
            f"rank {env.rank}: rank(s) {shown} of {env.world_size} did not join the "
            f"rendezvous within dist.timeout_s={timeout_s:g} s (not started, crashed at "
            "start-up, or cannot reach the store)"
        ) from None

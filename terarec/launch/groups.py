"""The launch environment -> an initialised process group and its subgroups.

:func:`init_distributed` is the one function every multi-process entry point calls::

    from terarec.launch import init_distributed

    with init_distributed(cfg.dist, device=cfg.train.device) as ctx:
        with ctx.guard():          # a failing peer -> PeerFailure naming the rank
            ...                    # ctx.fast_group: this node's ranks; ctx.cross_group:
                                   # the same local rank on every node

Groups (docs/design.md, "hierarchical synchronisation"):

* **world**: every rank (the default group).
* **fast group**: the ranks that sync every step — the topology plan's NVLink islands
  when ``terarec-launch`` applied a plan (``TERAREC_FAST_GROUPS``), else one node's ranks,
  ordered by local rank.
* **cross group**: the ranks at the same position of every fast group (local rank ``l``
  of each node), the group that merges replicas across nodes.

A node is the launcher's node index when it gives one (torchrun, Slurm), else a host
name (mpirun); the local ranks of a node must be exactly ``0..n-1``. Lower layers never
import this module: the trainer hands them the group handles it needs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional, TypeVar

import torch
import torch.distributed as dist

from terarec.config import ConfigError, DistBackend, DistConfig
from terarec.launch.env import LaunchEnv, LaunchError, read_launch_env
from terarec.launch.health import HealthMonitor, PeerFailure, ProcInfo, pid_space
from terarec.launch.rendezvous import Rendezvous, await_ranks, connect
from terarec.runtime import DeviceUnavailable, DistHandles, resolve_device

T = TypeVar("T")
logger = logging.getLogger("terarec.launch")


@dataclass
class DistContext(DistHandles):
    """This rank's place in the job and its process groups (:class:`DistHandles`), and
    what the launcher keeps.

    Attributes:
        backend: ``nccl`` or ``gloo``.
        env: what the launcher said.
    """

    backend: str
    env: LaunchEnv
    _rdzv: Optional[Rendezvous] = field(default=None, repr=False)
    _store: Optional[dist.Store] = field(default=None, repr=False)
    _monitor: Optional[HealthMonitor] = field(default=None, repr=False)
    _timeout_s: float = field(default=300.0, repr=False)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def monitor(self) -> Optional[HealthMonitor]:
        return self._monitor

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Turns an error caused by a failed peer into a :class:`PeerFailure` naming it.

        An exception of this rank's own (one no peer explains) is published to the other
        ranks, so that they stop with its message, and re-raised unchanged.
        """
        try:
            yield
        except PeerFailure:
            raise
        except Exception as e:
            monitor, store = self._monitor, self._store
            if monitor is None:
                raise
            # The store may be cut off too: each of these is bounded (a cut-off store
            # blocks its calls for minutes), the rank stops either way.
            bound = self._timeout_s + 4.0 * monitor.interval_s
            cause = _bounded(lambda: monitor.diagnose(2.0 * monitor.interval_s), bound,
                             "diagnose")
            if cause is None:
                cause = monitor.failure  # what the watchdog found meanwhile, if anything
            if cause is not None and not cause.startswith(f"rank {self.rank} failed:"):
                raise PeerFailure(f"rank {self.rank} stops: {cause}") from e
            assert store is not None
            if _is_comm_error(e):  # a peer's doing, but none could be named
                msg = (f"rank {self.rank}: a collective failed and no rank was found dead "
                       f"or silent: {type(e).__name__}: {e}")
                _bounded(lambda: monitor.report(store, msg), 2.0 * monitor.interval_s,
                         "report")
                raise PeerFailure(msg) from e
            msg = f"rank {self.rank} failed: {type(e).__name__}: {e}"
            _bounded(lambda: monitor.report(store, msg), 2.0 * monitor.interval_s, "report")
            raise

    def close(self) -> None:
        """Leaves the job: stops the monitor, says ``done``, tears the groups down.

        The rank hosting the store waits (up to ``dist.timeout_s``, less once a failure
        is known) until every rank is done, so nobody loses the store while leaving.
        """
        failed = self._monitor is not None and self._monitor.failure is not None
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        store, rdzv = self._store, self._rdzv
        # after a failure the store or a peer may be cut off: leaving is bounded
        bound = self._timeout_s if not failed else 5.0
        if store is not None and rdzv is not None and self.world_size > 1:
            def say_done() -> None:
                store.set(f"done/{self.rank}", "1")
                if rdzv.hosting and not failed:
                    _wait_done(store, self.world_size, self._timeout_s)
            _bounded(say_done, bound + 5.0, "done")
        self._store, self._rdzv = None, None
        if dist.is_initialized():
            _bounded(dist.destroy_process_group, bound, "destroy_process_group")

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_COMM_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                "gloo/transport", "NCCL error", "Timed out", "timed out")


def _is_comm_error(e: BaseException) -> bool:
    """An error of the communication layer (a peer gone or too slow), not of our code."""
    return isinstance(e, dist.DistError) or any(s in str(e) for s in _COMM_ERRORS)


def _bounded(fn: Callable[[], T], seconds: float, what: str) -> Optional[T]:
    """``fn()`` on a daemon thread for at most ``seconds``: its result, or None when it
    raised or is still blocked (a call to a store or a peer that is cut off), which the
    caller then goes on without."""
    out: list[T] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 - leaving anyway
            logger.debug("%s: %s", what, e)

    t = threading.Thread(target=run, name=f"terarec-{what}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        logger.debug("%s did not finish in %.0f s; going on without it", what, seconds)
    return out[0] if out else None


def _wait_done(store: dist.Store, world: int, timeout_s: float) -> None:
    import time

    keys = [f"done/{r}" for r in range(world)]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if store.check(keys) or store.check(["failed"]):
            return
        time.sleep(0.05)
    logger.warning("rank 0: not every rank said done within %.0f s", timeout_s)


def pick_device(preference: str, env: LaunchEnv) -> torch.device:
    """The rank's device for ``train.device`` (:func:`terarec.runtime.resolve_device` at
    the launcher's local rank); a :class:`~terarec.config.ConfigError` when it cannot be
    had."""
    try:
        return resolve_device(preference, env.local_rank, env.local_world_size)
    except DeviceUnavailable as e:
        # a config error, as in one process (exit 2)
        raise ConfigError(f"{env.describe()}: {e}" if e.per_rank else str(e)) from None


def _backend(cfg: DistConfig, device: torch.device) -> str:
    if cfg.backend == DistBackend.AUTO:
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.backend == DistBackend.NCCL and device.type != "cuda":
        raise LaunchError(f"dist.backend=nccl needs a CUDA device; this rank runs on {device}")
    return cfg.backend.value


def assign_nodes(procs: Sequence[ProcInfo]) -> list[int]:
    """Node index of every rank: the launcher's when all ranks have one, else by host
    name (nodes numbered in the order of their lowest rank).

    Raises:
        LaunchError: the local ranks of some node are not exactly ``0..n-1``.
    """
    if all(p.env_node is not None for p in procs):
        nodes = [int(p.env_node) for p in procs]  # type: ignore[arg-type]
    else:
        index: dict[str, int] = {}
        nodes = [index.setdefault(p.host, len(index)) for p in procs]
    for n in sorted(set(nodes)):
        local = sorted(p.local_rank for p, m in zip(procs, nodes) if m == n)
        if local != list(range(len(local))):
            hosts = sorted({p.host for p, m in zip(procs, nodes) if m == n})
            raise LaunchError(
                f"node {n} (host {', '.join(hosts)}): local ranks {local} are not "
                f"0..{len(local) - 1}: the launcher's local ranks disagree with its node layout"
            )
    return nodes


def plan_groups(
    procs: Sequence[ProcInfo], fast_groups: Optional[Sequence[Sequence[int]]] = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Fast groups and cross groups as lists of global ranks.

    Args:
        procs: every rank's :class:`ProcInfo`.
        fast_groups: the topology plan's fast groups (a partition of the ranks); None:
            one per node, ordered by local rank.

    Returns:
        (fast groups, cross groups); cross group ``j`` holds member ``j`` of every fast
        group that has one.
    """
    world = len(procs)
    if fast_groups is None:
        nodes = assign_nodes(procs)
        by_node: dict[int, list[ProcInfo]] = {}
        for p, n in zip(procs, nodes):
            by_node.setdefault(n, []).append(p)
        fast = [[p.rank for p in sorted(by_node[n], key=lambda p: p.local_rank)]
                for n in sorted(by_node)]
    else:
        fast = [list(g) for g in fast_groups]
        flat = sorted(r for g in fast for r in g)
        if flat != list(range(world)) or any(not g for g in fast):
            raise LaunchError(f"fast groups {fast}: not a partition of ranks 0..{world - 1}")
    width = max(len(g) for g in fast)
    cross = [[g[j] for g in fast if j < len(g)] for j in range(width)]
    return fast, cross


def fast_groups_from_plan(
    procs: Sequence[ProcInfo], local_groups: Sequence[Optional[Sequence[Sequence[int]]]]
) -> Optional[list[list[int]]]:
    """Global fast groups from every rank's node plan (``LaunchEnv.local_fast_groups``).

    Args:
        procs: every rank's :class:`ProcInfo`.
        local_groups: per rank, its node's fast groups as local ranks, or None.

    Returns:
        The groups as global ranks, node by node; None when no rank has a plan.

    Raises:
        LaunchError: some ranks have a plan and others not, or the ranks of one node
            disagree on it.
    """
    if all(g is None for g in local_groups):
        return None
    missing = [p.rank for p, g in zip(procs, local_groups) if g is None]
    if missing:
        raise LaunchError(f"ranks {missing} have no topology fast groups but others do: "
                          "launch every node the same way (terarec-launch, or --no-topology)")
    nodes = assign_nodes(procs)
    out: list[list[int]] = []
    for n in sorted(set(nodes)):
        members = [(p, g) for p, g, m in zip(procs, local_groups, nodes) if m == n]
        glob = {p.local_rank: p.rank for p, _ in members}
        plans = {tuple(tuple(x) for x in g) for _, g in members}  # type: ignore[union-attr]
        if len(plans) != 1:
            raise LaunchError(f"node {n}: its ranks disagree on the fast groups {sorted(plans)}")
        for g in plans.pop():
            out.append([glob[lr] for lr in g])
    return out


def init_distributed(
    cfg: DistConfig,
    device: str = "auto",
    *,
    environ: Optional[Mapping[str, str]] = None,
    fast_groups: Optional[Sequence[Sequence[int]]] = None,
    monitor: bool = True,
) -> DistContext:
    """Turns the launch environment into an initialised process group and subgroups.

    Works the same under torchrun, mpirun (Open MPI, MPICH), Slurm's srun and a plain
    single process (a world of one, so callers need no special case).

    Args:
        cfg: the ``dist:`` config section (backend, timeout, endpoint overrides).
        device: ``train.device`` (auto | cpu | cuda | cuda:N); picks the rank's device
            and, with ``backend: auto``, nccl (CUDA) or gloo (CPU).
        environ: the environment to read (default ``os.environ``).
        fast_groups: fast groups as global ranks (default: the topology plan's, which
            ``terarec-launch`` passes in ``TERAREC_FAST_GROUPS``, else one per node).
        monitor: run the :class:`HealthMonitor` (multi-rank runs only).

    Returns:
        The :class:`DistContext`; ``close()`` it (or use it as a context manager).

    Raises:
        LaunchError: bad launch environment, rendezvous failure or timeout (naming the
            ranks that never came), inconsistent node layout.
    """
    if dist.is_initialized():
        raise LaunchError("a default process group already exists in this process")
    env = read_launch_env(environ)
    dev = pick_device(device, env)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = _backend(cfg, dev)
    rdzv = connect(env, cfg)
    store = dist.PrefixStore(f"terarec/{env.restart_count}", rdzv.store)
    await_ranks(store, env, cfg.timeout_s)
    timeout = timedelta(seconds=cfg.timeout_s)
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"default_pg/{env.restart_count}", rdzv.store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        **kwargs,
    )
    try:
        me = ProcInfo(env.rank, socket.gethostname(), os.getpid(), pid_space(),
                      env.local_rank, env.node_rank)
        gathered: list[Optional[tuple[ProcInfo, object]]] = [None] * env.world_size
        dist.all_gather_object(gathered, (me, env.local_fast_groups))
        infos = [g[0] for g in gathered if g is not None]
        if fast_groups is None:  # the topology plan's, when terarec-launch applied one
            fast_groups = fast_groups_from_plan(
                infos, [g[1] for g in gathered if g is not None])  # type: ignore[misc]
        fast, cross = plan_groups(infos, fast_groups)
        # Every rank creates every group, in the same order (torch.distributed's rule).
        fast_pgs = [dist.new_group(g, timeout=timeout, backend=backend) for g in fast]
        cross_pgs = [dist.new_group(g, timeout=timeout, backend=backend) for g in cross]
        node = next(i for i, g in enumerate(fast) if env.rank in g)
        pos = fast[node].index(env.rank)
        ctx = DistContext(
            rank=env.rank,
            world_size=env.world_size,
            local_rank=pos,
            local_world_size=len(fast[node]),
            node=node,
            num_nodes=len(fast),
            device=dev,
            backend=backend,
            world=dist.group.WORLD,
            fast_group=fast_pgs[node],
            cross_group=cross_pgs[pos],
            fast_ranks=tuple(fast[node]),
            cross_ranks=tuple(cross[pos]),
            env=env,
            _rdzv=rdzv,
            _store=store,
            _timeout_s=cfg.timeout_s,
        )
        if monitor and env.world_size > 1:
            prefix = f"terarec/{env.restart_count}"
            ctx._monitor = HealthMonitor(
                lambda: dist.PrefixStore(prefix, rdzv.connect(cfg.timeout_s)),
                infos, env.rank, cfg.timeout_s, store_owner=rdzv.where,
                endpoint=None if rdzv.addr is None else (rdzv.addr, int(rdzv.port or 0)),
            )
            ctx._monitor.start()
    except BaseException:
        dist.destroy_process_group()
        raise
    logger.debug("%s: node %d fast %s cross %s on %s (%s)", env.describe(), ctx.node,
                 ctx.fast_ranks, ctx.cross_ranks, dev, backend)
    return ctx

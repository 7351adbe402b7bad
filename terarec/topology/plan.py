"""The routing plan: for each local rank its GPU, CPU cores, memory node, NIC, SSD
directory, environment, and the node's fast groups. Pure: a :class:`Machine` in, a
:class:`Plan` out.

Rules (docs/topology.md has the why):

* **GPU**: local rank ``i`` drives GPU ``i`` (``i % n`` with more ranks than GPUs, a
  warning; nvidia-smi's index; the plan sets
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers them the same way). A CPU box
  spreads its ranks over the NUMA nodes in order.
* **CPU cores / memory node**: the GPU's NUMA node (``NUMA Affinity``; else the node its
  ``CPU Affinity`` overlaps most). The node's physical cores are split into contiguous,
  disjoint shares among the ranks on it, hyperthread siblings kept together;
  ``OMP_NUM_THREADS`` is the share's core count. The host tier's memory goes on the node.
* **NIC**: the nearest RDMA NIC by PCIe link (PIX < PXB < PHB < NODE < SYS), ties to the
  least used one. A GPU whose nearest is NODE or SYS while an NVLink peer that runs a rank
  has a nearer one *relays* through that peer: it uses the peer's NIC and reaches it over
  NVLink (NCCL's PXN does the copy; terarec's own cross-node merge routes through
  ``relay_gpu``). ``NCCL_IB_HCA`` is ``=mlx5_N`` (exact: a bare ``mlx5_1`` would also
  match ``mlx5_10``); a GPU with only Ethernet gets ``NCCL_SOCKET_IFNAME=<netdev>``.
* **SSD directory**: on the nearest mounted NVMe data volume (same node, then a RAID
  spanning nodes, then the same socket, then anywhere), ties to the least used, then the
  largest; the OS disk (mounted on ``/``) only when there is no other, and a non-NVMe
  disk only when there is no NVMe (a warning).
* **Fast groups**: NVLink islands (connected components of the NV# links among the
  ranks' GPUs; the whole node under NVSwitch). Without NVLink: the GPUs of one socket
  (PCIe links up to NODE). A CPU box: the whole node.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from terarec.topology.model import (
    Machine,
    TopologyError,
    check_type,
    format_cpulist,
    is_near,
    nvlinks,
    pop_lists,
    relation_rank,
)

DEFAULT_SSD_SUBDIR = "terarec-ssd"
SSD_DIR_VAR = "TERAREC_SSD_DIR"


def planned_ssd_dir() -> Optional[str]:
    """The SSD directory the launcher applied to this process (``TERAREC_SSD_DIR``), if
    any; ``ssd.path: auto`` uses it."""
    return os.environ.get(SSD_DIR_VAR) or None


@dataclass
class RankPlan:
    """Where one local rank runs and what it talks through.

    Attributes:
        local_rank: the rank's index on this node.
        gpu: the GPU it drives (None on a CPU box).
        numa_node: memory node for its host tier and loader threads (None: unknown).
        cpus: the logical CPUs it may run on (disjoint from the other ranks' when the
            node has enough cores).
        omp_threads: physical cores in ``cpus`` (``OMP_NUM_THREADS``).
        nic: the NIC for its inter-node traffic, None when the machine has none.
        nic_link: the PCIe link to that NIC from the GPU that touches it (the relay's
            when relayed), e.g. ``PXB``.
        relay_gpu: the NVLink peer whose NIC it uses, None when it uses its own.
        disk: the disk of its SSD tier, None when no disk was found.
        ssd_dir: the SSD tier's directory on that disk.
        env: the environment variables the launcher sets for it.
    """

    local_rank: int
    gpu: Optional[int]
    numa_node: Optional[int]
    cpus: list[int]
    omp_threads: int
    nic: Optional[str] = None
    nic_link: Optional[str] = None
    relay_gpu: Optional[int] = None
    disk: Optional[str] = None
    ssd_dir: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Finding:
    """One line of ``terarec-topo --check``: ``warning`` (a bad placement the plan could
    not avoid) or ``note`` (worth knowing)."""

    level: str
    text: str


@dataclass
class Plan:
    """The plan for one node.

    Attributes:
        hostname: the machine planned for.
        ranks: one per local rank.
        fast_groups: partition of the local ranks into fast groups, each ascending.
        findings: what ``--check`` reports.
    """

    hostname: str
    ranks: list[RankPlan]
    fast_groups: list[list[int]]
    findings: list[Finding] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [f.text for f in self.findings if f.level == "warning"]


# ------------------------------------------------------------------------------ cores


def core_groups(cpus: list[int], threads_per_core: Optional[int]) -> list[list[int]]:
    """Logical CPUs -> physical cores (lists of hyperthread siblings), in CPU order.

    Linux numbers x86 siblings far apart (``0-55,112-167``: CPU ``c`` and ``c + 112``),
    POWER consecutively (SMT4: ``0-3``). Without sibling facts, a node whose CPU list is
    two equally long, gapped halves at a constant offset is taken as such pairs.
    """
    cpus = sorted(cpus)
    if threads_per_core == 1 or len(cpus) < 2:
        return [[c] for c in cpus]
    half = len(cpus) // 2
    a, b = cpus[:half], cpus[half:]
    if len(cpus) % 2 == 0 and threads_per_core in (None, 2) and b[0] > a[-1] + 1:
        d = b[0] - a[0]
        if all(y - x == d for x, y in zip(a, b)):
            return [[x, y] for x, y in zip(a, b)]
    if threads_per_core and threads_per_core > 1 and len(cpus) % threads_per_core == 0:
        k = threads_per_core
        return [cpus[i:i + k] for i in range(0, len(cpus), k)]
    return [[c] for c in cpus]


def split_cores(cores: list[list[int]], k: int) -> list[list[list[int]]]:
    """``cores`` into ``k`` contiguous shares (sizes differ by at most one); with fewer
    cores than shares, share ``j`` gets core ``j % len(cores)``."""
    if not cores:
        return [[] for _ in range(k)]
    if len(cores) < k:
        return [[cores[j % len(cores)]] for j in range(k)]
    n = len(cores)
    return [cores[j * n // k:(j + 1) * n // k] for j in range(k)]


# ------------------------------------------------------------------------------- plan


def _gpu_node(m: Machine, g: int) -> Optional[int]:
    gpu = m.gpus[g]
    if gpu.numa_node is not None:
        return gpu.numa_node
    if len(m.numa) == 1:
        return m.numa[0].id
    overlap = [(len(set(gpu.cpus) & set(n.cpus)), n.id) for n in m.numa]
    best = max(overlap, default=(0, None))
    return best[1] if best[0] > 0 else None


def _ssd_dir(mount: str, subdir: str) -> str:
    if mount == "/":  # the root file system: not the top directory
        return f"/var/tmp/{subdir}"
    return f"{mount.rstrip('/')}/{subdir}"


def _fast_groups(m: Machine, ranks: list[RankPlan]) -> list[list[int]]:
    gpu_ranks = [r for r in ranks if r.gpu is not None]
    if not gpu_ranks:
        return [[r.local_rank for r in ranks]]
    any_nv = any(nvlinks(m.gpu_links[a.gpu][b.gpu])  # type: ignore[index]
                 for a in gpu_ranks for b in gpu_ranks if a.gpu != b.gpu)

    def joined(a: RankPlan, b: RankPlan) -> bool:
        if a.gpu == b.gpu:
            return True
        rel = m.gpu_links[a.gpu][b.gpu]  # type: ignore[index]
        return nvlinks(rel) > 0 if any_nv else relation_rank(rel) <= relation_rank("NODE")

    parent = list(range(len(gpu_ranks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(gpu_ranks):
        for j in range(i + 1, len(gpu_ranks)):
            if joined(a, gpu_ranks[j]):
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(gpu_ranks):
        groups.setdefault(find(i), []).append(r.local_rank)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def _pick_nics(m: Machine, ranks: list[RankPlan], findings: list[Finding]) -> None:
    """Sets ``nic`` / ``nic_link`` / ``relay_gpu`` of every rank."""
    if not m.nics:
        return
    cand = [k for k, n in enumerate(m.nics) if n.rdma] or list(range(len(m.nics)))
    load: Counter[int] = Counter()
    gpu_ranks = {r.gpu: r for r in ranks if r.gpu is not None}
    chosen: dict[int, int] = {}  # rank -> NIC index

    def best_for(links: list[str]) -> int:
        k = min(cand, key=lambda k: (relation_rank(links[k]), load[k], k))
        load[k] += 1
        return k

    for r in ranks:
        if r.gpu is None:  # a CPU box: a NIC on the rank's node first
            k = min(cand, key=lambda k: (m.nics[k].numa_node != r.numa_node, load[k], k))
            load[k] += 1
            chosen[r.local_rank] = k
            continue
        chosen[r.local_rank] = best_for(m.nic_links(r.gpu))
    relays: Counter[int] = Counter()
    for r in ranks:
        k = chosen[r.local_rank]
        if r.gpu is None:
            r.nic = m.nics[k].name
            continue
        own = m.nic_links(r.gpu)[k]
        peers = []
        if not is_near(own):
            for h, pr in gpu_ranks.items():
                if h == r.gpu or not nvlinks(m.gpu_links[r.gpu][h]):
                    continue
                hk = chosen[pr.local_rank]
                hrel = m.nic_links(h)[hk]
                if relation_rank(hrel) < relation_rank(own):
                    peers.append((relation_rank(hrel), relays[h], -nvlinks(
                        m.gpu_links[r.gpu][h]), h, hk, hrel))
        if peers:
            _, _, _, h, hk, hrel = min(peers)
            relays[h] += 1
            load[k] -= 1
            load[hk] += 1
            r.nic, r.nic_link, r.relay_gpu = m.nics[hk].name, hrel, h
            findings.append(Finding("note", f"GPU{r.gpu}: nearest NIC {m.nics[k].name} is "
                                    f"{own}; relays through GPU{h} ({m.gpu_links[r.gpu][h]}) "
                                    f"to {m.nics[hk].name} ({hrel})"))
        else:
            r.nic, r.nic_link = m.nics[k].name, own
            if own == "SYS":
                findings.append(Finding("warning", f"GPU{r.gpu}: nearest NIC {m.nics[k].name} "
                                        "is across sockets (SYS) and no NVLink peer has a "
                                        "nearer one"))
    shared = Counter(r.nic for r in ranks if r.nic is not None)
    for nic, n in sorted(shared.items()):
        if n > 1 and len(ranks) > 1 and any(r.gpu is not None for r in ranks):
            who = ", ".join(f"GPU{r.gpu}" for r in ranks if r.nic == nic)
            findings.append(Finding("note", f"{nic} carries the traffic of {n} ranks ({who})"))


def _pick_disks(m: Machine, ranks: list[RankPlan], subdir: str,
                findings: list[Finding]) -> None:
    usable = [d for d in m.disks if d.mount]
    if not usable:
        findings.append(Finding("warning", "no mounted disk found: the SSD tier goes where "
                                "ssd.path says"))
        return
    nvme = [d for d in usable if d.nvme]
    if not nvme:
        findings.append(Finding("warning", "no NVMe disk: the SSD tier falls back to "
                                f"{', '.join(d.name for d in usable)} (slow random reads)"))
    pool = nvme or usable
    pool = [d for d in pool if d.mount != "/"] or pool  # a data volume before the OS disk
    load: Counter[str] = Counter()

    def distance(node: Optional[int], disk_node: Optional[int]) -> int:
        if node is None or disk_node is None:
            return 1
        if node == disk_node:
            return 0
        return 2 if m.socket_of(node) == m.socket_of(disk_node) else 3

    for r in ranks:
        d = min(pool, key=lambda d: (distance(r.numa_node, d.numa_node), load[d.name],
                                     -(d.size_gb or 0), d.name))
        load[d.name] += 1
        r.disk, r.ssd_dir = d.name, _ssd_dir(d.mount or "/", subdir)
        if distance(r.numa_node, d.numa_node) == 3:
            who = f"GPU{r.gpu}" if r.gpu is not None else f"rank {r.local_rank}"
            findings.append(Finding("warning", f"{who}: SSD tier on {d.name} (NUMA "
                                    f"{d.numa_node}), a remote-socket disk (rank on NUMA "
                                    f"{r.numa_node})"))


def make_plan(machine: Machine, nproc: Optional[int] = None,
              ssd_subdir: str = DEFAULT_SSD_SUBDIR) -> Plan:
    """Plans ``nproc`` local ranks on ``machine``.

    Args:
        machine: what discovery saw.
        nproc: ranks on this node (default: one per GPU, else 1).
        ssd_subdir: directory made on the chosen disk's mount for the SSD tier.

    Returns:
        The :class:`Plan`.

    Raises:
        TopologyError: ``nproc < 1``. (More ranks than GPUs share them, with a warning.)
    """
    m = machine
    n_gpu = len(m.gpus)
    nproc = nproc if nproc is not None else (n_gpu or 1)
    if nproc < 1:
        raise TopologyError(f"nproc: must be >= 1, got {nproc}")
    findings = [Finding("note", w) for w in m.warnings]
    if n_gpu and nproc > n_gpu:
        findings.append(Finding("warning", f"{nproc} ranks on {n_gpu} GPU(s): local rank i "
                                f"shares GPU i % {n_gpu}"))
    nodes = sorted(m.numa, key=lambda x: x.id)
    if n_gpu:
        placed = [(i, i % n_gpu, _gpu_node(m, i % n_gpu)) for i in range(nproc)]
    else:
        placed = [(i, None, nodes[i * len(nodes) // nproc].id if nodes else None)
                  for i in range(nproc)]
    all_cpus = sorted({c for n in nodes for c in n.cpus})
    by_base: dict[tuple[Optional[int], tuple[int, ...]], list[int]] = {}
    for i, g, node in placed:
        base = m.node(node).cpus if node is not None else all_cpus
        if g is not None and m.gpus[g].cpus and set(m.gpus[g].cpus) & set(base):
            base = sorted(set(base) & set(m.gpus[g].cpus))  # a cgroup narrower than the node
        by_base.setdefault((node, tuple(base)), []).append(i)
        if g is not None and node is None:
            findings.append(Finding("warning", f"GPU{g}: NUMA node unknown: its rank gets "
                                    "no memory binding"))
    ranks: dict[int, RankPlan] = {}
    for (node, base), members in by_base.items():
        cores = core_groups(list(base), m.threads_per_core)
        if len(cores) < len(members):
            findings.append(Finding("warning", f"NUMA {node}: {len(members)} ranks share "
                                    f"{len(cores)} cores"))
        for i, share in zip(members, split_cores(cores, len(members))):
            cpus = sorted(c for core in share for c in core)
            ranks[i] = RankPlan(local_rank=i, gpu=placed[i][1], numa_node=node, cpus=cpus,
                                omp_threads=max(1, len(share)))
    plan_ranks = [ranks[i] for i in range(nproc)]
    _pick_nics(m, plan_ranks, findings)
    _pick_disks(m, plan_ranks, ssd_subdir, findings)
    groups = _fast_groups(m, plan_ranks)
    for g in groups:
        gpus = [plan_ranks[i].gpu for i in g]
        if len(g) > 1 and gpus[0] is not None:
            direct = all(nvlinks(m.gpu_links[a][b]) for a in gpus for b in gpus if a != b)  # type: ignore[index]
            if not direct and any(nvlinks(m.gpu_links[a][b]) for a in gpus for b in gpus if a != b):  # type: ignore[index]
                findings.append(Finding("note", f"fast group {g}: NVLink joins the GPUs but "
                                        "not every pair directly (a mesh, not a switch)"))
    fast_env = ";".join(",".join(map(str, g)) for g in groups)
    for r in plan_ranks:
        env = {"OMP_NUM_THREADS": str(r.omp_threads), "TERAREC_FAST_GROUPS": fast_env}
        if r.gpu is not None:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            nic = next((n for n in m.nics if n.name == r.nic), None)
            if nic is not None and nic.rdma:
                env["NCCL_IB_HCA"] = f"={nic.name}"
            elif nic is not None and nic.netdev:
                env["NCCL_SOCKET_IFNAME"] = f"={nic.netdev}"
        if r.ssd_dir:
            env[SSD_DIR_VAR] = r.ssd_dir
        r.env = env
    return Plan(hostname=m.hostname, ranks=plan_ranks, fast_groups=groups, findings=findings)


# ------------------------------------------------------------------------------- JSON


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)


# the smallest value of each int field of a rank's plan (lists: of every element)
_RANK_MINIMUM = {"local_rank": 0, "gpu": 0, "numa_node": 0, "cpus": 0, "omp_threads": 1,
                 "relay_gpu": 0}
_LEVELS = ("note", "warning")


def plan_from_dict(raw: Any, where: str = "plan") -> Plan:
    """A :class:`Plan` from parsed JSON (what :func:`plan_to_dict` wrote).

    Raises:
        TopologyError: a missing, unknown, mistyped or out-of-range field (a negative
            core id, a float rank, fast groups that do not partition the ranks), named
            with its path.
    """
    if not isinstance(raw, dict):
        raise TopologyError(f"{where}: expected an object, got {json.dumps(raw)[:60]}")
    top = dict(raw)
    if "ranks" not in top:
        raise TopologyError(f"{where}.ranks: missing")
    parts = pop_lists(top, {"ranks": RankPlan, "findings": Finding}, where)
    known = {f.name for f in fields(Plan)} - set(parts)
    unknown = sorted(set(top) - known)
    if unknown:
        raise TopologyError(f"{where}: unknown key(s) {unknown} (known: {sorted(known)})")
    for f in fields(Plan):
        if f.name in known:
            if f.name not in top:
                raise TopologyError(f"{where}.{f.name}: missing")
            check_type(f"{where}.{f.name}", top[f.name], f.type)
    plan = Plan(**top, **parts)
    for i, r in enumerate(plan.ranks):
        for name, lo in _RANK_MINIMUM.items():
            value = getattr(r, name)
            values = enumerate(value) if isinstance(value, list) else [(None, value)]
            for j, v in values:
                if v is not None and v < lo:
                    at = f"{where}.ranks[{i}].{name}" + (f"[{j}]" if j is not None else "")
                    raise TopologyError(f"{at}: must be >= {lo}, got {v}")
    for i, finding in enumerate(plan.findings):
        if finding.level not in _LEVELS:
            raise TopologyError(f"{where}.findings[{i}].level: {finding.level!r}, expected "
                                f"one of {list(_LEVELS)}")
    n = len(plan.ranks)
    if [r.local_rank for r in plan.ranks] != list(range(n)):
        raise TopologyError(f"{where}.ranks: local ranks are not 0..{n - 1}")
    if sorted(i for g in plan.fast_groups for i in g) != list(range(n)):
        raise TopologyError(f"{where}.fast_groups: {plan.fast_groups} is not a partition of "
                            f"the local ranks 0..{n - 1}")
    return plan


def describe_rank(r: RankPlan) -> str:
    """``rank 0: GPU0 NUMA 0 cpus 0-13,112-125 (14 cores) mlx5_0 (PXB) /raid/terarec-ssd``."""
    gpu = f"GPU{r.gpu} " if r.gpu is not None else ""
    nic = ""
    if r.nic:
        via = f" via GPU{r.relay_gpu}" if r.relay_gpu is not None else ""
        nic = f" {r.nic} ({r.nic_link}{via})" if r.nic_link else f" {r.nic}"
    return (f"rank {r.local_rank}: {gpu}NUMA {r.numa_node if r.numa_node is not None else '?'}"
            f" cpus {format_cpulist(r.cpus)} ({r.omp_threads} cores){nic}"
            f" {r.ssd_dir or '-'}")

"""The routing plan: for each local rank its GPU, CPU cores, memory node, NIC, SSD
directory, environment, and the node's fast groups. Pure: a :class:`Machine` in, a
:class:`Plan` out.

Rules (docs/topology.md has the why):

* **GPU**: one rank per GPU: local rank ``i`` drives GPU ``i`` (nvidia-smi's index; the
  plan sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers them the same way).
  Fewer ranks: :func:`terarec.topology.select.choose_gpus` picks the GPUs (multi-node:
  next to distinct NICs; single-node: one fast group; ties over sockets) and each
  rank's ``CUDA_VISIBLE_DEVICES`` names its GPU. More ranks: an error under NCCL; under
  gloo rank ``i`` shares GPU ``i % n`` (a warning). A CPU box spreads its ranks over the
  NUMA nodes in order.
* **CPU cores / memory node**: the GPU's NUMA node (``NUMA Affinity``; else the node its
  ``CPU Affinity`` overlaps most; else, as parsed, the node of a device near it). The
  node's physical cores are split into contiguous, disjoint shares among the ranks on
  it, hyperthread siblings kept together (``cores.py``); ``OMP_NUM_THREADS`` is the
  share's core count. The host tier's memory goes on the node. A GPU of unknown node is
  left unpinned, with a warning.
* **NIC**: the nearest RDMA NIC by PCIe link (PIX < PXB < PHB < NODE < SYS), ties to the
  least used card, then port. A GPU whose nearest is NODE or SYS while an NVLink peer
  that runs a rank has a nearer one *relays* through that peer: it uses the peer's NIC
  and reaches it over NVLink (NCCL's PXN does the copy; terarec's own cross-node merge
  routes through ``relay_gpu``). ``NCCL_IB_HCA`` is ``=mlx5_N`` (exact: a bare ``mlx5_1``
  would also match ``mlx5_10``); a GPU with only Ethernet gets
  ``NCCL_SOCKET_IFNAME=<netdev>``; a NIC of unknown name or kind gets neither (a
  warning). A ``SYS`` link is judged by the NUMA and socket facts, not the word alone.
* **SSD directory**: on the nearest mounted NVMe data volume (same node, then a RAID
  spanning nodes, then the same socket, then anywhere), ties to the least used, then the
  largest; the OS disk (mounted on ``/``) only when there is no other, and a non-NVMe
  disk only when there is no NVMe (a warning).
* **Fast groups**: NVLink islands (connected components of the NV# links among the
  ranks' GPUs; the whole node under NVSwitch). Without NVLink: the GPUs of one NUMA node
  (PCIe links up to NODE). A CPU box: the whole node.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from terarec.topology.cores import core_groups, smt_note, split_cores
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
from terarec.topology.select import choose_gpus, gpu_groups

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
        cuda_visible_devices: for launchers that give every rank one environment
            (torchrun, mpirun, srun): ``CUDA_VISIBLE_DEVICES`` for the whole job (local
            rank i takes the i-th GPU listed); None when the ranks use every GPU in order
            (or share GPUs: then only a per-rank value works, see each rank's ``env``).
    """

    hostname: str
    ranks: list[RankPlan]
    fast_groups: list[list[int]]
    findings: list[Finding] = field(default_factory=list)
    cuda_visible_devices: Optional[str] = None

    @property
    def warnings(self) -> list[str]:
        return [f.text for f in self.findings if f.level == "warning"]


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
    """The ranks' fast groups: the :func:`gpu_groups` of their GPUs (ranks sharing a GPU
    together), as local ranks; a CPU box: one group."""
    gpu_ranks = [r for r in ranks if r.gpu is not None]
    if not gpu_ranks:
        return [[r.local_rank for r in ranks]]
    gpus = sorted({r.gpu for r in gpu_ranks if r.gpu is not None})
    group_of = {g: i for i, comp in enumerate(gpu_groups(m, gpus)) for g in comp}
    groups: dict[int, list[int]] = {}
    for r in gpu_ranks:
        groups.setdefault(group_of[r.gpu], []).append(r.local_rank)  # type: ignore[index]
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def _lonely_note(m: Machine, ranks: list[RankPlan], groups: list[list[int]]) -> list[Finding]:
    """Why every GPU is its own fast group, when several GPUs are planned and none joins
    another."""
    gpus = sorted({r.gpu for r in ranks if r.gpu is not None})
    if len(gpus) < 2 or any(len({ranks[i].gpu for i in g}) > 1 for g in groups):
        return []
    rels = sorted({m.gpu_links[a][b] for a in gpus for b in gpus if a != b}, key=relation_rank)
    return [Finding("note", f"fast groups: each GPU alone: no NVLink, and the GPUs "
                    f"{', '.join(f'GPU{g}' for g in gpus)} are joined only by "
                    f"{'/'.join(rels)} (PCIe across NUMA nodes), so dense gradients are "
                    "all-reduced within no group; every GPU syncs through the k-step merge")]


def _pick_nics(m: Machine, ranks: list[RankPlan], findings: list[Finding]) -> None:
    """Sets ``nic`` / ``nic_link`` / ``relay_gpu`` of every rank."""
    if not m.nics:
        return
    cand = [k for k, n in enumerate(m.nics) if n.rdma is not False] or list(range(len(m.nics)))
    load: Counter[int] = Counter()
    cards = m.nic_cards()
    card_load: Counter[int] = Counter()
    gpu_ranks = {r.gpu: r for r in ranks if r.gpu is not None}
    chosen: dict[int, int] = {}  # rank -> NIC index

    def best_for(links: list[str]) -> int:
        k = min(cand, key=lambda k: (relation_rank(links[k]), card_load[cards[k]], load[k], k))
        load[k] += 1
        card_load[cards[k]] += 1
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
                    peers.append((relation_rank(hrel), card_load[cards[hk]], relays[h], -nvlinks(
                        m.gpu_links[r.gpu][h]), h, hk, hrel))
        if peers:
            _, _, _, _, h, hk, hrel = min(peers)
            relays[h] += 1
            load[k] -= 1
            load[hk] += 1
            card_load[cards[k]] -= 1
            card_load[cards[hk]] += 1
            r.nic, r.nic_link, r.relay_gpu = m.nics[hk].name, hrel, h
            findings.append(Finding("note", f"GPU{r.gpu}: nearest NIC {m.nics[k].name} is "
                                    f"{own}; relays through GPU{h} ({m.gpu_links[r.gpu][h]}) "
                                    f"to {m.nics[hk].name} ({hrel})"))
        else:
            r.nic, r.nic_link = m.nics[k].name, own
            if own == "SYS":
                findings.append(_far_nic(m, r.gpu, k))
    shared = Counter(r.nic for r in ranks if r.nic is not None)
    for nic, n in sorted(shared.items()):
        if n > 1 and len(ranks) > 1 and any(r.gpu is not None for r in ranks):
            who = ", ".join(f"GPU{r.gpu}" for r in ranks if r.nic == nic)
            findings.append(Finding("note", f"{nic} carries the traffic of {n} ranks ({who})"))


def _far_nic(m: Machine, gpu: int, k: int) -> Finding:
    """What a ``SYS`` link from a GPU to its NIC means, from the NUMA and socket facts
    (the word alone only says "between NUMA nodes", where nodes are known at all)."""
    nic = m.nics[k]
    g, n = m.gpus[gpu].numa_node, nic.numa_node
    head = f"GPU{gpu}: nearest NIC {nic.name}"
    tail = "and no NVLink peer has a nearer one"
    where = f"GPU on NUMA {g}, NIC on NUMA {n}"
    kind = m.crossing(g, n)
    if g is not None and g == n:
        return Finding("note", f"{head} is SYS per nvidia-smi, but both are on NUMA node {g}: "
                       "not across sockets")
    if kind == "socket":
        return Finding("warning", f"{head} is across sockets (SYS; {where}) {tail}")
    if kind == "node":
        return Finding("note", f"{head} is on another NUMA node of the same socket (SYS; "
                       f"{where})")
    if kind == "numa":
        return Finding("warning", f"{head} is on another NUMA node (SYS; {where}; sockets "
                       f"unknown) {tail}")
    return Finding("warning", f"{head} is SYS (between NUMA nodes, per nvidia-smi; "
                   f"{'GPU' if g is None else 'NIC'} NUMA node unknown) {tail}")


def _pick_disks(m: Machine, ranks: list[RankPlan], subdir: str,
                findings: list[Finding]) -> None:
    usable = [d for d in m.disks if d.mount]
    if not m.disks_known and not usable:
        findings.append(Finding("note", "disks not in the input (it holds no disk facts): "
                                "no SSD directory planned; the SSD tier goes where ssd.path "
                                "says"))
        return
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
        return 2 if m.crossing(node, disk_node) == "node" else 3

    for r in ranks:
        d = min(pool, key=lambda d: (distance(r.numa_node, d.numa_node), load[d.name],
                                     -(d.size_gb or 0), d.name))
        load[d.name] += 1
        r.disk, r.ssd_dir = d.name, _ssd_dir(d.mount or "/", subdir)
        if distance(r.numa_node, d.numa_node) == 3:
            who = f"GPU{r.gpu}" if r.gpu is not None else f"rank {r.local_rank}"
            far = ("a remote-socket disk" if m.crossing(r.numa_node, d.numa_node) == "socket"
                   else "a disk on another NUMA node (sockets unknown)")
            findings.append(Finding("warning", f"{who}: SSD tier on {d.name} (NUMA "
                                    f"{d.numa_node}), {far} (rank on NUMA {r.numa_node})"))


BACKENDS = ("nccl", "gloo")


def _gpus_for_ranks(m: Machine, nproc: int, backend: str, nnodes: int,
                    findings: list[Finding]) -> list[Optional[int]]:
    """Local rank -> GPU (None on a CPU box).

    Raises:
        TopologyError: more ranks than GPUs under NCCL.
    """
    n = len(m.gpus)
    if not n:
        return [None] * nproc
    if nproc > n:
        if backend == "nccl":
            raise TopologyError(f"nproc: {nproc} ranks on {n} GPU(s): NCCL cannot put two "
                                "ranks of one communicator on one GPU (plan at most "
                                f"{n}, or use the gloo backend to share GPUs)")
        findings.append(Finding("warning", f"{nproc} ranks on {n} GPU(s) (gloo): local rank i "
                                f"shares GPU i % {n}"))
        return [i % n for i in range(nproc)]
    chosen = choose_gpus(m, nproc, multi_node=nnodes > 1)
    if nproc < n:
        why = ("multi-node: GPUs next to distinct NICs first" if nnodes > 1 else
               "single-node: inside one fast group first")
        findings.append(Finding("note", f"{nproc} of {n} GPUs: "
                                f"{', '.join(f'GPU{g}' for g in chosen)} ({why}, ties spread "
                                "over sockets); without terarec-launch set "
                                f"CUDA_VISIBLE_DEVICES={','.join(map(str, chosen))} for the "
                                "job (local rank i takes the i-th)"))
    return list(chosen)


def _cpu_shares(m: Machine, placed: list[tuple[int, Optional[int], Optional[int]]],
                findings: list[Finding]) -> dict[int, RankPlan]:
    """Each rank's CPU cores: a contiguous share of its node's physical cores. A GPU rank
    whose node is unknown is left unpinned (never handed every CPU)."""
    nodes = sorted(m.numa, key=lambda x: x.id)
    all_cpus = sorted({c for n in nodes for c in n.cpus})
    physical = sum(len(core_groups(n.cpus, m.threads_per_core)) for n in nodes)
    by_base: dict[tuple[Optional[int], tuple[int, ...]], list[int]] = {}
    ranks: dict[int, RankPlan] = {}
    for i, g, node in placed:
        if g is not None and node is None and len(nodes) > 1:
            omp = max(1, physical // len(placed))
            findings.append(Finding("warning", f"GPU{g}: NUMA node unknown (no CPU or NUMA "
                                    "affinity, and no device of known node near it): its rank "
                                    f"is not pinned and gets no memory binding; "
                                    f"OMP_NUM_THREADS={omp} (the {physical} physical cores / "
                                    f"{len(placed)} ranks)"))
            ranks[i] = RankPlan(local_rank=i, gpu=g, numa_node=None, cpus=[], omp_threads=omp)
            continue
        base = m.node(node).cpus if node is not None else all_cpus
        if g is not None and m.gpus[g].cpus and set(m.gpus[g].cpus) & set(base):
            base = sorted(set(base) & set(m.gpus[g].cpus))  # a cgroup narrower than the node
        by_base.setdefault((node, tuple(base)), []).append(i)
        if g is not None and node is None:
            findings.append(Finding("warning", f"GPU{g}: NUMA node unknown: its rank gets "
                                    "no memory binding"))
    note = smt_note({node: list(base) for node, base in by_base}, m.threads_per_core)
    if note:
        findings.append(Finding("note", note))
    for (node, base), members in by_base.items():
        cores = core_groups(list(base), m.threads_per_core)
        if len(cores) < len(members):
            findings.append(Finding("warning", f"NUMA {node}: {len(members)} ranks share "
                                    f"{len(cores)} cores"))
        for i, share in zip(members, split_cores(cores, len(members))):
            cpus = sorted(c for core in share for c in core)
            ranks[i] = RankPlan(local_rank=i, gpu=placed[i][1], numa_node=node, cpus=cpus,
                                omp_threads=max(1, len(share)))
    return ranks


def _env(m: Machine, ranks: list[RankPlan], fast_env: str, visible: bool,
         findings: list[Finding]) -> None:
    """Sets each rank's ``env``; a NIC whose device name or kind is unknown is not pinned
    (a warning per NIC)."""
    unpinned: dict[str, list[str]] = {}
    for r in ranks:
        env = {"OMP_NUM_THREADS": str(r.omp_threads), "TERAREC_FAST_GROUPS": fast_env}
        if r.gpu is not None:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            if visible:
                env["CUDA_VISIBLE_DEVICES"] = str(r.gpu)
            nic = next((n for n in m.nics if n.name == r.nic), None)
            if nic is not None and (not nic.named or nic.rdma is None):
                unpinned.setdefault(nic.name, []).append(f"GPU{r.gpu}")
            elif nic is not None and nic.rdma:
                env["NCCL_IB_HCA"] = f"={nic.name}"
            elif nic is not None and nic.netdev:
                env["NCCL_SOCKET_IFNAME"] = f"={nic.netdev}"
        if r.ssd_dir:
            env[SSD_DIR_VAR] = r.ssd_dir
        r.env = env
    for name, who in unpinned.items():
        nic = next(n for n in m.nics if n.name == name)
        what = ("device name unknown (the input's NIC legend does not name it, or gives "
                "its name to two NICs)"
                if not nic.named else "kind unknown (RDMA or Ethernet)")
        findings.append(Finding("warning", f"{name}: {what}: no NCCL NIC variable set for "
                                f"{', '.join(who)} (NCCL chooses its NICs)"))


def make_plan(machine: Machine, nproc: Optional[int] = None,
              ssd_subdir: str = DEFAULT_SSD_SUBDIR, *, backend: str = "nccl",
              nnodes: int = 1) -> Plan:
    """Plans ``nproc`` local ranks on ``machine``.

    Args:
        machine: what discovery saw.
        nproc: ranks on this node (default: one per GPU, else 1).
        ssd_subdir: directory made on the chosen disk's mount for the SSD tier.
        backend: ``nccl`` (one rank per GPU at most) or ``gloo`` (more ranks than GPUs
            share them, with a warning).
        nnodes: nodes in the job; with fewer ranks than GPUs a multi-node job takes GPUs
            next to distinct NICs first, a single-node job one NVLink island first.

    Returns:
        The :class:`Plan`.

    Raises:
        TopologyError: ``nproc < 1``, ``nnodes < 1``, an unknown backend, or more ranks
            than GPUs under NCCL.
    """
    m = machine
    n_gpu = len(m.gpus)
    nproc = nproc if nproc is not None else (n_gpu or 1)
    if nproc < 1:
        raise TopologyError(f"nproc: must be >= 1, got {nproc}")
    if nnodes < 1:
        raise TopologyError(f"nnodes: must be >= 1, got {nnodes}")
    if backend not in BACKENDS:
        raise TopologyError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    findings = [Finding("note", w) for w in m.warnings]
    findings += [Finding("warning", w) for w in m.inconsistencies]
    gpus = _gpus_for_ranks(m, nproc, backend, nnodes, findings)
    nodes = sorted(m.numa, key=lambda x: x.id)
    if n_gpu:
        placed = [(i, g, _gpu_node(m, g)) for i, g in enumerate(gpus)]  # type: ignore[arg-type]
    else:
        placed = [(i, None, nodes[i * len(nodes) // nproc].id if nodes else None)
                  for i in range(nproc)]
    ranks = _cpu_shares(m, placed, findings)
    plan_ranks = [ranks[i] for i in range(nproc)]
    _pick_nics(m, plan_ranks, findings)
    _pick_disks(m, plan_ranks, ssd_subdir, findings)
    groups = _fast_groups(m, plan_ranks)
    findings += _lonely_note(m, plan_ranks, groups)
    for g in groups:
        gg = [plan_ranks[i].gpu for i in g]
        if len(g) > 1 and gg[0] is not None:
            direct = all(nvlinks(m.gpu_links[a][b]) for a in gg for b in gg if a != b)  # type: ignore[index]
            if not direct and any(nvlinks(m.gpu_links[a][b]) for a in gg for b in gg if a != b):  # type: ignore[index]
                findings.append(Finding("note", f"fast group {g}: NVLink joins the GPUs but "
                                        "not every pair directly (a mesh, not a switch)"))
    fast_env = ";".join(",".join(map(str, g)) for g in groups)
    in_order = gpus == list(range(n_gpu))
    _env(m, plan_ranks, fast_env, visible=bool(n_gpu) and not in_order, findings=findings)
    job_visible = None
    if n_gpu and not in_order and nproc <= n_gpu:
        job_visible = ",".join(str(g) for g in gpus)
    return Plan(hostname=m.hostname, ranks=plan_ranks, fast_groups=groups, findings=findings,
                cuda_visible_devices=job_visible)


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
    cpus = f"cpus {format_cpulist(r.cpus)}" if r.cpus else "unpinned"
    return (f"rank {r.local_rank}: {gpu}NUMA {r.numa_node if r.numa_node is not None else '?'}"
            f" {cpus} ({r.omp_threads} cores){nic}"
            f" {r.ssd_dir or '-'}")

"""A link-bandwidth cost model of one training step's transfers, naive vs planned.

Every rank of a node moves, per step, host-tier rows to and from its GPU, SSD-tier rows
between disk and host memory, and cross-node bytes through a NIC (:class:`StepLoad`).
Each transfer is a flow over a path of links (the GPU's PCIe link, the inter-socket
link, a NUMA node's DRAM, a disk, a NIC, an NVLink to a relay GPU). All ranks run at
once, so a link's time is the bytes of every flow through it over its bandwidth, and a
phase takes as long as its busiest link. The step estimate adds the three phases (host,
SSD, network), i.e. no overlap: it compares placements, it does not predict step times.

* **naive**: rank i drives GPU i (``i % n`` when ranks share GPUs), keeps its host tier
  on the first NUMA node, sends through the first RDMA NIC (no relays) and keeps its SSD
  tier on the first mounted disk;
* **planned**: what :func:`terarec.topology.plan.make_plan` chose.

The bandwidths (:data:`BANDWIDTH`) are round effective figures per direction, each with
where it comes from; docs/topology.md lists them. What the machine does not say (a PCIe
generation, a NIC's rate or kind, which ports share a card, the sockets) is assumed and
listed in :attr:`CostEstimate.assumptions`; a NUMA node is never counted as a socket.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from terarec.topology.model import Machine, nvlinks
from terarec.topology.plan import Plan

GB = 1e9

# name -> (GB/s per direction, source)
BANDWIDTH: dict[str, tuple[float, str]] = {
    "pcie3": (12.0, "PCIe 3.0 x16: 15.75 GB/s raw, ~12 GB/s measured pinned copies"),
    "pcie4": (25.0, "PCIe 4.0 x16: 31.5 GB/s raw, ~25 GB/s measured pinned copies"),
    "pcie5": (54.5, "PCIe 5.0 x16: 63 GB/s raw; 54.5 GB/s pinned H2D measured on an "
              "H200 (measured on a 2x H200 VM)"),
    "nvlink": (25.0, "one NVLink 2/3/4 link: 25 GB/s per direction (V100 6, A100 12, "
               "H100 18 links); H200 pair measured 378 GB/s over NV18 (measured on a 2x H200 VM)"),
    "nvlink5": (50.0, "one NVLink 5 link (B200/B300): 50 GB/s per direction"),
    "socket": (40.0, "inter-socket link (UPI / xGMI), one direction: 62-83 GB/s raw; "
               "taken as 40 GB/s effective for DMA streams (assumption)"),
    "dram_socket": (200.0, "one socket's DRAM: 8 channels DDR4-3200 = 205 GB/s "
                    "(DDR5 more); a NUMA node gets its share of the socket"),
    "nic_rdma": (25.0, "an RDMA NIC of unknown rate: 200 Gb/s (HDR / 200GbE) = 25 GB/s"),
    "nic_eth": (1.25, "an Ethernet NIC of unknown rate: 10 Gb/s"),
    "nvme": (3.0, "one NVMe SSD, 4-8 KiB random reads at depth: ~0.7-1 M IOPS = ~3 GB/s"),
    "disk": (0.5, "a non-NVMe disk (SATA SSD / virtio): ~0.5 GB/s"),
}


@dataclass
class StepLoad:
    """Megabytes one rank moves per step (defaults: a DLRM-like step with a
    1.5 KB row (dim 128 fp32 + Adam's two moments), 100k rows promoted from and
    evicted to the host tier, 10k rows read from and written to the SSD tier, 64 MB
    cross-node (dense all-reduce and row deltas of a k-step merge, amortised))."""

    host_to_gpu_mb: float = 150.0
    gpu_to_host_mb: float = 150.0
    ssd_read_mb: float = 15.0
    ssd_write_mb: float = 15.0
    net_mb: float = 64.0


@dataclass
class Placement:
    """One rank's routing as the cost model sees it."""

    gpu: Optional[int]
    mem_node: Optional[int]
    nic: Optional[int]
    relay_gpu: Optional[int]
    disk: Optional[str]


@dataclass
class PhaseCost:
    """One phase under one placement: seconds and the link that bounds it."""

    seconds: float
    bottleneck: str


@dataclass
class CostEstimate:
    """Per phase (``host``, ``ssd``, ``net``) and ``step`` (their sum): naive and
    planned seconds, their bottlenecks, and ``speedup`` = naive / planned;
    ``assumptions``: every fact the machine did not give that the estimate assumed."""

    naive: dict[str, PhaseCost]
    planned: dict[str, PhaseCost]
    assumptions: list[str] = field(default_factory=list)

    def speedup(self, phase: str) -> float:
        p = self.planned[phase].seconds
        return self.naive[phase].seconds / p if p > 0 else 1.0


def _pcie_gen(name: str, gen: Optional[int]) -> tuple[int, str]:
    """(generation, how it was decided: "" when known)."""
    if gen:
        return max(3, min(5, gen)), ""
    n = name.upper()
    if any(k in n for k in ("H100", "H200", "H800", "H20", "B100", "B200", "B300", "GH200",
                            "RTX PRO", "5090")):
        return 5, f"guessed from the name {name!r}"
    if any(k in n for k in ("V100", "P100", "T4", "P40")):
        return 3, f"guessed from the name {name!r}"
    return 4, "the default for an unknown GPU"


def _span(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


class _Links:
    """Bandwidths of one machine's links, and the assumptions behind them."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        per_socket: dict[Optional[int], int] = defaultdict(int)
        for node in m.numa:
            per_socket[m.socket_of(node.id)] += 1
        self.per_socket = per_socket
        self.cards = m.nic_cards()

    def card_of(self, nic: int) -> Optional[str]:
        """``card:<first port>`` when the NIC shares its card with another port."""
        c = self.cards[nic]
        return f"card:{self.m.nics[c].name}" if self.cards.count(c) > 1 else None

    def nic_bw(self, k: int) -> float:
        nic = self.m.nics[k]
        if nic.rate_gbps:
            return nic.rate_gbps / 8 * GB
        return BANDWIDTH["nic_eth" if nic.rdma is False else "nic_rdma"][0] * GB

    def bw(self, link: str) -> float:
        kind, _, rest = link.partition(":")
        m = self.m
        if kind == "pcie":
            g = m.gpus[int(rest.split(":")[0][3:])]
            return BANDWIDTH[f"pcie{_pcie_gen(g.name, g.pcie_gen)[0]}"][0] * GB
        if kind == "nvlink":
            a, b = (int(x) for x in rest.split(">"))
            n5 = any(k in m.gpus[a].name.upper() for k in ("B200", "B300", "B100"))
            per = BANDWIDTH["nvlink5" if n5 else "nvlink"][0]
            return per * nvlinks(m.gpu_links[a][b]) * GB
        if kind in ("socket", "numa"):
            return BANDWIDTH["socket"][0] * GB
        if kind == "mem":
            node = int(rest)
            share = self.per_socket.get(m.socket_of(node), 1) or 1
            return BANDWIDTH["dram_socket"][0] / share * GB
        if kind == "nic":
            return self.nic_bw(next(k for k, n in enumerate(m.nics) if n.name == rest))
        if kind == "card":
            first = next(k for k, n in enumerate(m.nics) if n.name == rest)
            return max(self.nic_bw(k) for k, c in enumerate(self.cards) if c == first)
        if kind == "disk":
            d = next(x for x in m.disks if x.name == rest)
            per = BANDWIDTH["nvme" if d.nvme else "disk"][0]
            return per * max(1, len(d.members)) * GB
        raise KeyError(link)

    def assumptions(self, places: list[Placement]) -> list[str]:
        """What the estimate assumed for the GPUs, NICs and nodes ``places`` use."""
        m, out = self.m, []
        gens: dict[str, list[str]] = defaultdict(list)
        for g in sorted({p.gpu for p in places if p.gpu is not None}):
            gen, how = _pcie_gen(m.gpus[g].name, m.gpus[g].pcie_gen)
            if how:
                gens[f"taken as gen{gen} ({BANDWIDTH[f'pcie{gen}'][0]:g} GB/s), {how}"].append(
                    f"GPU{g}")
        out += [f"{_span(who)}: PCIe generation unknown; {what}" for what, who in gens.items()]
        used = sorted({p.nic for p in places if p.nic is not None})
        for what, test in (("kind unknown; taken as RDMA", lambda n: n.rdma is None),
                           ("link rate unknown; taken as "
                            f"{BANDWIDTH['nic_rdma'][0] * 8:g} Gb/s",
                            lambda n: not n.rate_gbps and n.rdma is not False),
                           (f"link rate unknown; taken as {BANDWIDTH['nic_eth'][0] * 8:g} Gb/s",
                            lambda n: not n.rate_gbps and n.rdma is False)):
            who = [m.nics[k].name for k in used if test(m.nics[k])]
            if who:
                out.append(f"{_span(who)}: {what}")
        for c in sorted({self.cards[k] for k in used}):
            ports = [m.nics[k].name for k, x in enumerate(self.cards) if x == c]
            if len(ports) > 1:
                out.append(f"{_span(ports)}: PIX to each other, taken as ports of one card "
                           "sharing one port's bandwidth")
        if m.nics and not m.nic_nic_links and len(m.nics) > 1:
            out.append("NIC-to-NIC links unknown: each NIC taken as its own card")
        unknown = [n.id for n in m.numa if n.socket is None]
        if len(m.numa) > 1 and unknown:
            share = BANDWIDTH["dram_socket"][0] / len(unknown)
            out.append(f"sockets of NUMA nodes {unknown} unknown: they are taken to share one "
                       f"socket's DRAM ({share:g} GB/s each), and traffic between them to cross "
                       f"an inter-socket-class link ({BANDWIDTH['socket'][0]:g} GB/s)")
        elif len({n.socket for n in m.numa}) < len(m.numa):
            out.append("traffic between NUMA nodes of one socket is not charged (on-die fabric)")
        if not m.disks_known:
            out.append("disks not in the input: the SSD phase is not estimated")
        return out


def _cross(m: Machine, a: Optional[int], b: Optional[int]) -> list[str]:
    """The link between two NUMA nodes: the socket link when their sockets are known to
    differ, an inter-node link when the sockets are unknown, none when one socket / node
    or a node is unknown."""
    kind = m.crossing(a, b)
    if kind == "socket":
        return [f"socket:{m.socket_of(a)}>{m.socket_of(b)}"]
    return [f"numa:{a}>{b}"] if kind == "numa" else []


def _flows(m: Machine, p: Placement, load: StepLoad,
           card: Optional[str] = None) -> dict[str, list[tuple[list[str], float]]]:
    """phase -> [(links, bytes)] for one rank (``card``: the NIC's shared card link)."""
    out: dict[str, list[tuple[list[str], float]]] = {"host": [], "ssd": [], "net": []}
    mem = [f"mem:{p.mem_node}"] if p.mem_node is not None else []
    if p.gpu is not None:
        gnode = m.gpus[p.gpu].numa_node
        out["host"].append((mem + _cross(m, p.mem_node, gnode) + [f"pcie:gpu{p.gpu}:h2d"],
                            load.host_to_gpu_mb * 1e6))
        out["host"].append(([f"pcie:gpu{p.gpu}:d2h"] + _cross(m, gnode, p.mem_node) + mem,
                            load.gpu_to_host_mb * 1e6))
    if p.disk is not None:
        d = next(x for x in m.disks if x.name == p.disk)
        out["ssd"].append(([f"disk:{d.name}"] + _cross(m, d.numa_node, p.mem_node) + mem,
                           load.ssd_read_mb * 1e6))
        out["ssd"].append((mem + _cross(m, p.mem_node, d.numa_node) + [f"disk:{d.name}"],
                           load.ssd_write_mb * 1e6))
    if p.nic is not None:
        nic = m.nics[p.nic]
        if p.gpu is None:
            path = mem + _cross(m, p.mem_node, nic.numa_node)
        elif p.relay_gpu is not None:
            path = [f"nvlink:{p.gpu}>{p.relay_gpu}", f"pcie:gpu{p.relay_gpu}:d2h"]
        else:
            path = [f"pcie:gpu{p.gpu}:d2h"]
            if m.nic_links(p.gpu)[p.nic] == "SYS":
                path += _cross(m, m.gpus[p.gpu].numa_node, nic.numa_node)
        out["net"].append((path + [f"nic:{nic.name}"] + ([card] if card else []),
                           load.net_mb * 1e6))
    return out


def _phase_costs(m: Machine, places: list[Placement], load: StepLoad) -> dict[str, PhaseCost]:
    links = _Links(m)
    out = {}
    per_rank = [_flows(m, p, load, links.card_of(p.nic) if p.nic is not None else None)
                for p in places]
    for phase in ("host", "ssd", "net"):
        total: dict[str, float] = defaultdict(float)
        for flows in per_rank:
            for path, nbytes in flows[phase]:
                for link in path:
                    total[link] += nbytes
        times = {link: b / links.bw(link) for link, b in total.items()}
        worst = max(times, key=lambda k: times[k], default="-")
        out[phase] = PhaseCost(times.get(worst, 0.0), worst)
    step = sum(c.seconds for c in out.values())
    out["step"] = PhaseCost(step, max(out.values(), key=lambda c: c.seconds).bottleneck)
    return out


def naive_placements(m: Machine, nproc: int) -> list[Placement]:
    """Rank i -> GPU i (``i % GPUs`` when ranks share GPUs), NUMA node 0, the first RDMA
    NIC, the first mounted disk."""
    first_node = min((n.id for n in m.numa), default=None)
    rdma = [k for k, n in enumerate(m.nics) if n.rdma is not False]
    nic = rdma[0] if rdma else (0 if m.nics else None)
    disk = next((d.name for d in m.disks if d.mount), None)
    n = len(m.gpus)
    return [Placement(i % n if n else None, first_node, nic, None, disk) for i in range(nproc)]


def planned_placements(m: Machine, plan: Plan) -> list[Placement]:
    names = {n.name: k for k, n in enumerate(m.nics)}
    return [Placement(r.gpu, r.numa_node, names.get(r.nic) if r.nic else None, r.relay_gpu,
                      r.disk) for r in plan.ranks]


def estimate(m: Machine, plan: Plan, load: Optional[StepLoad] = None) -> CostEstimate:
    """Naive vs planned cost of one step's transfers on ``m`` (all of ``plan``'s ranks)."""
    load = load or StepLoad()
    naive, planned = naive_placements(m, len(plan.ranks)), planned_placements(m, plan)
    return CostEstimate(
        naive=_phase_costs(m, naive, load),
        planned=_phase_costs(m, planned, load),
        assumptions=_Links(m).assumptions(naive + planned),
    )

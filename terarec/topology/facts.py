"""Machines from text: a fixture file (``nvidia-smi topo -m`` plus the sysfs / lscpu facts
that matrix does not show) or a bare ``topo -m`` capture.

Fixture format (``tests/topology/fixtures/*.topo``; docs/topology.md)::

    # comment lines start with '#'; sections start with [name] at column 0
    [host]
    hostname = dgx-h200          # key = value
    sockets = 2
    threads_per_core = 2
    gpu_name = NVIDIA H200       # for every GPU
    gpu_pcie_gen = 5
    gpu_memory_mb = 143771

    [nvidia-smi topo -m]
    <the command's output, verbatim>

    [numa]
    <`numactl -H` output, or lscpu's "NUMA nodeN CPU(s): ..." lines>

    [nics]
    # name     kind  numa  netdev    gbps      (kind: ib | roce | eth | -; '-' = unknown)
    mlx5_0     ib    0     ibp12s0   400

    [disks]
    # name     kind  numa  mount     size_gb   members   (kind: nvme | disk)
    nvme0n1    nvme  0     /         1920      -
    md0        nvme  -     /raid     30720     nvme2n1,nvme3n1

Every section is optional: a CPU box has no ``topo -m``; a GPU box without ``[numa]``
gets its NUMA nodes from the matrix's ``CPU Affinity`` / ``NUMA Affinity`` columns. NICs
the matrix shows but ``[nics]`` does not describe keep what their name says (a kernel
RDMA name such as ``mlx5_0`` is RDMA; anything else: kind unknown); a ``NICk`` column
the NIC legend does not name stays unnamed. Without ``[disks]`` the disks are unknown
(not "none"). Facts nothing gives (sockets, SMT width, PCIe generation) stay None.
A file with no ``[section]`` lines is read as a raw capture: the matrix, then after a
``# --- extra ---`` line optionally ``numactl -H`` / ``lscpu`` output (the format of the
raw ``nvidia-smi topo -m`` captures).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

from terarec.topology.model import Disk, Gpu, Machine, Nic, NumaNode, TopologyError, parse_cpulist
from terarec.topology.smi import TopoMatrix, parse_topo_matrix

SECTIONS = ("host", "nvidia-smi topo -m", "numa", "nics", "disks")
_SECTION = re.compile(r"^\[([a-z -]+)\]\s*$")
_HOST_KEYS = {"hostname": str, "sockets": int, "threads_per_core": int, "gpu_name": str,
              "gpu_pcie_gen": int, "gpu_memory_mb": int}


def split_sections(text: str, source: str) -> dict[str, str]:
    """``{section name: body}``; ``{}`` when the text has no section lines.

    Raises:
        TopologyError: an unknown or repeated section (names the line).
    """
    out: dict[str, list[str]] = {}
    cur: Optional[str] = None
    for n, line in enumerate(text.splitlines(), 1):
        m = _SECTION.match(line)
        if m:
            name = m.group(1)
            if name not in SECTIONS:
                raise TopologyError(f"{source}: line {n}: unknown section [{name}] "
                                    f"(known: {', '.join(SECTIONS)})")
            if name in out:
                raise TopologyError(f"{source}: line {n}: section [{name}] given twice")
            cur = name
            out[name] = []
        elif cur is not None:
            out[cur].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _rows(body: str) -> list[tuple[int, list[str]]]:
    out = []
    for n, line in enumerate(body.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append((n, line.split()))
    return out


def parse_numa(text: str, source: str) -> list[NumaNode]:
    """NUMA nodes from ``numactl -H`` (``node N cpus: ...``, ``node N size: M MB``) or
    lscpu (``NUMA nodeN CPU(s): 0-15,128-143``) lines; nodes without CPUs are left out.

    Raises:
        TopologyError: a CPU list that does not parse.
    """
    cpus: dict[int, list[int]] = {}
    mem: dict[int, int] = {}
    for line in text.splitlines():
        m = re.match(r"^\s*node\s+(\d+)\s+cpus:\s*(.*)$", line)
        if m:
            try:
                cpus[int(m.group(1))] = parse_cpulist(",".join(m.group(2).split()))
            except ValueError as e:
                raise TopologyError(f"{source}: {line.strip()!r}: {e}") from None
            continue
        m = re.match(r"^\s*node\s+(\d+)\s+size:\s*(\d+)\s*MB", line)
        if m:
            mem[int(m.group(1))] = int(m.group(2))
            continue
        m = re.match(r"^\s*NUMA node(\d+) CPU\(s\):\s*(.*)$", line)
        if m:
            try:
                cpus[int(m.group(1))] = parse_cpulist(m.group(2))
            except ValueError as e:
                raise TopologyError(f"{source}: {line.strip()!r}: {e}") from None
    return [NumaNode(i, c, mem.get(i)) for i, c in sorted(cpus.items()) if c]


def _lscpu_int(text: str, key: str) -> Optional[int]:
    m = re.search(rf"^\s*{re.escape(key)}:\s*(\d+)\s*$", text, re.M)
    return int(m.group(1)) if m else None


def _opt(cell: str) -> Optional[str]:
    return None if cell == "-" else cell


def _opt_num(cell: str, where: str, kind: type = int) -> Optional[float]:
    if cell == "-":
        return None
    try:
        return kind(cell)
    except ValueError:
        raise TopologyError(f"{where}: {cell!r} is not a number") from None


def parse_nics(body: str, source: str) -> list[Nic]:
    """The ``[nics]`` section (kind ``-``: unknown).

    Raises:
        TopologyError: a malformed or repeated line, naming it.
    """
    out: list[Nic] = []
    for n, cells in _rows(body):
        where = f"{source}: [nics] line {n}"
        if len(cells) != 5:
            raise TopologyError(f"{where}: expected 'name kind numa netdev gbps', got {cells}")
        name, kind, numa, netdev, gbps = cells
        if kind not in ("ib", "roce", "eth", "-"):
            raise TopologyError(f"{where}: kind {kind!r} is not ib, roce, eth or -")
        if any(x.name == name for x in out):
            raise TopologyError(f"{where}: NIC {name!r} given twice")
        out.append(Nic(name=name, rdma=None if kind == "-" else kind != "eth",
                       netdev=_opt(netdev),
                       numa_node=_opt_num(numa, where),  # type: ignore[arg-type]
                       rate_gbps=_opt_num(gbps, where, float)))
    return out


def parse_disks(body: str, source: str) -> list[Disk]:
    out = []
    for n, cells in _rows(body):
        where = f"{source}: [disks] line {n}"
        if len(cells) != 6:
            raise TopologyError(f"{where}: expected 'name kind numa mount size_gb members', "
                                f"got {cells}")
        name, kind, numa, mount, size, members = cells
        if kind not in ("nvme", "disk"):
            raise TopologyError(f"{where}: kind {kind!r} is not nvme or disk")
        out.append(Disk(name=name, nvme=kind == "nvme",
                        numa_node=_opt_num(numa, where),  # type: ignore[arg-type]
                        mount=_opt(mount), size_gb=_opt_num(size, where, float),
                        members=[] if members == "-" else members.split(",")))
    return out


def parse_host(body: str, source: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for n, line in enumerate(body.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (p.strip() for p in line.partition("="))
        if not sep or key not in _HOST_KEYS:
            raise TopologyError(f"{source}: [host] line {n}: {line!r} (known keys: "
                                f"{', '.join(_HOST_KEYS)})")
        try:
            out[key] = _HOST_KEYS[key](value)
        except ValueError:
            raise TopologyError(f"{source}: [host] line {n}: {key} = {value!r} is not "
                                f"{_HOST_KEYS[key].__name__}") from None
    return out


def assign_sockets(numa: list[NumaNode], sockets: Optional[int]) -> None:
    """Numbers the sockets of nodes in id order, equal runs of nodes per socket (the
    kernel numbers a socket's nodes consecutively; NPS4 EPYC: 0-3 and 4-7)."""
    if not sockets or not numa:
        return
    per = max(1, len(numa) // sockets)
    for i, m in enumerate(sorted(numa, key=lambda m: m.id)):
        m.socket = min(i // per, sockets - 1)


def nodes_from_matrix(topo: TopoMatrix) -> list[NumaNode]:
    """NUMA nodes as far as the matrix shows them (the GPUs' CPU / NUMA affinity)."""
    by_node: dict[int, set[int]] = {}
    for cpus, node in zip(topo.cpu_affinity, topo.numa_affinity):
        if node is not None:
            by_node.setdefault(node, set()).update(cpus)
    if by_node:
        return [NumaNode(i, sorted(c)) for i, c in sorted(by_node.items())]
    # NUMA Affinity N/A or absent (old drivers): one node per distinct CPU affinity when
    # those are disjoint (DGX-1: 0-19,40-59 / 20-39,60-79), else one node with them all.
    sets = [s for s in dict.fromkeys(tuple(c) for c in topo.cpu_affinity) if s]
    if len(sets) > 1 and len(set().union(*sets)) == sum(map(len, sets)):
        for i, c in enumerate(topo.cpu_affinity):
            topo.numa_affinity[i] = sets.index(tuple(c)) if c else None
        return [NumaNode(i, list(s)) for i, s in enumerate(sets)]
    allc = set().union(*sets) if sets else set()
    return [NumaNode(0, sorted(allc))] if allc else []


def build_machine(
    hostname: str,
    topo: Optional[TopoMatrix],
    numa: list[NumaNode],
    nics: list[Nic],
    disks: list[Disk],
    host: Optional[dict[str, object]] = None,
    sources: Optional[list[str]] = None,
    disks_known: bool = True,
) -> Machine:
    """Joins a ``topo -m`` matrix with the facts beside it into a :class:`Machine`
    (``disks_known``: the input held disk facts, even if it lists none)."""
    host = host or {}
    gpus: list[Gpu] = []
    gpu_links: list[list[str]] = []
    gpu_nic: list[list[str]] = []
    all_nics = list(nics)
    notes: list[str] = []
    if topo is not None:
        if not numa:
            numa = nodes_from_matrix(topo)
        single = numa[0].id if len(numa) == 1 else None
        by_name = {n.name: n for n in nics}
        named = topo.nic_named or [True] * len(topo.nic_names)
        ordered = []
        for name, ok in zip(topo.nic_names, named):
            nic = by_name.pop(name, None) or Nic(name=name, rdma=rdma_from_name(name)
                                                 if ok else None)
            nic.named = ok
            ordered.append(nic)
        all_nics = ordered + [n for n in nics if n.name in by_name]
        for i in range(topo.num_gpus):
            node = topo.numa_affinity[i] if topo.numa_affinity[i] is not None else single
            gpus.append(Gpu(index=i, name=str(host.get("gpu_name", "")), numa_node=node,
                            cpus=topo.cpu_affinity[i],
                            memory_mb=host.get("gpu_memory_mb"),  # type: ignore[arg-type]
                            pcie_gen=host.get("gpu_pcie_gen")))  # type: ignore[arg-type]
        gpu_links = topo.gpu_links
        gpu_nic = [row + [""] * (len(all_nics) - len(row)) for row in topo.gpu_nic_links]
        _infer_nic_nodes(all_nics[: len(topo.nic_names)], topo, gpus)
        if len(numa) > 1:
            notes += infer_gpu_nodes(gpus, gpu_links, all_nics, topo.gpu_nic_links)
    nic_nic: list[list[str]] = []
    if topo is not None and topo.nic_nic_links and all(topo.nic_nic_links) \
            and len(all_nics) == len(topo.nic_names):
        nic_nic = topo.nic_nic_links
    machine = Machine(
        hostname=hostname, numa=numa, gpus=gpus, nics=all_nics, disks=disks,
        gpu_links=gpu_links, gpu_nic_links=[], nic_nic_links=nic_nic,
        sockets=host.get("sockets"),  # type: ignore[arg-type]
        threads_per_core=host.get("threads_per_core"),  # type: ignore[arg-type]
        sources=sources or [], warnings=notes, disks_known=disks_known,
        inconsistencies=list(topo.inconsistencies) if topo is not None else [],
    )
    if gpu_nic and all_nics:
        guessed = [machine.nic_links(i) for i in range(len(gpus))]  # from NUMA nodes
        machine.gpu_nic_links = [[c or g for c, g in zip(row, grow)]
                                 for row, grow in zip(gpu_nic, guessed)]
    elif gpus and all_nics:
        machine.gpu_nic_links = [machine.nic_links(i) for i in range(len(gpus))]
    assign_sockets(machine.numa, machine.sockets)
    machine.validate()
    return machine


_RDMA_NAME = re.compile(r"^(mlx\d+_|bnxt_re|irdma|efa_|hfi1_|qedr|rxe|siw|erdma|hns_)")


def rdma_from_name(name: str) -> Optional[bool]:
    """True for the kernel's RDMA device names (``mlx5_0``, ``mlx5_bond_0``, ``irdma0``,
    ...: only RDMA devices are named so); None (unknown) for anything else."""
    return True if _RDMA_NAME.match(name) else None


_WITHIN_NODE = ("PIX", "PXB", "PHB", "NODE")


def infer_gpu_nodes(gpus: list[Gpu], gpu_links: list[list[str]], nics: list[Nic],
                    gpu_nic: list[list[str]]) -> list[str]:
    """A GPU without a NUMA node takes the node of its nearest device of known node
    reached without leaving a node (PIX < PXB < PHB < NODE: a NIC, else another GPU).

    Returns:
        One note per inferred GPU (what it was inferred from).
    """
    notes = []
    for g in gpus:
        if g.numa_node is not None or g.cpus:  # a CPU affinity says more (plan.py uses it)
            continue
        cand = [(_WITHIN_NODE.index(rel), 0, nic.name, nic.numa_node, rel)
                for nic, rel in zip(nics, gpu_nic[g.index] if gpu_nic else [])
                if rel in _WITHIN_NODE and nic.numa_node is not None]
        cand += [(_WITHIN_NODE.index(rel), 1, f"GPU{h.index}", h.numa_node, rel)
                 for h, rel in zip(gpus, gpu_links[g.index])
                 if rel in _WITHIN_NODE and h.numa_node is not None]
        if cand:
            _, _, via, node, rel = min(cand)  # type: ignore[type-var]
            g.numa_node = node
            notes.append(f"GPU{g.index}: no NUMA affinity in the input; NUMA node {node} "
                         f"inferred from {via} ({rel}, NUMA {node})")
    return notes


def _infer_nic_nodes(nics: list[Nic], topo: TopoMatrix, gpus: list[Gpu]) -> None:
    """A NIC without a known node sits on the node of the GPUs nearest it (if that is
    within one node: PIX, PXB, PHB or NODE)."""
    for k, nic in enumerate(nics):
        if nic.numa_node is not None:
            continue
        best = min(((["X", "PIX", "PXB", "PHB", "NODE"].index(row[k]), g.numa_node)
                    for row, g in zip(topo.gpu_nic_links, gpus)
                    if row[k] in ("PIX", "PXB", "PHB", "NODE") and g.numa_node is not None),
                   default=None)
        if best is not None:
            nic.numa_node = best[1]


def machine_from_text(text: str, source: str, hostname: Optional[str] = None) -> Machine:
    """A fixture file or a raw ``topo -m`` capture -> :class:`Machine`.

    Raises:
        TopologyError: naming ``source``, the section and the line.
    """
    sections = split_sections(text, source)
    if not sections:  # a raw capture, maybe with numactl/lscpu after '# --- extra ---'
        _, _, extra = text.partition("# --- extra ---")
        topo = parse_topo_matrix(text, source)
        numa = parse_numa(extra, source)
        sockets = _lscpu_int(extra, "Socket(s)")
        tpc = _lscpu_int(extra, "Thread(s) per core")
        host = {k: v for k, v in (("sockets", sockets), ("threads_per_core", tpc)) if v}
        return build_machine(hostname or Path(source).stem, topo, numa, [], [], host,
                             [source], disks_known=False)
    host = parse_host(sections.get("host", ""), source)
    topo_text = sections.get("nvidia-smi topo -m")
    topo = parse_topo_matrix(topo_text, f"{source} [nvidia-smi topo -m]") if topo_text else None
    numa_text = sections.get("numa", "")
    numa = parse_numa(numa_text, f"{source} [numa]")
    if "numa" in sections and not numa:
        raise TopologyError(f"{source}: [numa] lists no node with CPUs")
    if "sockets" not in host and _lscpu_int(numa_text, "Socket(s)"):
        host["sockets"] = _lscpu_int(numa_text, "Socket(s)")
    return build_machine(
        hostname or str(host.get("hostname") or Path(source).stem), topo, numa,
        parse_nics(sections.get("nics", ""), source),
        parse_disks(sections.get("disks", ""), source), host, [source],
        disks_known="disks" in sections,
    )


def load_fixture(path: Union[str, Path]) -> Machine:
    """Reads a fixture / capture file (see the module docstring).

    Raises:
        TopologyError: unreadable or malformed; names the file.
    """
    p = Path(path)
    try:
        text = p.read_text(errors="replace")
    except OSError as e:
        raise TopologyError(f"{p}: cannot read: {e.strerror or e}") from None
    return machine_from_text(text, str(p))


def machine_to_fixture(m: Machine, comments: Optional[list[str]] = None) -> str:
    """A machine in the fixture format (``terarec-topo --fixture``): how a real box is
    captured as text for tests and docs."""
    from terarec.topology.model import format_cpulist
    from terarec.topology.smi import format_topo_matrix

    out = [f"# {c}" for c in (comments or [])]
    out += ["[host]", f"hostname = {m.hostname}"]
    if m.sockets:
        out.append(f"sockets = {m.sockets}")
    if m.threads_per_core:
        out.append(f"threads_per_core = {m.threads_per_core}")
    if m.gpus:
        g = m.gpus[0]
        if g.name:
            out.append(f"gpu_name = {g.name}")
        if g.pcie_gen:
            out.append(f"gpu_pcie_gen = {g.pcie_gen}")
        if g.memory_mb:
            out.append(f"gpu_memory_mb = {g.memory_mb}")
        out += ["", "[nvidia-smi topo -m]", format_topo_matrix(
            m.gpu_links, [n.name for n in m.nics], m.gpu_nic_links,
            [format_cpulist(g.cpus) for g in m.gpus],
            ["N/A" if g.numa_node is None else str(g.numa_node) for g in m.gpus],
            [n.named for n in m.nics], m.nic_nic_links).rstrip()]
    out += ["", "[numa]"]
    for node in m.numa:
        out.append(f"node {node.id} cpus: {' '.join(map(str, node.cpus))}")
        if node.memory_mb is not None:
            out.append(f"node {node.id} size: {node.memory_mb} MB")

    def cell(v: object) -> str:
        return "-" if v is None or v == [] else str(v)

    out += ["", "[nics]", "# name  kind  numa  netdev  gbps"]
    for n in m.nics:
        kind = "-" if n.rdma is None else "ib" if n.rdma else "eth"
        out.append(f"{n.name}  {kind}  {cell(n.numa_node)}  {cell(n.netdev)}  "
                   f"{cell(n.rate_gbps)}")
    if not m.disks_known:  # no [disks] section: unknown, not "no disk"
        return "\n".join(out) + "\n"
    out += ["", "[disks]", "# name  kind  numa  mount  size_gb  members"]
    for d in m.disks:
        out.append(f"{d.name}  {'nvme' if d.nvme else 'disk'}  {cell(d.numa_node)}  "
                   f"{cell(d.mount)}  {cell(d.size_gb)}  "
                   f"{','.join(d.members) if d.members else '-'}")
    return "\n".join(out) + "\n"

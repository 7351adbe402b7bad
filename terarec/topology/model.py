"""The machine as plain data: NUMA nodes, GPUs, NICs, disks and the links between them.

Discovery (``discover.py``, ``smi.py``, ``facts.py``) produces a :class:`Machine`; the
plan, the cost model and the CLI consume one. Nothing here touches the hardware, so tests
feed fixtures. A machine saves to JSON and loads back (:func:`machine_to_json`,
:func:`load_machine`); a malformed file is a :class:`TopologyError` naming it and the bad
field.

Links use ``nvidia-smi topo -m``'s words, nearest first::

    X     the device itself
    NV#   a bonded set of # NVLinks (GPU<->GPU; on some V100 boards also GPU<->NIC)
    PIX   at most one PCIe bridge (same PCIe switch)
    PXB   several PCIe bridges, no host bridge (a tree of switches)
    PHB   through a PCIe host bridge (the CPU's root complex)
    NODE  between host bridges of one NUMA node
    SYS   across the SMP interconnect between NUMA nodes (UPI / xGMI)
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

SCHEMA = "terarec.topology/1"


class TopologyError(ValueError):
    """A saved topology, a fixture or a tool's output that cannot be read (names where)."""


# ------------------------------------------------------------------------------ links

_ORDER = {"X": 0, "NV": 1, "PIX": 2, "PXB": 3, "PHB": 4, "NODE": 5, "SYS": 6}
_NV = re.compile(r"NV(\d+)")


def normalize_relation(cell: str) -> str:
    """One matrix cell -> its canonical word (``" X "`` -> ``X``, ``SOC`` -> ``SYS``).

    Raises:
        ValueError: not a relation nvidia-smi prints.
    """
    c = cell.strip().upper()
    if c == "SOC":  # drivers before 384 said SOC for SYS
        return "SYS"
    if c in _ORDER and c != "NV" or _NV.fullmatch(c):
        return c
    raise ValueError(f"{cell!r} is not a link (X, NV#, PIX, PXB, PHB, NODE, SYS)")


def relation_rank(rel: str) -> int:
    """0 (X) .. 6 (SYS): smaller is nearer; every ``NV#`` is 1."""
    return _ORDER["NV"] if rel.startswith("NV") else _ORDER[rel]


def nvlinks(rel: str) -> int:
    """Number of bonded NVLinks of a relation (0 when it is not ``NV#``)."""
    m = _NV.fullmatch(rel)
    return int(m.group(1)) if m else 0


def is_near(rel: str) -> bool:
    """Near enough for GPUDirect RDMA without help: NVLink, a PCIe switch or one host bridge."""
    return relation_rank(rel) <= _ORDER["PHB"]


# ------------------------------------------------------------------------------- data


@dataclass
class NumaNode:
    """A NUMA node with CPUs (memory-only nodes, e.g. a GH200's HBM node, are left out).

    Attributes:
        id: the kernel's node number (not always 0..n-1: POWER9 numbers them 0 and 8).
        cpus: logical CPU ids, ascending.
        memory_mb: DRAM on the node, if known.
        socket: the CPU package the node belongs to, if known.
    """

    id: int
    cpus: list[int]
    memory_mb: Optional[int] = None
    socket: Optional[int] = None


@dataclass
class Gpu:
    """One GPU.

    Attributes:
        index: nvidia-smi / NVML index (the CUDA order with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``).
        name: product name, "" when unknown.
        pci_bus_id: ``0000:0a:00.0`` style, lower case, if known.
        numa_node: the NUMA node nearest to it (``NUMA Affinity``), None when unknown.
        cpus: its CPU affinity (nvidia-smi ``CPU Affinity``); empty when unknown.
        memory_mb: its memory, if known.
        pcie_gen: the PCIe generation of its link, if known (the cost model guesses from
            the name otherwise).
    """

    index: int
    name: str = ""
    pci_bus_id: Optional[str] = None
    numa_node: Optional[int] = None
    cpus: list[int] = field(default_factory=list)
    memory_mb: Optional[int] = None
    pcie_gen: Optional[int] = None


@dataclass
class Nic:
    """A network adapter (an RDMA device such as ``mlx5_0``, or a plain netdev).

    Attributes:
        name: the RDMA device name (``mlx5_0``) or, for plain Ethernet, the interface;
            when ``named`` is False, only the matrix's column label (``NIC9``).
        rdma: an InfiniBand / RoCE device (NCCL's IB transport can use it); None when
            unknown (a matrix column nothing else describes).
        netdev: its network interface (``ibp12s0``, ``eth0``), if known.
        numa_node: the node its PCIe slot hangs off, if known.
        pci_bus_id: if known.
        rate_gbps: link rate in Gbit/s, if known.
        named: ``name`` is the device's real name (False: a capture whose NIC legend does
            not name it; nothing may be pinned to it by name).
    """

    name: str
    rdma: Optional[bool] = True
    netdev: Optional[str] = None
    numa_node: Optional[int] = None
    pci_bus_id: Optional[str] = None
    rate_gbps: Optional[float] = None
    named: bool = True


@dataclass
class Disk:
    """A block device that can hold the SSD tier, with where it is mounted.

    Attributes:
        name: kernel name (``nvme0n1``, ``md0``, ``vda``).
        nvme: an NVMe device (or a RAID of NVMe devices only).
        numa_node: its node (a RAID whose members sit on several nodes: None).
        mount: the largest mounted file system on it, if any.
        size_gb: capacity in GB (10^9 bytes), if known.
        members: the devices of a software RAID (``md0`` -> nvme0n1, nvme1n1, ...).
        pci_bus_id: if known.
    """

    name: str
    nvme: bool = True
    numa_node: Optional[int] = None
    mount: Optional[str] = None
    size_gb: Optional[float] = None
    members: list[str] = field(default_factory=list)
    pci_bus_id: Optional[str] = None


@dataclass
class Machine:
    """One host: what discovery saw.

    Attributes:
        hostname: the host's name (or the fixture's).
        numa: NUMA nodes that have CPUs, by id.
        gpus: by index.
        nics: in nvidia-smi's column order when it printed them.
        disks: candidate disks for the SSD tier.
        gpu_links: ``gpu_links[i][j]``: the link between GPU i and GPU j (``X`` on the
            diagonal); shape ``[n_gpus][n_gpus]``.
        gpu_nic_links: ``gpu_nic_links[i][k]``: GPU i to NIC k; shape ``[n_gpus][n_nics]``
            (empty rows when nothing said, e.g. a CPU box).
        nic_nic_links: ``nic_nic_links[k][l]``: NIC k to NIC l (``X`` on the diagonal);
            ``[n_nics][n_nics]``, or empty when the input did not show it. Two ports
            ``PIX`` to each other are taken as one card.
        sockets: CPU packages, if known.
        threads_per_core: SMT width, if known.
        sources: what the facts came from (``nvml``, ``nvidia-smi``, ``sysfs``, a file).
        warnings: what discovery could not see (a missing tool, an unreadable file).
        disks_known: the input held disk facts (False: a raw ``topo -m`` capture; an
            empty ``disks`` then means "not known", not "no disk").
        inconsistencies: contradictions found in the input (an asymmetric matrix, a NIC
            name given twice, a cut row), each naming the row; ``--check`` warns.
    """

    hostname: str
    numa: list[NumaNode] = field(default_factory=list)
    gpus: list[Gpu] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    gpu_links: list[list[str]] = field(default_factory=list)
    gpu_nic_links: list[list[str]] = field(default_factory=list)
    nic_nic_links: list[list[str]] = field(default_factory=list)
    sockets: Optional[int] = None
    threads_per_core: Optional[int] = None
    sources: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    disks_known: bool = True
    inconsistencies: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Shapes and values hang together.

        Raises:
            TopologyError: naming the field.
        """
        n, k = len(self.gpus), len(self.nics)
        if [g.index for g in self.gpus] != list(range(n)):
            raise TopologyError(f"gpus: indices {[g.index for g in self.gpus]} are not 0..{n - 1}")
        ids = [m.id for m in self.numa]
        if len(set(ids)) != len(ids):
            raise TopologyError(f"numa: duplicate node ids {ids}")
        if len(self.gpu_links) != n or any(len(r) != n for r in self.gpu_links):
            raise TopologyError(f"gpu_links: must be {n}x{n} for {n} GPUs")
        if self.gpu_nic_links and (
            len(self.gpu_nic_links) != n or any(len(r) != k for r in self.gpu_nic_links)
        ):
            raise TopologyError(f"gpu_nic_links: must be {n}x{k} for {n} GPUs and {k} NICs")
        if self.nic_nic_links and (
            len(self.nic_nic_links) != k or any(len(r) != k for r in self.nic_nic_links)
        ):
            raise TopologyError(f"nic_nic_links: must be {k}x{k} for {k} NICs")
        names = [n.name for n in self.nics]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise TopologyError(f"nics[{i}].name: {name!r} repeats nics"
                                    f"[{names.index(name)}]")
        for name, matrix in (("gpu_links", self.gpu_links), ("gpu_nic_links", self.gpu_nic_links),
                             ("nic_nic_links", self.nic_nic_links)):
            for i, row in enumerate(matrix):
                for j, cell in enumerate(row):
                    try:
                        rel = normalize_relation(cell)
                    except ValueError as e:
                        raise TopologyError(f"{name}[{i}][{j}]: {e}") from None
                    if name != "gpu_nic_links" and (rel == "X") != (i == j):
                        raise TopologyError(f"{name}[{i}][{j}]: {cell!r} (X only on the diagonal)")
                    row[j] = rel
        for g in self.gpus:  # (with no NUMA nodes known, no GPU may name one either)
            if g.numa_node is not None and g.numa_node not in ids:
                raise TopologyError(
                    f"gpus[{g.index}].numa_node: {g.numa_node} is not in numa {ids}")

    # ------------------------------------------------------------------ lookups

    def node(self, node_id: int) -> NumaNode:
        for m in self.numa:
            if m.id == node_id:
                return m
        raise KeyError(node_id)

    def socket_of(self, node_id: Optional[int]) -> Optional[int]:
        """The socket of a NUMA node; None when unknown (a NUMA node is never taken for a
        socket: one EPYC socket in NPS4 has four nodes)."""
        if node_id is None:
            return None
        try:
            return self.node(node_id).socket
        except KeyError:
            return None

    def crossing(self, a: Optional[int], b: Optional[int]) -> Optional[str]:
        """How traffic between NUMA nodes ``a`` and ``b`` travels: None (one node, or a
        node unknown), ``"socket"`` (known to be different sockets), ``"node"`` (known to
        be one socket), ``"numa"`` (different nodes, sockets unknown)."""
        if a is None or b is None or a == b:
            return None
        sa, sb = self.socket_of(a), self.socket_of(b)
        if sa is None or sb is None:
            return "numa"
        return "node" if sa == sb else "socket"

    def nic_cards(self) -> list[int]:
        """Per NIC, the index of the first NIC of its card: ports ``PIX`` to each other
        (two ports of one adapter, or two adapters behind one switch) are taken as one
        card sharing one PCIe link. Each NIC its own card when the NIC-NIC relation is
        unknown."""
        card = list(range(len(self.nics)))
        for k, row in enumerate(self.nic_nic_links):
            for j, rel in enumerate(row[:k]):
                if rel == "PIX":
                    card[k] = card[j]
                    break
        return card

    def nic_links(self, gpu: int) -> list[str]:
        """GPU ``gpu``'s link to every NIC (``SYS`` / ``NODE`` guessed from NUMA nodes when
        nvidia-smi said nothing)."""
        if self.gpu_nic_links:
            return self.gpu_nic_links[gpu]
        g = self.gpus[gpu].numa_node
        out = []
        for nic in self.nics:
            # nvidia-smi's SYS: across the interconnect between NUMA nodes (even of one
            # socket); an unknown node counts as far.
            out.append("NODE" if g is not None and g == nic.numa_node else "SYS")
        return out


# ------------------------------------------------------------------------------- JSON

_CLASSES = {"numa": NumaNode, "gpus": Gpu, "nics": Nic, "disks": Disk}


def machine_to_dict(m: Machine) -> dict[str, Any]:
    return {"schema": SCHEMA, **asdict(m)}


def machine_to_json(m: Machine) -> str:
    return json.dumps(machine_to_dict(m), indent=1)


def check_type(where: str, value: Any, tp: Any) -> None:
    """A light check of a JSON value against a dataclass field's annotation string
    (``int``, ``str``, ``bool``, ``float``, ``Optional[...]``, ``list[...]``,
    ``dict[str, ...]``; other annotations are not checked).

    Raises:
        TopologyError: naming ``where`` (with the index or key of a bad element).
    """
    tp = str(tp).replace("typing.", "")
    ok = True
    if tp in ("int",):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp in ("str",):
        ok = isinstance(value, str)
    elif tp == "bool":
        ok = isinstance(value, bool)
    elif tp.startswith("Optional["):
        inner = tp[len("Optional["):-1]
        if value is not None:
            check_type(where, value, inner)
        return
    elif tp == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp.startswith("list["):
        if not isinstance(value, list):
            ok = False
        else:
            inner = tp[len("list["):-1]
            for i, v in enumerate(value):
                check_type(f"{where}[{i}]", v, inner)
            return
    elif tp.startswith("dict[str, "):
        if not isinstance(value, dict):
            ok = False
        else:
            inner = tp[len("dict[str, "):-1]
            for k, v in value.items():
                check_type(f"{where}[{k}]", v, inner)
            return
    if not ok:
        raise TopologyError(f"{where}: expected {tp}, got {json.dumps(value)}")


def pop_lists(raw: dict[str, Any], classes: dict[str, type], where: str) -> dict[str, Any]:
    """Pops each ``key`` of ``classes`` (absent: ``[]``) from ``raw`` and builds its list
    of dataclasses; a value that is not a list is an error naming ``where.key``."""
    parts: dict[str, Any] = {}
    for key, cls in classes.items():
        items = raw.pop(key, [])
        if not isinstance(items, list):
            raise TopologyError(f"{where}.{key}: expected a list, got {json.dumps(items)[:60]}")
        parts[key] = [build_dataclass(cls, x, f"{where}.{key}[{i}]") for i, x in enumerate(items)]
    return parts


def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    """``cls(**raw)`` from a JSON object whose keys are ``cls``'s fields, each value
    checked by :func:`check_type`.

    Raises:
        TopologyError: not an object, an unknown or missing key, a mistyped value; named
            with its path below ``where``.
    """
    if not isinstance(raw, dict):
        raise TopologyError(f"{where}: expected an object, got {json.dumps(raw)[:60]}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise TopologyError(f"{where}: unknown key(s) {unknown} (known: {sorted(known)})")
    kwargs = {}
    for name, f in known.items():
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise TopologyError(f"{where}.{name}: missing")
            continue
        check_type(f"{where}.{name}", raw[name], f.type)
        kwargs[name] = raw[name]
    return cls(**kwargs)


def machine_from_dict(raw: Any, where: str = "machine") -> Machine:
    """A :class:`Machine` from parsed JSON.

    Raises:
        TopologyError: a missing, unknown or mistyped field, named with its path.
    """
    if not isinstance(raw, dict):
        raise TopologyError(f"{where}: expected a JSON object")
    raw = dict(raw)
    schema = raw.pop("schema", SCHEMA)
    if schema != SCHEMA:
        raise TopologyError(f"{where}.schema: {schema!r}, this terarec reads {SCHEMA!r}")
    parts = pop_lists(raw, _CLASSES, where)
    known = {f.name for f in fields(Machine)} - set(_CLASSES)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TopologyError(f"{where}: unknown key(s) {unknown}")
    for f in fields(Machine):
        if f.name in raw:
            check_type(f"{where}.{f.name}", raw[f.name], f.type)
    if "hostname" not in raw:
        raise TopologyError(f"{where}.hostname: missing")
    try:
        return Machine(**raw, **parts)
    except TopologyError as e:
        raise TopologyError(f"{where}.{e}") from None


def load_machine(path: Union[str, Path]) -> Machine:
    """Reads a machine saved by ``terarec-topo --json`` (or a bare machine object).

    Raises:
        TopologyError: the file is missing, not JSON, or not a machine; names the file.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TopologyError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise TopologyError(f"{p}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    if isinstance(raw, dict) and "machine" in raw:  # a whole `terarec-topo --json` document
        raw = raw["machine"]
    try:
        return machine_from_dict(raw)
    except TopologyError as e:
        raise TopologyError(f"{p}: {e}") from None


# ---------------------------------------------------------------------------- helpers


def parse_cpulist(text: str) -> list[int]:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]``; ``""`` / ``N/A`` -> ``[]``.

    Raises:
        ValueError: not a CPU list.
    """
    text = text.strip()
    if not text or text.upper() == "N/A":
        return []
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"{text!r} is not a CPU list (bad part {part!r})")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"{text!r} is not a CPU list ({part!r} runs backwards)")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def format_cpulist(cpus: list[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``."""
    s = sorted(set(cpus))
    out, i = [], 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        out.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(out)

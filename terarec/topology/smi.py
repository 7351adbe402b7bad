"""Parsers for nvidia-smi's text: the ``topo -m`` matrix and ``--query-gpu`` CSV.

``nvidia-smi topo -m`` prints a matrix like::

            GPU0    GPU1    NIC0    CPU Affinity    NUMA Affinity   GPU NUMA ID
    GPU0     X      NV18    PXB     0-55,112-167    0               N/A
    GPU1    NV18     X      NODE    0-55,112-167    0               N/A
    NIC0    PXB     NODE     X

    Legend: ...
    NIC Legend:
      NIC0: mlx5_0

Real outputs vary: ANSI underline escapes around the header, NIC columns named
``mlx5_0`` instead of ``NIC0``, no ``NUMA Affinity`` column on old drivers, prompts and
tool banners before it, whitespace mangled by pasting. The parser takes the first line
whose first token is ``GPU0`` and whose second is not ``X`` as the header, reads a row per
device, and stops at the first line that is not one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from terarec.topology.model import TopologyError, normalize_relation, parse_cpulist

_ANSI = re.compile(r"\x1b?\[\d+(?:;\d+)*m")
_MULTI = ((re.compile(r"GPU\s+NUMA\s+ID"), "GPU_NUMA_ID"),
          (re.compile(r"CPU\s+Affinity"), "CPU_Affinity"),
          (re.compile(r"NUMA\s+Affinity"), "NUMA_Affinity"))
_TRAILING = ("CPU_Affinity", "NUMA_Affinity", "GPU_NUMA_ID")
_LEGEND = re.compile(r"^\s*(NIC\d+)\s*:\s*(\S+)\s*$")


@dataclass
class TopoMatrix:
    """What ``nvidia-smi topo -m`` said.

    Attributes:
        gpu_links: ``[n_gpus][n_gpus]`` relations (``X`` on the diagonal).
        nic_names: NIC names in column order (``NICk`` resolved through the NIC legend).
        gpu_nic_links: ``[n_gpus][n_nics]`` relations.
        nic_nic_links: ``[n_nics][n_nics]`` relations (empty rows when not printed).
        cpu_affinity: per GPU, its CPU list (empty when ``N/A`` or absent).
        numa_affinity: per GPU, its NUMA node (None when ``N/A`` or absent).
        gpu_numa_id: per GPU, the GPU memory's own NUMA node (GH200), else None.
        nic_named: per NIC, whether ``nic_names`` holds its device name (False: a
            ``NICk`` column the NIC legend does not name, or names twice).
        inconsistencies: contradictions in the text, each naming its row (an asymmetric
            cell, a NIC name given twice, a GPU row cut after its link columns).
    """

    gpu_links: list[list[str]]
    nic_names: list[str]
    gpu_nic_links: list[list[str]]
    nic_nic_links: list[list[str]] = field(default_factory=list)
    cpu_affinity: list[list[int]] = field(default_factory=list)
    numa_affinity: list[Optional[int]] = field(default_factory=list)
    gpu_numa_id: list[Optional[int]] = field(default_factory=list)
    nic_named: list[bool] = field(default_factory=list)
    inconsistencies: list[str] = field(default_factory=list)

    @property
    def num_gpus(self) -> int:
        return len(self.gpu_links)


def _tokens(line: str) -> list[str]:
    line = _ANSI.sub("", line)
    for pat, word in _MULTI:
        line = pat.sub(word, line)
    return line.split()


def _opt_node(cell: Optional[str], where: str) -> Optional[int]:
    if cell is None or cell.upper() == "N/A":
        return None
    try:
        nodes = parse_cpulist(cell)  # "0" or, rarely, "0-1"
    except ValueError:
        raise TopologyError(f"{where}: NUMA node {cell!r} is not a number") from None
    return nodes[0] if nodes else None


def parse_topo_matrix(text: str, source: str = "nvidia-smi topo -m") -> TopoMatrix:
    """Parses ``nvidia-smi topo -m`` output (anything around the matrix is skipped).

    Args:
        text: the output, or a file holding it among other text.
        source: how to name the text in errors (the command or the file).

    Returns:
        The :class:`TopoMatrix`.

    Raises:
        TopologyError: no matrix found, a row missing or short, a cell that is not a
            relation; the message names ``source`` and the row.
    """
    lines = text.splitlines()
    start, cols = None, []
    for i, line in enumerate(lines):
        t = _tokens(line)
        if t and t[0] == "GPU0" and (len(t) == 1 or t[1] != "X"):
            start, cols = i, t
            break
    if start is None:
        raise TopologyError(
            f"{source}: no GPU matrix found (expected a header line starting with GPU0)"
        )
    devices = [c for c in cols if c not in _TRAILING]
    twice = sorted({c for c in devices if devices.count(c) > 1})
    if twice:
        raise TopologyError(f"{source}: header {' '.join(cols)!r}: column(s) "
                            f"{', '.join(twice)} given twice")
    trailing = [c for c in cols if c in _TRAILING]
    if devices != cols[: len(devices)]:
        raise TopologyError(f"{source}: header {' '.join(cols)!r}: device columns after "
                            "the affinity columns")
    gpus = [c for c in devices if re.fullmatch(r"GPU\d+", c)]
    if gpus != [f"GPU{i}" for i in range(len(gpus))] or devices[: len(gpus)] != gpus:
        raise TopologyError(f"{source}: header {' '.join(cols)!r}: GPU columns are not "
                            "GPU0, GPU1, ... first")
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        t = _tokens(line)
        if not t or t[0] not in devices:
            if rows:
                break
            continue
        rows[t[0]] = t[1:]
    legend = {m.group(1): m.group(2) for m in map(_LEGEND.match, lines[start:]) if m}
    ng = len(gpus)
    nics = devices[ng:]
    missing = [g for g in gpus if g not in rows]
    if missing:
        raise TopologyError(f"{source}: no row for {', '.join(missing)}")

    def rels(row_name: str, cells: list[str], cols_: list[str]) -> list[str]:
        out = []
        for c, cell in zip(cols_, cells):
            try:
                out.append(normalize_relation(cell))
            except ValueError as e:
                raise TopologyError(f"{source}: row {row_name}, column {c}: {e}") from None
        return out

    gpu_links, gpu_nic, cpu_aff, numa_aff, gpu_numa = [], [], [], [], []
    odd: list[str] = []
    for g in gpus:
        cells = rows[g]
        if len(cells) < len(devices):
            raise TopologyError(f"{source}: row {g} has {len(cells)} cells, the header "
                                f"{len(devices)} devices")
        if trailing and len(cells) == len(devices):
            odd.append(f"{source}: row {g} ends after its link columns (no "
                       f"{', '.join(c.replace('_', ' ') for c in trailing)}): its CPU and "
                       "NUMA affinity are unknown")
        links = rels(g, cells[: len(devices)], devices)
        gpu_links.append(links[:ng])
        gpu_nic.append(links[ng:])
        extra = dict(zip(trailing, cells[len(devices):]))
        try:
            cpu_aff.append(parse_cpulist(extra.get("CPU_Affinity", "")))
        except ValueError as e:
            raise TopologyError(f"{source}: row {g}, CPU Affinity: {e}") from None
        numa_aff.append(_opt_node(extra.get("NUMA_Affinity"), f"{source}: row {g}"))
        gpu_numa.append(_opt_node(extra.get("GPU_NUMA_ID"), f"{source}: row {g}"))
    for i in range(ng):
        if gpu_links[i][i] != "X":
            raise TopologyError(f"{source}: row GPU{i}: {gpu_links[i][i]} on the diagonal")
    nic_gpu = {n: rels(n, rows[n][:ng], gpus) for n in nics if n in rows and len(rows[n]) >= ng}
    nic_nic = [rels(n, rows[n][ng: ng + len(nics)], nics)
               if n in rows and len(rows[n]) >= ng + len(nics) else [] for n in nics]
    odd += _asymmetries(source, gpus, gpu_links, nics, gpu_nic, nic_gpu, nic_nic)
    names, named = _nic_names(source, nics, legend, odd)
    return TopoMatrix(
        gpu_links=gpu_links,
        nic_names=names,
        gpu_nic_links=gpu_nic,
        nic_nic_links=nic_nic,
        cpu_affinity=cpu_aff,
        numa_affinity=numa_aff,
        gpu_numa_id=gpu_numa,
        nic_named=named,
        inconsistencies=odd,
    )


def _nic_names(source: str, cols: list[str], legend: dict[str, str],
               odd: list[str]) -> tuple[list[str], list[bool]]:
    """Column labels -> (names, named). A ``NICk`` label resolves through the legend; one
    the legend does not name stays its label, unnamed. A name the legend gives to two
    columns is known for neither (both keep their labels, and ``odd`` says so)."""
    names = [legend.get(c, c) for c in cols]
    named = [c in legend or not re.fullmatch(r"NIC\d+", c) for c in cols]
    for k, name in enumerate(names):
        others = [j for j, n in enumerate(names) if n == name and j != k and named[j]]
        if named[k] and others:
            twice = [cols[k]] + [cols[j] for j in others]
            odd.append(f"{source}: NIC legend: {' and '.join(twice)} are "
                       f"{'both' if len(twice) == 2 else 'all'} {name!r}: their device names "
                       "are unknown")
            for j in [k, *others]:
                names[j], named[j] = cols[j], False
    return names, named


def _asymmetries(source: str, gpus: list[str], gpu_links: list[list[str]], nics: list[str],
                 gpu_nic: list[list[str]], nic_gpu: dict[str, list[str]],
                 nic_nic: list[list[str]]) -> list[str]:
    """Cells whose mirror image says otherwise (``row A, column B`` vs ``row B, column A``)."""
    out = []

    def check(ra: str, cb: str, x: str, rb: str, ca: str, y: str) -> None:
        if x != y:
            out.append(f"{source}: row {ra}, column {cb}: {x}, but row {rb}, column {ca}: "
                       f"{y} (asymmetric: each row's own value is used)")

    for i, a in enumerate(gpus):
        for j in range(i + 1, len(gpus)):
            check(a, gpus[j], gpu_links[i][j], gpus[j], a, gpu_links[j][i])
        for k, n in enumerate(nics):
            if n in nic_gpu:
                check(a, n, gpu_nic[i][k], n, a, nic_gpu[n][i])
    for k, n in enumerate(nics):
        for j in range(k + 1, len(nics)):
            if nic_nic[k] and nic_nic[j]:
                check(n, nics[j], nic_nic[k][j], nics[j], n, nic_nic[j][k])
    return out


def normalize_bus_id(bus_id: str) -> str:
    """``00000000:0A:00.0`` (nvidia-smi, NVML) -> ``0000:0a:00.0`` (sysfs)."""
    b = bus_id.strip().lower()
    m = re.fullmatch(r"(?:([0-9a-f]+):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])", b)
    if m is None:
        raise ValueError(f"{bus_id!r} is not a PCI bus id")
    domain = int(m.group(1) or "0", 16)
    return f"{domain:04x}:{m.group(2)}:{m.group(3)}.{m.group(4)}"


@dataclass
class GpuQuery:
    """One line of ``nvidia-smi --query-gpu=QUERY_FIELDS --format=csv,noheader,nounits``."""

    index: int
    name: str
    pci_bus_id: Optional[str]
    memory_mb: Optional[int]
    pcie_gen: Optional[int]


QUERY_FIELDS = "index,name,pci.bus_id,memory.total,pcie.link.gen.max"


def parse_query_gpu(text: str, source: str = "nvidia-smi --query-gpu") -> list[GpuQuery]:
    """Parses the CSV of ``--query-gpu=`` :data:`QUERY_FIELDS` (``noheader,nounits``).

    Raises:
        TopologyError: a line without five fields or with a bad index; names ``source``.
    """
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            raise TopologyError(f"{source}: line {n}: {line!r}: expected 5 fields "
                                f"({QUERY_FIELDS})")

        def num(s: str) -> Optional[int]:
            return int(s) if s.isdigit() else None

        if num(parts[0]) is None:
            raise TopologyError(f"{source}: line {n}: index {parts[0]!r} is not a number")
        try:
            bus: Optional[str] = normalize_bus_id(parts[2])
        except ValueError:
            bus = None
        out.append(GpuQuery(int(parts[0]), parts[1], bus, num(parts[3]), num(parts[4])))
    return out


def format_topo_matrix(gpu_links: list[list[str]], nic_names: list[str],
                       gpu_nic_links: list[list[str]], cpu_affinity: list[str],
                       numa_affinity: list[str], nic_named: Optional[list[bool]] = None,
                       nic_nic_links: Optional[list[list[str]]] = None) -> str:
    """A matrix in ``nvidia-smi topo -m``'s layout (what :func:`parse_topo_matrix` reads),
    for machines discovered through NVML or sysfs. NIC rows (NIC<->NIC) are written when
    known; the NIC legend names only the NICs whose name is known (``nic_named``)."""
    n = len(gpu_links)
    named = nic_named if nic_named is not None else [True] * len(nic_names)
    labels = [f"NIC{k}" for k in range(len(nic_names))]
    cols = [f"GPU{i}" for i in range(n)] + labels
    lines = ["\t" + "\t".join(cols + ["CPU Affinity", "NUMA Affinity", "GPU NUMA ID"])]
    for i in range(n):
        cells = [" X " if c == "X" else c for c in gpu_links[i]]
        cells += list(gpu_nic_links[i]) if gpu_nic_links else []
        lines.append("\t".join([f"GPU{i}", *cells, cpu_affinity[i] or "N/A",
                                numa_affinity[i], "N/A"]))
    if nic_nic_links and gpu_nic_links:
        for k, row in enumerate(nic_nic_links):
            cells = [gpu_nic_links[i][k] for i in range(n)] + \
                [" X " if c == "X" else c for c in row]
            lines.append("\t".join([labels[k], *cells]))
    if any(named):
        lines += ["", "NIC Legend:", ""] + [f"  {label}: {name}" for label, name, ok in
                                           zip(labels, nic_names, named) if ok]
    return "\n".join(lines) + "\n"

"""Discovery of the machine this runs on -> :class:`Machine`.

GPUs come from NVML (``nvidia-ml-py``) when it is installed and loads, else from
``nvidia-smi topo -m`` and ``nvidia-smi --query-gpu``, else from the PCI devices sysfs
lists (NVIDIA display controllers; no NVLink knowledge) with a warning. NUMA nodes, NICs,
disks and PCI paths always come from sysfs (``sysfs.py``). A machine without GPUs is
reported with its CPUs, NUMA nodes, NICs and disks only.

Errors: a tool that runs but prints what cannot be parsed is a :class:`TopologyError`
naming the command; a tool that is missing or fails degrades to what sysfs shows, and the
machine's ``warnings`` say so (a failed ``--query-gpu`` after a good ``topo -m``: the
matrix's GPUs, their PCI bus ids from sysfs).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from terarec.topology import sysfs
from terarec.topology.facts import assign_sockets, rdma_from_name
from terarec.topology.model import Gpu, Machine, Nic, NumaNode, TopologyError, parse_cpulist
from terarec.topology.smi import (
    QUERY_FIELDS,
    GpuQuery,
    normalize_bus_id,
    parse_query_gpu,
    parse_topo_matrix,
)

# (argv) -> (return code, stdout, stderr); raises FileNotFoundError when not installed.
Runner = Callable[[Sequence[str]], tuple[int, str, str]]

TOPO_CMD = ("nvidia-smi", "topo", "-m")
QUERY_CMD = ("nvidia-smi", f"--query-gpu={QUERY_FIELDS}", "--format=csv,noheader,nounits")


def run_command(argv: Sequence[str]) -> tuple[int, str, str]:
    """Runs a tool with a timeout (raises FileNotFoundError when it is not on PATH)."""
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError(argv[0])
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return 124, "", "timed out after 60 s"
    return p.returncode, p.stdout, p.stderr


class _Gpus:
    """GPUs and their links as one source saw them."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.gpus: list[Gpu] = []
        self.links: list[list[str]] = []
        self.nic_names: list[str] = []  # NICs the source put in its matrix
        self.nic_links: list[list[str]] = []
        self.nic_named: list[bool] = []  # False: a matrix column its legend does not name
        self.nic_nic: list[list[str]] = []  # the matrix's NIC rows, when complete
        self.inconsistencies: list[str] = []  # what the matrix contradicts itself on
        self.warnings: list[str] = []  # what the source could not see, and the fallback


# ------------------------------------------------------------------------------ NVML

_NVML_LEVEL = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _from_nvml(nvml: Any, root: Path, single: Optional[int], ncpu: int) -> _Gpus:
    """GPUs, PCIe levels and NVLink counts through NVML (``pynvml`` of nvidia-ml-py)."""
    out = _Gpus("nvml")
    nvml.nvmlInit()
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        buses = [normalize_bus_id(_text(nvml.nvmlDeviceGetPciInfo(h).busId)) for h in handles]
        for i, (h, bus) in enumerate(zip(handles, buses)):
            try:
                gen: Optional[int] = int(nvml.nvmlDeviceGetMaxPcieLinkGeneration(h))
            except Exception:  # noqa: BLE001 - not supported on every board
                gen = None
            words = (ncpu + 63) // 64
            mask = nvml.nvmlDeviceGetCpuAffinity(h, words)
            cpus = [w * 64 + b for w, word in enumerate(mask) for b in range(64)
                    if int(word) >> b & 1]
            out.gpus.append(Gpu(
                index=i, name=_text(nvml.nvmlDeviceGetName(h)), pci_bus_id=bus,
                numa_node=sysfs.pci_numa(root, bus, single), cpus=cpus,
                memory_mb=int(nvml.nvmlDeviceGetMemoryInfo(h).total) // 2**20, pcie_gen=gen,
            ))
        n = len(handles)
        index = {bus: i for i, bus in enumerate(buses)}
        direct = [[0] * n for _ in range(n)]
        to_switch = [0] * n  # links to an NVSwitch (a PCI id that is no GPU)
        for a in range(n):
            for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
                try:
                    if nvml.nvmlDeviceGetNvLinkState(handles[a], link) != 1:
                        continue
                    remote = normalize_bus_id(
                        _text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handles[a], link).busId))
                except Exception:  # noqa: BLE001 - no such link / NVLink not supported
                    continue
                if remote in index:
                    direct[a][index[remote]] += 1
                else:
                    to_switch[a] += 1
        for a in range(n):
            row = []
            for b in range(n):
                if a == b:
                    row.append("X")
                elif direct[a][b]:
                    row.append(f"NV{direct[a][b]}")
                elif to_switch[a] and to_switch[b]:
                    row.append(f"NV{min(to_switch[a], to_switch[b])}")
                else:
                    level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b])
                    row.append(_NVML_LEVEL.get(int(level), "SYS"))
            out.links.append(row)
    finally:
        nvml.nvmlShutdown()
    return out


# ------------------------------------------------------------------------ nvidia-smi


def _from_smi(run: Runner, root: Path, single: Optional[int]) -> _Gpus:
    """GPUs and links from ``nvidia-smi topo -m`` and ``--query-gpu``."""
    out = _Gpus("nvidia-smi")
    rc, text, err = run(TOPO_CMD)
    if rc != 0:
        raise RuntimeError(f"`{' '.join(TOPO_CMD)}` exited {rc}: {(err or text).strip()[:200]}")
    topo = parse_topo_matrix(text, f"`{' '.join(TOPO_CMD)}`")
    by_index, sysfs_bus = _query_smi(run, root, topo.num_gpus, out.warnings)
    for i in range(topo.num_gpus):
        q = by_index.get(i)
        bus = q.pci_bus_id if q and q.pci_bus_id else sysfs_bus.get(i)
        node = topo.numa_affinity[i]
        if node is None and bus is not None:
            node = sysfs.pci_numa(root, bus, single)
        out.gpus.append(Gpu(index=i, name=q.name if q else "", pci_bus_id=bus,
                            numa_node=node if node is not None else single,
                            cpus=topo.cpu_affinity[i], memory_mb=q.memory_mb if q else None,
                            pcie_gen=q.pcie_gen if q else None))
    out.links = topo.gpu_links
    out.nic_names, out.nic_links = topo.nic_names, topo.gpu_nic_links
    out.nic_named, out.inconsistencies = topo.nic_named, topo.inconsistencies
    if topo.nic_nic_links and all(topo.nic_nic_links):
        out.nic_nic = topo.nic_nic_links
    return out


def _query_smi(
    run: Runner, root: Path, num_gpus: int, warnings: list[str]
) -> tuple[dict[int, GpuQuery], dict[int, str]]:
    """``nvidia-smi --query-gpu`` by GPU index, and the PCI bus ids to use for the GPUs
    it gave none: a failed query (or one that misses GPUs or their bus ids) degrades to
    the bus ids sysfs lists, in bus order as nvidia-smi numbers them, when sysfs sees as
    many NVIDIA GPUs as the matrix, with a warning; output that does not parse is a
    TopologyError naming the command (as for ``topo -m``)."""
    cmd = f"`{' '.join(QUERY_CMD)}`"
    rc, text, err = run(QUERY_CMD)
    if rc != 0:
        by_index: dict[int, GpuQuery] = {}
        problem = f"{cmd} exited {rc}: {(err or text).strip()[:200]}"
    else:
        by_index = {q.index: q for q in parse_query_gpu(text, cmd)}
        lost = [i for i in range(num_gpus) if i not in by_index]
        no_bus = [i for i in range(num_gpus) if i in by_index and not by_index[i].pci_bus_id]
        problem = "; ".join(
            [f"{cmd}: no line for GPU {lost}"] * bool(lost)
            + [f"{cmd}: no PCI bus id for GPU {no_bus}"] * bool(no_bus)
        )
    if not problem:
        return by_index, {}
    buses = sysfs.nvidia_gpus(root)
    if len(buses) == num_gpus:
        warnings.append(f"{problem}; PCI bus ids from sysfs (bus order), "
                        "names and memory unknown")
        return by_index, dict(enumerate(buses))
    warnings.append(f"{problem}; names, memory and PCI bus ids unknown (sysfs lists "
                    f"{len(buses)} NVIDIA GPUs, the matrix {num_gpus})")
    return by_index, {}


def _from_pci(root: Path, single: Optional[int]) -> _Gpus:
    """NVIDIA PCI devices as sysfs lists them; links from PCI paths (NVLink unknown)."""
    out = _Gpus("sysfs")
    buses = sysfs.nvidia_gpus(root)
    paths = [sysfs.device_pci(root, sysfs.pci_device_dir(root, b)) for b in buses]
    for i, b in enumerate(buses):
        cpus = parse_cpulist(sysfs.read_text(sysfs.pci_device_dir(root, b) / "local_cpulist")
                              or "")
        out.gpus.append(Gpu(index=i, pci_bus_id=b, numa_node=sysfs.pci_numa(root, b, single),
                            cpus=cpus))
    out.links = [[_rel(paths[a], paths[b], out.gpus[a].numa_node, out.gpus[b].numa_node)
                  if a != b else "X" for b in range(len(buses))] for a in range(len(buses))]
    return out


def _rel(a: Optional[sysfs.PciPath], b: Optional[sysfs.PciPath], na: Optional[int],
         nb: Optional[int]) -> str:
    if a is None or b is None:
        return "NODE" if na is not None and na == nb else "SYS"
    rel = sysfs.pci_relation(a, b, na, nb)
    return "PIX" if rel == "X" else rel


def _nic_nic(matrix: list[list[str]], nics: list[Nic],
             paths: dict[str, sysfs.PciPath]) -> list[list[str]]:
    """NIC-to-NIC links: the matrix's where it has them, else from sysfs PCI paths (empty
    when neither covers a pair: unknown, rather than guessed)."""
    k = len(matrix)
    out = []
    for a, na in enumerate(nics):
        row = []
        for b, nb in enumerate(nics):
            if a == b:
                row.append("X")
            elif a < k and b < k:
                row.append(matrix[a][b])
            elif na.name in paths and nb.name in paths:
                row.append(_rel(paths[na.name], paths[nb.name], na.numa_node, nb.numa_node))
            else:
                return []
        out.append(row)
    return out


# -------------------------------------------------------------------------- assembly


def _import_nvml() -> Any:
    try:
        import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py, optional
    except ImportError:
        return None
    return pynvml


def discover(
    root: Union[str, Path] = "/",
    run: Optional[Runner] = None,
    nvml: Any = "auto",
    hostname: Optional[str] = None,
) -> Machine:
    """Discovers this machine.

    Args:
        root: filesystem root to read sysfs and /proc under (tests pass a tree).
        run: how to run tools (default :func:`run_command`); tests pass fakes.
        nvml: the ``pynvml`` module, None to skip NVML, ``"auto"`` to import it if present.
        hostname: override (default ``socket.gethostname()``).

    Returns:
        The :class:`Machine`; its ``warnings`` list what could not be seen.

    Raises:
        TopologyError: a tool ran but its output does not parse (names the command).
    """
    root = Path(root)
    run = run or run_command
    warnings: list[str] = []
    numa: list[NumaNode] = sysfs.numa_nodes(root)
    single = numa[0].id if len(numa) == 1 else None
    ncpu = max((c for n in numa for c in n.cpus), default=0) + 1
    nics, nic_paths = sysfs.nics(root, single)
    disks = sysfs.disks(root, single)
    sources = ["sysfs"]
    gpus: Optional[_Gpus] = None
    lib = _import_nvml() if nvml == "auto" else nvml
    if lib is not None:
        try:
            gpus = _from_nvml(lib, root, single, ncpu)
        except TopologyError:
            raise
        except Exception as e:  # noqa: BLE001 - no driver, no GPU, old library
            if sysfs.nvidia_gpus(root):  # a CPU box with nvidia-ml-py installed: nothing lost
                warnings.append(f"NVML (nvidia-ml-py) failed: {type(e).__name__}: {e}; "
                                "trying nvidia-smi")
    if gpus is None:
        try:
            gpus = _from_smi(run, root, single)
        except FileNotFoundError:
            if sysfs.nvidia_gpus(root):
                warnings.append("nvidia-smi not found (and NVML not available): GPUs from "
                                "sysfs PCI devices only; NVLink links unknown")
        except RuntimeError as e:
            warnings.append(f"{e}; GPUs from sysfs PCI devices only")
    if gpus is None:
        gpus = _from_pci(root, single)
    if gpus.gpus:
        sources.append(gpus.source)
    warnings += gpus.warnings
    # NICs: the tool's matrix order first, then what only sysfs shows.
    by_name = {n.name: n for n in nics}
    named = gpus.nic_named or [True] * len(gpus.nic_names)
    ordered: list[Nic] = [
        (by_name.pop(name) if ok and name in by_name else
         Nic(name=name, rdma=rdma_from_name(name) if ok else None, named=ok))
        for name, ok in zip(gpus.nic_names, named)]
    nics = ordered + [n for n in nics if n.name in by_name]
    gpu_nic: list[list[str]] = []
    gpu_paths = [sysfs.device_pci(root, sysfs.pci_device_dir(root, g.pci_bus_id))
                 if g.pci_bus_id else None for g in gpus.gpus]
    for i, g in enumerate(gpus.gpus):
        row = list(gpus.nic_links[i]) if gpus.nic_links else []
        for nic in nics[len(row):]:
            row.append(_rel(gpu_paths[i], nic_paths.get(nic.name), g.numa_node, nic.numa_node))
        gpu_nic.append(row)
    sockets, tpc = sysfs.cpu_topology(root)
    machine = Machine(
        hostname=hostname or socket.gethostname(), numa=numa, gpus=gpus.gpus, nics=nics,
        disks=disks, gpu_links=gpus.links, gpu_nic_links=gpu_nic if nics else [],
        sockets=sockets, threads_per_core=tpc, sources=sources, warnings=warnings,
        nic_nic_links=_nic_nic(gpus.nic_nic, nics, nic_paths),
        inconsistencies=gpus.inconsistencies,
    )
    assign_sockets(machine.numa, machine.sockets)
    return machine

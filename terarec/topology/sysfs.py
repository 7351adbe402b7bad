"""What Linux's sysfs (and ``/proc/mounts``) shows: NUMA nodes, PCI paths, NICs, disks.

Every function takes ``root`` (``/`` on a live machine, a directory tree in tests) and
reads only files; nothing is executed. PCI devices are located by the chain of bus ids in
their ``/sys/devices/pci<domain>:<bus>/...`` path, which gives the PCIe relation between
two devices the way ``nvidia-smi topo -m`` words it (:func:`pci_relation`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from terarec.topology.model import Disk, Nic, NumaNode, parse_cpulist

_BUS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_SKIP_BLOCK = re.compile(r"^(loop|ram|zram|sr|fd|nbd)\d*")


def read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


# ------------------------------------------------------------------------------- NUMA


def numa_nodes(root: Path) -> list[NumaNode]:
    """NUMA nodes with CPUs (``/sys/devices/system/node/node*/{cpulist,meminfo}``); one
    node 0 with the online CPUs when the kernel shows none."""
    base = root / "sys/devices/system/node"
    out = []
    for d in sorted(base.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpus = parse_cpulist(read_text(d / "cpulist") or "")
        if not cpus:
            continue
        mem = None
        m = re.search(r"MemTotal:\s*(\d+)\s*kB", read_text(d / "meminfo") or "")
        if m:
            mem = int(m.group(1)) // 1024
        out.append(NumaNode(int(d.name[4:]), cpus, mem))
    if not out:
        online = read_text(root / "sys/devices/system/cpu/online") or ""
        cpus = parse_cpulist(online) or list(range(os.cpu_count() or 1))
        out.append(NumaNode(0, cpus))
    return out


def cpu_topology(root: Path) -> tuple[Optional[int], Optional[int]]:
    """(sockets, threads per core) from ``/sys/devices/system/cpu/cpu*/topology``."""
    packages, widths = set(), set()
    for d in (root / "sys/devices/system/cpu").glob("cpu[0-9]*"):
        pkg = read_text(d / "topology/physical_package_id")
        sib = read_text(d / "topology/thread_siblings_list")
        if pkg is not None:
            packages.add(pkg)
        if sib:
            widths.add(len(parse_cpulist(sib)))
    return (len(packages) or None), (max(widths) if widths else None)


# -------------------------------------------------------------------------------- PCI


@dataclass(frozen=True)
class PciPath:
    """Where a PCI device sits: ``root`` (``pci0000:00``, a host bridge) and the chain of
    bus ids from the root port down to the device itself."""

    root: str
    chain: tuple[str, ...]

    @property
    def bus_id(self) -> str:
        return self.chain[-1]


def pci_path(real: Path) -> Optional[PciPath]:
    """The :class:`PciPath` of a resolved sysfs device path, None when it is not on PCI."""
    parts = real.parts
    for i, p in enumerate(parts):
        if p.startswith("pci") and re.fullmatch(r"pci[0-9a-f]{4}:[0-9a-f]{2}", p):
            chain = tuple(x for x in parts[i + 1:] if _BUS.match(x))
            return PciPath(p, chain) if chain else None
    return None


def pci_device_dir(root: Path, bus_id: str) -> Path:
    return root / "sys/bus/pci/devices" / bus_id


def pci_numa(root: Path, bus_id: str, single_node: Optional[int]) -> Optional[int]:
    """A PCI device's NUMA node (``-1`` -> the only node, if there is one)."""
    raw = read_text(pci_device_dir(root, bus_id) / "numa_node")
    if raw is not None and raw.lstrip("-").isdigit() and int(raw) >= 0:
        return int(raw)
    return single_node


def pci_relation(a: PciPath, b: PciPath, numa_a: Optional[int], numa_b: Optional[int]) -> str:
    """nvidia-smi's word for the PCIe path between two devices.

    Same device: X; different host bridges: NODE on one NUMA node, else SYS; one host
    bridge: PHB when their paths part at the root port, PIX when each is at most two hops
    (a switch's downstream port, then the device) below where they part, else PXB.
    """
    if a.chain == b.chain:
        return "X"
    if a.root != b.root:
        return "NODE" if numa_a is not None and numa_a == numa_b else "SYS"
    cp = 0
    while cp < min(len(a.chain), len(b.chain)) and a.chain[cp] == b.chain[cp]:
        cp += 1
    if cp == 0:
        return "PHB"
    return "PIX" if max(len(a.chain) - cp, len(b.chain) - cp) <= 2 else "PXB"


def device_pci(root: Path, sys_link: Path) -> Optional[PciPath]:
    """The :class:`PciPath` of the device behind a sysfs class entry (its ``device``)."""
    if not sys_link.exists():
        return None
    return pci_path(_real(sys_link))


def nvidia_gpus(root: Path) -> list[str]:
    """Bus ids of NVIDIA display / 3D controllers (vendor 0x10de, class 0x03xx)."""
    out = []
    for d in sorted((root / "sys/bus/pci/devices").glob("*")):
        cls = read_text(d / "class") or ""
        if read_text(d / "vendor") == "0x10de" and cls.startswith("0x03"):
            out.append(d.name)
    return out


# ------------------------------------------------------------------------------- NICs


def _rate_gbps(text: Optional[str]) -> Optional[float]:
    m = re.match(r"\s*([\d.]+)\s*Gb", text or "")
    return float(m.group(1)) if m else None


def nics(root: Path, single_node: Optional[int]) -> tuple[list[Nic], dict[str, PciPath]]:
    """RDMA devices (``/sys/class/infiniband``) and physical network interfaces that are
    not one's netdev (``/sys/class/net``, virtual ones and ``lo`` left out).

    Returns:
        (NICs, their PCI paths by NIC name).
    """
    out: list[Nic] = []
    paths: dict[str, PciPath] = {}
    taken: set[str] = set()
    for d in sorted((root / "sys/class/infiniband").glob("*")):
        netdevs = sorted(p.name for p in (d / "device/net").glob("*"))
        taken.update(netdevs)
        pp = device_pci(root, d / "device")
        rate = _rate_gbps(read_text(d / "ports/1/rate"))
        out.append(Nic(name=d.name, rdma=True, netdev=netdevs[0] if netdevs else None,
                       numa_node=pci_numa(root, pp.bus_id, single_node) if pp else single_node,
                       pci_bus_id=pp.bus_id if pp else None, rate_gbps=rate))
        if pp:
            paths[d.name] = pp
    for d in sorted((root / "sys/class/net").glob("*")):
        if d.name in taken or d.name == "lo" or not (d / "device").exists():
            continue
        real = _real(d)
        if "virtual" in real.parts:
            continue
        pp = device_pci(root, d / "device")
        speed = read_text(d / "speed")
        rate = int(speed) / 1000 if speed and speed.isdigit() and int(speed) > 0 else None
        out.append(Nic(name=d.name, rdma=False, netdev=d.name,
                       numa_node=pci_numa(root, pp.bus_id, single_node) if pp else single_node,
                       pci_bus_id=pp.bus_id if pp else None, rate_gbps=rate))
        if pp:
            paths[d.name] = pp
    return out, paths


# ------------------------------------------------------------------------------ disks


def _mounts(root: Path) -> list[tuple[str, str]]:
    """(device, mount point) of /proc/mounts' entries backed by a /dev block device."""
    text = read_text(root / "proc/mounts") or ""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].startswith("/dev/") and "ro" not in parts[3].split(","):
            out.append((parts[0], parts[1].replace("\\040", " ")))
    return out


def _disk_of(root: Path, dev: str) -> Optional[str]:
    """``/dev/nvme0n1p2`` -> ``nvme0n1``; ``/dev/mapper/vg-x`` -> ``dm-0``; None if unknown."""
    name = Path(os.path.realpath(dev)).name if root == Path("/") else Path(dev).name
    cls = root / "sys/class/block" / name
    if not cls.exists():
        return None
    if (cls / "partition").exists():
        return _real(cls).parent.name
    return name


def disks(root: Path, single_node: Optional[int]) -> list[Disk]:
    """Whole disks (NVMe, virtio, SATA, md / dm volumes) with their largest writable
    mount; loop, ram and optical devices left out; RAID / LVM members folded into the
    volume (its NUMA node: the members' when they agree)."""
    mounts: dict[str, list[str]] = {}
    for dev, mnt in _mounts(root):
        d = _disk_of(root, dev)
        if d is not None and not mnt.startswith("/boot"):
            mounts.setdefault(d, []).append(mnt)
    infos: dict[str, Disk] = {}
    members: dict[str, list[str]] = {}
    for d in sorted((root / "sys/block").glob("*")):
        if _SKIP_BLOCK.match(d.name):
            continue
        pp = pci_path(_real(d))
        size = read_text(d / "size")
        slaves = sorted(p.name for p in (d / "slaves").glob("*"))
        members[d.name] = slaves
        infos[d.name] = Disk(
            name=d.name, nvme=d.name.startswith("nvme"),
            numa_node=pci_numa(root, pp.bus_id, single_node) if pp else single_node,
            size_gb=round(int(size) * 512 / 1e9, 1) if size and size.isdigit() else None,
            pci_bus_id=pp.bus_id if pp else None,
        )
    used: set[str] = set()
    for name, slaves in members.items():
        if not slaves:
            continue
        parts = [_disk_of(root, f"/dev/{s}") or s for s in slaves]
        inner = [infos[p] for p in parts if p in infos]
        used.update(p for p in parts)
        disk = infos[name]
        disk.members = sorted(set(parts))
        disk.nvme = bool(inner) and all(x.nvme for x in inner)
        nodes = {x.numa_node for x in inner}
        disk.numa_node = nodes.pop() if len(nodes) == 1 else None
    out = []
    for name, disk in infos.items():
        mnts = mounts.get(name, [])
        if mnts:
            disk.mount = max(mnts, key=lambda m: (_fs_size(root, m), -len(m)))
        if name in used and disk.mount is None:
            continue  # a RAID member: the volume stands for it
        out.append(disk)
    return out


def _fs_size(root: Path, mount: str) -> int:
    try:
        st = os.statvfs(str(root / mount.lstrip("/")))
    except OSError:
        return 0
    return st.f_blocks * st.f_frsize

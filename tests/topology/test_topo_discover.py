"""Discovery on a fake sysfs tree: NVML, nvidia-smi, sysfs-only fallback, bad tool output;
and on this machine (GPU-less)."""

from __future__ import annotations

import os
import types
from collections.abc import Sequence
from pathlib import Path

import pytest

from terarec.topology import sysfs
from terarec.topology.discover import QUERY_CMD, TOPO_CMD, discover
from terarec.topology.model import TopologyError
from terarec.topology.plan import make_plan

GPU0, GPU1, NIC, GPU2, NVME = ("0000:03:00.0", "0000:04:00.0", "0000:05:00.0",
                               "0000:81:00.0", "0000:82:00.0")
DEVS = {  # bus id -> (path under sys/devices, vendor, class, numa)
    GPU0: ("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0", "0x10de",
           "0x030200", 0),
    GPU1: ("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0", "0x10de",
           "0x030200", 0),
    NIC: ("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:02.0/0000:05:00.0", "0x15b3",
          "0x020700", 0),
    "0000:00:03.0": ("pci0000:00/0000:00:03.0", "0x1af4", "0x020000", 0),
    GPU2: ("pci0000:80/0000:80:01.0/0000:81:00.0", "0x10de", "0x030200", 1),
    NVME: ("pci0000:80/0000:80:02.0/0000:82:00.0", "0x144d", "0x010802", 1),
}


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, link.parent), link)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_tree(root: Path) -> Path:
    """Two sockets of 4 CPUs; GPU0, GPU1 and an mlx5 NIC behind one PCIe switch on
    socket 0, GPU2 and an NVMe (in md0, mounted on /data) on socket 1, a virtio NIC."""
    s = root / "sys"
    for n, cpus in ((0, "0-3"), (1, "4-7")):
        _write(s / f"devices/system/node/node{n}/cpulist", cpus)
        _write(s / f"devices/system/node/node{n}/meminfo", f"Node {n} MemTotal: 2097152 kB\n")
    for c in range(8):
        _write(s / f"devices/system/cpu/cpu{c}/topology/physical_package_id", str(c // 4))
        _write(s / f"devices/system/cpu/cpu{c}/topology/thread_siblings_list", str(c))
    for bus, (path, vendor, cls, numa) in DEVS.items():
        d = s / "devices" / path
        _write(d / "vendor", vendor)
        _write(d / "class", cls)
        _write(d / "numa_node", str(numa))
        _write(d / "local_cpulist", "0-3" if numa == 0 else "4-7")
        _link(s / "bus/pci/devices" / bus, d)
    nic = s / "devices" / DEVS[NIC][0]
    ib = s / "class/infiniband/mlx5_0"
    ib.mkdir(parents=True)
    _link(ib / "device", nic)
    _write(ib / "ports/1/rate", "200 Gb/sec (4X HDR)")
    (nic / "net/ib0").mkdir(parents=True)
    _link(nic / "net/ib0/device", nic)
    _link(s / "class/net/ib0", nic / "net/ib0")
    virtio = s / "devices" / DEVS["0000:00:03.0"][0]
    (virtio / "net/eth0").mkdir(parents=True)
    _link(virtio / "net/eth0/device", virtio)
    _write(virtio / "net/eth0/speed", "10000")
    _link(s / "class/net/eth0", virtio / "net/eth0")
    (s / "devices/virtual/net/lo").mkdir(parents=True)
    _link(s / "class/net/lo", s / "devices/virtual/net/lo")
    nvme = s / "devices" / DEVS[NVME][0] / "nvme/nvme0/nvme0n1"
    _write(nvme / "size", str(3840 * 10**9 // 512))
    md = s / "devices/virtual/block/md0"
    _write(md / "size", str(3840 * 10**9 // 512))
    _link(md / "slaves/nvme0n1", nvme)
    vda = s / "devices/pci0000:00/0000:00:04.0/virtio1/block/vda"
    _write(vda / "size", str(100 * 10**9 // 512))
    (s / "devices/virtual/block/loop0").mkdir(parents=True)
    for name, target in (("nvme0n1", nvme), ("md0", md), ("vda", vda),
                         ("loop0", s / "devices/virtual/block/loop0")):
        _link(s / "block" / name, target)
        _link(s / "class/block" / name, target)
    _write(root / "proc/mounts", "/dev/md0 /data ext4 rw,relatime 0 0\n"
           "/dev/vda / ext4 rw 0 0\n/dev/loop0 /snap squashfs ro 0 0\nproc /proc proc rw 0 0\n")
    return root


def no_tools(argv: Sequence[str]) -> tuple[int, str, str]:
    raise FileNotFoundError(argv[0])


SMI_TOPO = """\tGPU0\tGPU1\tGPU2\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV4\tSYS\tPIX\t0-3\t0\t\tN/A
GPU1\tNV4\t X \tSYS\tPIX\t0-3\t0\t\tN/A
GPU2\tSYS\tSYS\t X \tSYS\t4-7\t1\t\tN/A
NIC0\tPIX\tPIX\tSYS\t X

NIC Legend:

  NIC0: mlx5_0
"""
SMI_QUERY = (f"0, NVIDIA A100-SXM4-80GB, 0000{GPU0.upper()}, 81920, 4\n"
             f"1, NVIDIA A100-SXM4-80GB, 0000{GPU1.upper()}, 81920, 4\n"
             f"2, NVIDIA A100-SXM4-80GB, 0000{GPU2.upper()}, 81920, 4\n")


def smi(topo: str = SMI_TOPO, rc: int = 0, query: str = SMI_QUERY,  # noqa: ANN201
        query_rc: int = 0):
    def run(argv: Sequence[str]) -> tuple[int, str, str]:
        if tuple(argv) == TOPO_CMD:
            return rc, topo, "" if rc == 0 else "NVIDIA-SMI has failed"
        assert tuple(argv) == QUERY_CMD
        return query_rc, query, "" if query_rc == 0 else "Driver/library version mismatch"
    return run


def test_sysfs_only(tmp_path: Path) -> None:
    m = discover(make_tree(tmp_path), run=no_tools, nvml=None, hostname="box")
    assert [n.id for n in m.numa] == [0, 1] and m.numa[0].memory_mb == 2048
    assert m.sockets == 2 and m.threads_per_core == 1 and [n.socket for n in m.numa] == [0, 1]
    assert [g.pci_bus_id for g in m.gpus] == [GPU0, GPU1, GPU2]
    assert [g.numa_node for g in m.gpus] == [0, 0, 1] and m.gpus[2].cpus == [4, 5, 6, 7]
    # one switch for GPU0/GPU1/NIC: PIX; across host bridges on two nodes: SYS
    assert m.gpu_links == [["X", "PIX", "SYS"], ["PIX", "X", "SYS"], ["SYS", "SYS", "X"]]
    assert [(n.name, n.rdma, n.netdev, n.rate_gbps) for n in m.nics] == \
        [("mlx5_0", True, "ib0", 200.0), ("eth0", False, "eth0", 10.0)]
    assert m.gpu_nic_links == [["PIX", "PHB"], ["PIX", "PHB"], ["SYS", "SYS"]]
    assert [(d.name, d.nvme, d.numa_node, d.mount, d.members) for d in m.disks] == \
        [("md0", True, 1, "/data", ["nvme0n1"]), ("vda", False, None, "/", [])]
    assert m.warnings == ["nvidia-smi not found (and NVML not available): GPUs from sysfs "
                          "PCI devices only; NVLink links unknown"]
    plan = make_plan(m)
    assert [r.nic for r in plan.ranks] == ["mlx5_0"] * 3
    assert plan.fast_groups == [[0, 1], [2]]  # no NVLink known: by socket
    assert all(r.ssd_dir == "/data/terarec-ssd" for r in plan.ranks)
    assert any("GPU2: nearest NIC mlx5_0 is across sockets" in w for w in plan.warnings)
    assert any("GPU0: SSD tier on md0 (NUMA 1), a remote-socket disk" in w
               for w in plan.warnings)


def test_nvidia_smi(tmp_path: Path) -> None:
    m = discover(make_tree(tmp_path), run=smi(), nvml=None, hostname="box")
    assert m.sources == ["sysfs", "nvidia-smi"] and m.warnings == []
    assert [g.name for g in m.gpus] == ["NVIDIA A100-SXM4-80GB"] * 3
    assert m.gpus[1].pci_bus_id == GPU1 and m.gpus[0].pcie_gen == 4
    assert m.gpu_links[0][1] == "NV4"
    assert [n.name for n in m.nics] == ["mlx5_0", "eth0"]  # the matrix's, then sysfs's
    assert m.nics[0].rate_gbps == 200.0  # details of a matrix NIC from sysfs
    assert m.gpu_nic_links[0] == ["PIX", "PHB"]  # eth0's link from PCI paths
    assert make_plan(m).fast_groups == [[0, 1], [2]]  # the NVLink island
    # NIC-NIC: the matrix's, and eth0's from the PCI paths
    assert m.nic_nic_links == [["X", "PHB"], ["PHB", "X"]] and m.inconsistencies == []


def test_nvidia_smi_without_a_nic_legend(tmp_path: Path) -> None:
    """A matrix NIC the legend does not name (and sysfs cannot match) stays unnamed and is
    not pinned; the sysfs NIC keeps its own name."""
    topo = SMI_TOPO.split("NIC Legend:")[0]
    m = discover(make_tree(tmp_path), run=smi(topo=topo), nvml=None, hostname="box")
    assert [(n.name, n.named, n.rdma) for n in m.nics] == [
        ("NIC0", False, None), ("mlx5_0", True, True), ("eth0", True, False)]
    plan = make_plan(m)
    assert all(r.env.get("NCCL_IB_HCA") != "=NIC0" for r in plan.ranks)


def test_bad_or_failing_nvidia_smi(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    with pytest.raises(TopologyError, match=r"^`nvidia-smi topo -m`: no GPU matrix found"):
        discover(root, run=smi(topo="garbage\n"), nvml=None)
    with pytest.raises(TopologyError, match=r"`nvidia-smi topo -m`: row GPU0, column GPU1"):
        discover(root, run=smi(topo=SMI_TOPO.replace("NV4", "NVL", 1)), nvml=None)
    m = discover(root, run=smi(rc=9), nvml=None)
    assert m.warnings == ["`nvidia-smi topo -m` exited 9: NVIDIA-SMI has failed; GPUs from "
                          "sysfs PCI devices only"]
    assert len(m.gpus) == 3 and m.gpu_links[0][1] == "PIX"


QUERY = "`" + " ".join(QUERY_CMD) + "`"


def test_failing_nvidia_smi_query(tmp_path: Path) -> None:
    """``--query-gpu`` failing after a good ``topo -m``: a warning naming the command and
    its error; the matrix's GPUs and links are kept, their bus ids come from sysfs."""
    root = make_tree(tmp_path)
    m = discover(root, run=smi(query_rc=6), nvml=None)
    assert m.warnings == [f"{QUERY} exited 6: Driver/library version mismatch; PCI bus ids "
                          "from sysfs (bus order), names and memory unknown"]
    assert m.sources == ["sysfs", "nvidia-smi"] and m.gpu_links[0][1] == "NV4"
    assert [g.pci_bus_id for g in m.gpus] == [GPU0, GPU1, GPU2]
    assert [g.name for g in m.gpus] == [""] * 3 and m.gpus[0].memory_mb is None
    assert m.gpu_nic_links[0] == ["PIX", "PHB"]  # eth0's link from the sysfs bus id
    # a line missing (here GPU2's) or a bus id that is none: the same, for those GPUs
    m = discover(root, run=smi(query=SMI_QUERY.rsplit("2,", 1)[0]), nvml=None)
    assert m.warnings == [f"{QUERY}: no line for GPU [2]; PCI bus ids from sysfs (bus "
                          "order), names and memory unknown"]
    assert m.gpus[1].name == "NVIDIA A100-SXM4-80GB" and m.gpus[2].pci_bus_id == GPU2
    m = discover(root, run=smi(query=SMI_QUERY.replace(f"0000{GPU1.upper()}", "N/A")),
                 nvml=None)
    assert m.warnings == [f"{QUERY}: no PCI bus id for GPU [1]; PCI bus ids from sysfs "
                          "(bus order), names and memory unknown"]
    assert [g.pci_bus_id for g in m.gpus] == [GPU0, GPU1, GPU2]
    # output that does not parse is an error naming the command, as for `topo -m`
    with pytest.raises(TopologyError, match=r"nvidia-smi --query-gpu=.*: line 1: 'garbage'"):
        discover(root, run=smi(query="garbage\n"), nvml=None)
    # sysfs sees another number of GPUs: no bus ids to trust, said so
    (root / "sys/bus/pci/devices" / GPU2).unlink()
    m = discover(root, run=smi(query_rc=6), nvml=None)
    assert m.warnings == [f"{QUERY} exited 6: Driver/library version mismatch; names, "
                          "memory and PCI bus ids unknown (sysfs lists 2 NVIDIA GPUs, the "
                          "matrix 3)"]
    assert [g.pci_bus_id for g in m.gpus] == [None] * 3 and m.gpu_links[0][1] == "NV4"

class _Pci:
    def __init__(self, bus: str) -> None:
        self.busId = bus.encode()  # older pynvml returns bytes


def fake_nvml(fail: bool = False) -> types.SimpleNamespace:
    """GPU0 and GPU1 joined by 4 NVLinks, GPU2 by 2 links to an NVSwitch (no GPU peer)."""
    buses = [GPU0, GPU1, GPU2]
    links = {0: [GPU1] * 4, 1: [GPU0] * 4, 2: ["0000:99:00.0"] * 2}

    def init() -> None:
        if fail:
            raise RuntimeError("NVML Shared Library Not Found")

    return types.SimpleNamespace(
        NVML_NVLINK_MAX_LINKS=6,
        nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 3,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetPciInfo=lambda h: _Pci(buses[h].upper()),
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMaxPcieLinkGeneration=lambda h: 5,
        nvmlDeviceGetCpuAffinity=lambda h, n: [0x0F if h < 2 else 0xF0],
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 * 2**30),
        nvmlDeviceGetNvLinkState=lambda h, link: 1 if link < len(links[h]) else 0,
        nvmlDeviceGetNvLinkRemotePciInfo=lambda h, link: _Pci(links[h][link]),
        nvmlDeviceGetTopologyCommonAncestor=lambda a, b: 50,
    )


def test_nvml(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    m = discover(root, run=no_tools, nvml=fake_nvml(), hostname="box")
    assert m.sources == ["sysfs", "nvml"]
    assert m.gpu_links == [["X", "NV4", "SYS"], ["NV4", "X", "SYS"], ["SYS", "SYS", "X"]]
    assert [g.cpus for g in m.gpus] == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7]]
    assert m.gpus[0].memory_mb == 81920 and m.gpus[2].numa_node == 1
    assert m.gpu_nic_links[0] == ["PIX", "PHB"]  # NICs from sysfs PCI paths
    m = discover(root, run=smi(), nvml=fake_nvml(fail=True))  # falls back to nvidia-smi
    assert m.sources == ["sysfs", "nvidia-smi"]
    assert m.warnings[0].startswith("NVML (nvidia-ml-py) failed: RuntimeError: NVML Shared")
    cpu_box = tmp_path / "cpu-box"  # nvidia-ml-py installed, no GPU, no driver: no warning
    _write(cpu_box / "sys/devices/system/node/node0/cpulist", "0-3")
    m = discover(cpu_box, run=no_tools, nvml=fake_nvml(fail=True), hostname="cpu")
    assert m.gpus == [] and m.warnings == [] and m.sources == ["sysfs"]


def test_pci_relation_words() -> None:
    a = sysfs.PciPath("pci0000:00", ("0000:00:01.0", "0000:01:00.0", "0000:02:00.0",
                                     "0000:03:00.0"))
    b = sysfs.PciPath("pci0000:00", ("0000:00:01.0", "0000:01:00.0", "0000:02:08.0",
                                     "0000:0a:00.0", "0000:0b:00.0", "0000:0c:00.0"))
    c = sysfs.PciPath("pci0000:00", ("0000:00:02.0", "0000:05:00.0"))
    d = sysfs.PciPath("pci0000:40", ("0000:40:01.0", "0000:41:00.0"))
    assert sysfs.pci_relation(a, a, 0, 0) == "X"
    assert sysfs.pci_relation(a, b, 0, 0) == "PXB"  # a second switch below the first
    assert sysfs.pci_relation(a, c, 0, 0) == "PHB"  # part at the root port
    assert sysfs.pci_relation(a, d, 0, 0) == "NODE" and sysfs.pci_relation(a, d, 0, 1) == "SYS"


def test_this_machine() -> None:
    m = discover()  # whatever this is: it must not fail, and must see its CPUs
    assert m.numa and all(n.cpus for n in m.numa)
    assert len(m.gpu_links) == len(m.gpus)
    plan = make_plan(m)
    assert plan.ranks and plan.ranks[0].cpus

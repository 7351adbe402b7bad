"""Parsing: the 18 real ``nvidia-smi topo -m`` captures, fixtures, saved JSON, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from terarec.topology.facts import load_fixture, machine_from_text, machine_to_fixture
from terarec.topology.model import (
    TopologyError,
    format_cpulist,
    load_machine,
    machine_from_dict,
    machine_to_dict,
    machine_to_json,
    normalize_relation,
    parse_cpulist,
    relation_rank,
)
from terarec.topology.smi import normalize_bus_id, parse_query_gpu, parse_topo_matrix

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
CAPTURES = FIXTURES / "captures"  # verbatim copies of the real captures, with provenance

# file prefix -> (GPUs, NICs in the matrix, NUMA nodes with CPUs seen)
REAL = {
    "cloudvm-4gpu-h100": (4, 0, 1),
    "dgx-a100": (8, 10, 8),
    "dgx-h200-12nic": (8, 12, 2),
    "dgx1-v100": (8, 4, 2),
    "gh200-1gpu-4nic": (1, 4, 1),
    "hgx-a100-4gpu-nv4-nps4": (4, 2, 4),
    "hgx-a100-4gpu-nv4__": (4, 1, 2),
    "hgx-a100-4nic-asym": (8, 4, 2),
    "hgx-b300-9nic": (8, 9, 2),
    "hgx-h100-11nic": (8, 11, 2),
    "pcie-2gpu-a100-della": (2, 2, 2),
    "pcie-4gpu-a100-adroit": (4, 1, 2),
    "pcie-4gpu-rtx6000ada": (4, 4, 2),
    "pcie-8gpu-pixpxb-2x4": (8, 0, 1),
    "pcie-8gpu-rtx4090-48g": (8, 0, 2),
    "pcie-8gpu-rtx4090-pixswitch": (8, 1, 2),
    "power9-4gpu-v100-nvlinkpairs": (4, 4, 2),
    "v100-sxm2-8gpu-cubemesh-2nic": (8, 2, 2),
}


def _capture(prefix: str) -> Path:
    found = sorted(CAPTURES.glob(f"{prefix}*.txt"))
    assert found, f"no capture {prefix}* in {CAPTURES}"
    return found[0]


def test_every_capture_is_listed() -> None:
    files = sorted(p.name for p in CAPTURES.glob("*.txt"))
    assert len(files) == 18
    assert all(any(f.startswith(k) for k in REAL) for f in files)


@pytest.mark.parametrize("prefix", sorted(REAL))
def test_real_capture_parses(prefix: str) -> None:
    gpus, nics, nodes = REAL[prefix]
    m = load_fixture(_capture(prefix))
    assert len(m.gpus) == gpus and len(m.nics) == nics and len(m.numa) == nodes
    n = len(m.gpus)
    for i in range(n):
        assert m.gpu_links[i][i] == "X"
        for j in range(n):
            assert m.gpu_links[i][j] == m.gpu_links[j][i], (i, j)  # symmetric
            relation_rank(m.gpu_links[i][j])  # a known word
    assert all(len(row) == nics for row in m.gpu_nic_links) and len(m.gpu_nic_links) == (
        n if nics else 0)
    # every GPU's CPU affinity lies inside its NUMA node (where both are known)
    for g in m.gpus:
        if g.numa_node is not None and g.cpus:
            assert set(g.cpus) <= set(m.node(g.numa_node).cpus)
    # JSON round trip
    assert machine_to_dict(machine_from_dict(json.loads(machine_to_json(m)))) == \
        machine_to_dict(m)


def test_real_capture_details() -> None:
    dgx = load_fixture(_capture("dgx-a100"))
    assert [g.numa_node for g in dgx.gpus] == [3, 3, 1, 1, 7, 7, 5, 5]
    assert dgx.sockets == 2 and [n.socket for n in dgx.numa] == [0] * 4 + [1] * 4
    assert dgx.gpu_nic_links[0][:3] == ["PXB", "PXB", "SYS"]
    assert [n.name for n in dgx.nics][-2:] == ["mlx5_8", "mlx5_9"]
    b300 = load_fixture(_capture("hgx-b300"))  # ANSI escapes in the header
    assert b300.nics[8].name == "mlx5_bond_0" and b300.gpu_links[0][1] == "NV18"
    mesh = load_fixture(_capture("v100-sxm2"))  # hand-mangled whitespace
    assert mesh.gpu_links[0][:8] == ["X", "NV1", "NV2", "NV1", "SYS", "SYS", "SYS", "NV2"]
    assert mesh.gpu_nic_links[2] == ["PIX", "SYS"]
    dgx1 = load_fixture(_capture("dgx1-v100"))  # no NUMA column: nodes from CPU affinity
    assert [g.numa_node for g in dgx1.gpus] == [0] * 4 + [1] * 4
    assert [n.name for n in dgx1.nics] == ["mlx5_0", "mlx5_2", "mlx5_1", "mlx5_3"]
    p9 = load_fixture(_capture("power9"))  # node ids 0 and 8, SMT4
    assert [n.id for n in p9.numa] == [0, 8] and p9.threads_per_core == 4
    gh = load_fixture(_capture("gh200"))  # GPU NUMA ID 1, CPU node 0
    assert gh.gpus[0].numa_node == 0
    pix = load_fixture(_capture("pcie-8gpu-pixpxb"))  # NUMA Affinity N/A
    assert all(g.numa_node == 0 for g in pix.gpus) and len(pix.numa[0].cpus) == 96


def test_named_fixtures_load_and_round_trip() -> None:
    names = sorted(p.stem for p in FIXTURES.glob("*.topo"))
    assert names == ["cpu-box", "dgx-h200-nvswitch", "h100-vm-captured", "h200-vm",
                     "pcie-4gpu-workstation", "pcie-8gpu-2x4-switch", "pcie-8gpu-allsys"]
    for name in names:
        m = load_fixture(FIXTURES / f"{name}.topo")
        again = machine_from_text(machine_to_fixture(m), name)
        a, b = machine_to_dict(m), machine_to_dict(again)
        assert {k: v for k, v in a.items() if k != "sources"} == \
            {k: v for k, v in b.items() if k != "sources"}
    h100 = load_fixture(FIXTURES / "h100-vm-captured.topo")  # the device machine, as captured
    assert [g.name for g in h100.gpus] == ["NVIDIA H100 80GB HBM3"]
    assert len(h100.numa) == 1 and len(h100.numa[0].cpus) == 16
    dgx = load_fixture(FIXTURES / "dgx-h200-nvswitch.topo")
    assert len(dgx.gpus) == 8 and len(dgx.nics) == 12 and dgx.gpus[0].pcie_gen == 5
    assert sum(n.rate_gbps == 400 for n in dgx.nics) == 8
    raid = next(d for d in dgx.disks if d.mount == "/raid")
    assert raid.numa_node is None and len(raid.members) == 8
    cpu = load_fixture(FIXTURES / "cpu-box.topo")
    assert not cpu.gpus and cpu.nics[0].name == "eth0" and not cpu.nics[0].rdma


def test_small_parsers() -> None:
    assert parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("N/A") == [] and format_cpulist([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    with pytest.raises(ValueError, match="not a CPU list"):
        parse_cpulist("0-x")
    assert normalize_relation(" X ") == "X" and normalize_relation("SOC") == "SYS"
    with pytest.raises(ValueError, match="not a link"):
        normalize_relation("FOO")
    assert normalize_bus_id("00000000:0A:00.0") == "0000:0a:00.0"
    q = parse_query_gpu("0, NVIDIA H200, 00000000:18:00.0, 143771, 5\n")
    assert q[0].name == "NVIDIA H200" and q[0].pci_bus_id == "0000:18:00.0" and q[0].pcie_gen == 5


def test_unparsable_tool_output_names_the_source() -> None:
    with pytest.raises(TopologyError, match=r"^nvidia-smi topo -m: no GPU matrix found"):
        parse_topo_matrix("NVIDIA-SMI has failed because it couldn't communicate\n")
    with pytest.raises(TopologyError, match=r"`cmd`: row GPU1, column GPU0: 'NVX' is not"):
        parse_topo_matrix("\tGPU0\tGPU1\nGPU0\t X \tNV1\nGPU1\tNVX\t X \n", "`cmd`")
    with pytest.raises(TopologyError, match=r"x: header .*: column\(s\) mlx5_0 given twice"):
        parse_topo_matrix("\tGPU0\tmlx5_0\tmlx5_0\nGPU0\t X \tPIX\tPIX\n", "x")
    with pytest.raises(TopologyError, match="no row for GPU1"):
        parse_topo_matrix("\tGPU0\tGPU1\nGPU0\t X \tNV1\n", "x")
    with pytest.raises(TopologyError, match="line: line 1: 'a': expected 5 fields"):
        parse_query_gpu("a\n", "line")
    with pytest.raises(TopologyError, match=r"q: line 1: index 'x' is not a number"):
        parse_query_gpu("x, b, c, d, e\n", "q")


def test_bad_fixture_names_file_section_and_line(tmp_path: Path) -> None:
    good = (FIXTURES / "h200-vm.topo").read_text()
    cases = {
        "[nics]\n# name kind\neth0 wifi 0 eth0 -\n": r"\[nics\] line 2: kind 'wifi'",
        "[disks]\nvda disk zero / 5 -\n": r"\[disks\] line 1: 'zero' is not a number",
        "[host]\nsockets = two\n": r"\[host\] line 1: sockets = 'two' is not int",
        "[bogus]\n": r"line 1: unknown section \[bogus\]",
        "[numa]\nnothing here\n": r"\[numa\] lists no node",
    }
    for text, match in cases.items():
        f = tmp_path / "bad.topo"
        f.write_text(text)
        with pytest.raises(TopologyError, match=f"^{f}: .*" + match):
            load_fixture(f)
    f = tmp_path / "twice.topo"
    f.write_text(good + "\n[numa]\nnode 0 cpus: 0\n")
    with pytest.raises(TopologyError, match="section \\[numa\\] given twice"):
        load_fixture(f)


def test_malformed_saved_topology_names_the_file(tmp_path: Path) -> None:
    m = load_fixture(FIXTURES / "h200-vm.topo")
    good = machine_to_dict(m)
    f = tmp_path / "m.json"
    f.write_text("{not json")
    with pytest.raises(TopologyError, match=f"^{f}: not valid JSON: .* line 1 column 2"):
        load_machine(f)
    for mutate, match in [
        (lambda d: d["gpus"][0].update(numa_node="zero"), r"gpus\[0\]\.numa_node: expected"),
        (lambda d: d.update(colour="red"), r"unknown key\(s\) \['colour'\]"),
        (lambda d: d["gpu_links"][0].__setitem__(1, "NVLINK"), r"gpu_links\[0\]\[1\]"),
        (lambda d: d["gpu_links"].pop(), "gpu_links: must be 2x2"),
        (lambda d: d.pop("hostname"), "hostname: missing"),
        (lambda d: d.update(schema="other/9"), "schema: 'other/9'"),
        (lambda d: d["nics"][0].pop("name"), r"nics\[0\]\.name: missing"),
        (lambda d: d["gpus"][0].update(numa_node=3), r"gpus\[0\]\.numa_node: 3 is not in"),
        (lambda d: d.update(numa=[]), r"gpus\[0\]\.numa_node: 0 is not in numa \[\]"),
    ]:
        d = json.loads(json.dumps(good))
        mutate(d)
        f.write_text(json.dumps(d))
        with pytest.raises(TopologyError, match=f"^{f}: machine.*" + match):
            load_machine(f)
    with pytest.raises(TopologyError, match="cannot read"):
        load_machine(tmp_path / "missing.json")
    f.write_text(json.dumps({"machine": good, "plan": {}}))  # a whole --json document
    assert load_machine(f).hostname == "h200-vm"

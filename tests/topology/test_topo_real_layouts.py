"""The plan on every real server layout: more or fewer ranks than GPUs, facts a capture
does not hold, contradictory input. Every machine here is a real ``nvidia-smi topo -m``
capture (``fixtures/captures``) or built from one (``fixtures/variants``, the fixtures
named below; each file says what was changed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from terarec.topology.cli import main
from terarec.topology.cost import StepLoad, estimate
from terarec.topology.facts import load_fixture, machine_from_text, machine_to_fixture
from terarec.topology.model import TopologyError
from terarec.topology.plan import make_plan
from terarec.topology.report import format_cost

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CAPTURES = sorted((FIXTURES / "captures").glob("*.txt"))
VARIANTS = FIXTURES / "variants"


def capture(prefix: str):  # noqa: ANN201
    found = [p for p in CAPTURES if p.name.startswith(prefix)]
    assert found, prefix
    return load_fixture(found[0])


def _gpus(path: Path) -> int:
    return len(load_fixture(path).gpus)


CASES = [(p, n) for p in [*CAPTURES, *sorted(VARIANTS.glob("*.txt")),
                          FIXTURES / "pcie-8gpu-allsys.topo"]
         for n in sorted({1, 2, 3, _gpus(p), 2 * _gpus(p)})]


# every shared capture (and the variants built from them) with N in {1, 2, 3, GPUs, 2xGPUs}
@pytest.mark.parametrize("path, nproc", CASES, ids=[f"{p.name.split('__')[0]}-{n}"
                                                    for p, n in CASES])
def test_every_capture_plans_or_says_why_in_one_line(
        path: Path, nproc: int, capsys: pytest.CaptureFixture[str]) -> None:
    """``terarec-topo --from F --nproc N``: a plan (0), or one clean line (2); never a
    traceback, in every output mode."""
    for mode in ([], ["--json"], ["--check"]):
        rc = main(["--from", str(path), "--nproc", str(nproc), *mode])
        out, err = capsys.readouterr()
        if rc == 2:
            assert err.startswith("terarec-topo: error: ") and err.count("\n") == 1, err
            assert nproc > _gpus(path) and "NCCL cannot put two ranks" in err
        else:
            assert rc in ((0, 1) if mode == ["--check"] else (0,)), err
            assert out


def test_more_ranks_than_gpus_depends_on_the_backend(
        capsys: pytest.CaptureFixture[str]) -> None:
    path = next(p for p in CAPTURES if p.name.startswith("dgx-a100"))
    assert main(["--from", str(path), "--nproc", "16"]) == 2
    assert capsys.readouterr().err == (
        "terarec-topo: error: nproc: 16 ranks on 8 GPU(s): NCCL cannot put two ranks of one "
        "communicator on one GPU (plan at most 8, or use the gloo backend to share GPUs)\n")
    for mode in ([], ["--json"], ["--check"]):
        assert main(["--from", str(path), "--nproc", "16", "--backend", "gloo", *mode]) in (0, 1)
    out = capsys.readouterr().out
    assert "16 ranks on 8 GPU(s) (gloo): local rank i shares GPU i % 8" in out
    plan = make_plan(load_fixture(path), 16, backend="gloo")
    assert [r.gpu for r in plan.ranks] == list(range(8)) * 2
    est = estimate(load_fixture(path), plan)  # the naive placement shares GPUs the same way
    assert est.naive["host"].seconds > 0


def test_a_nic_the_legend_does_not_name_is_never_pinned(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The DGX H200 capture with its NIC legend cut after NIC8: NIC9-11 have no name."""
    path = VARIANTS / "dgx-h200-12nic-legend-cut.txt"
    m = load_fixture(path)
    plan = make_plan(m)
    assert all("NCCL_IB_HCA" not in r.env for r in plan.ranks[5:])  # no NCCL_IB_HCA==NIC9
    assert plan.ranks[4].env["NCCL_IB_HCA"] == "=mlx5_6"
    assert [r.nic for r in plan.ranks[5:]] == ["NIC9", "NIC10", "NIC11"]
    assert [(n.name, n.named, n.rdma) for n in m.nics[8:]] == [
        ("mlx5_8", True, True), ("NIC9", False, None), ("NIC10", False, None),
        ("NIC11", False, None)]
    assert "NIC9: device name unknown (the input's NIC legend does not name it, or gives its " \
        "name to two NICs): no NCCL NIC variable set for GPU5 (NCCL chooses its NICs)" \
        in plan.warnings
    assert main(["--from", str(path), "--fixture"]) == 0
    text = capsys.readouterr().out
    assert "NIC9:" not in text and "mlx5_8" in text  # no made-up legend entry
    assert "\nNIC9  -  1  -  -\n" in text  # kind unknown, the node the matrix shows
    again = machine_from_text(text, "again")
    assert [(n.name, n.named, n.rdma) for n in again.nics[9:]] == [
        ("NIC9", False, None), ("NIC10", False, None), ("NIC11", False, None)]
    assert again.nic_nic_links == m.nic_nic_links  # the NIC rows survive the round trip


def test_sys_alone_is_not_across_sockets() -> None:
    """All-SYS PCIe box: GPU0-3 share NUMA node 0 with the NIC; only GPU4-7 cross."""
    m = load_fixture(FIXTURES / "pcie-8gpu-allsys.topo")
    plan = make_plan(m)
    across = [w for w in plan.warnings if "across sockets" in w]
    assert [w.split(":")[0] for w in across] == ["GPU4", "GPU5", "GPU6", "GPU7"]
    assert "GPU0: nearest NIC mlx5_0 is SYS per nvidia-smi, but both are on NUMA node 0: not " \
        "across sockets" in [f.text for f in plan.findings]
    # sockets unknown (an NPS4 box seen without lscpu): another NUMA node, never "sockets"
    polaris = capture("hgx-a100-4gpu-nv4-nps4")
    one = make_plan(polaris, 1)  # GPU0 alone: its NICs are SYS and nothing relays
    assert one.ranks[0].gpu == 0 and one.warnings == [
        "GPU0: nearest NIC mlx5_0 is on another NUMA node (SYS; GPU on NUMA 3, NIC on NUMA 0; "
        "sockets unknown) and no NVLink peer has a nearer one"]


def test_a_gpu_without_affinity_gets_its_node_from_a_near_nic() -> None:
    """The H100 capture with GPU6's row cut after its links: its node comes from mlx5_8
    (PIX to it, PXB to GPU7 on NUMA 1); its rank gets a share of node 1, nothing more."""
    m = load_fixture(VARIANTS / "hgx-h100-11nic-gpu6-row-cut.txt")
    assert m.gpus[6].numa_node == 1 and m.gpus[6].cpus == []
    assert "GPU6: no NUMA affinity in the input; NUMA node 1 inferred from mlx5_8 (PIX, NUMA 1)" \
        in m.warnings
    plan = make_plan(m)
    r6 = plan.ranks[6]
    assert r6.numa_node == 1 and r6.omp_threads == 14 and len(r6.cpus) == 28
    seen: set[int] = set()
    for r in plan.ranks:
        assert r.cpus and not set(r.cpus) & seen
        seen |= set(r.cpus)
    # nothing near it of known node: unpinned, a warning, OMP threads = physical cores / ranks
    m.gpus[6].numa_node = None
    plan = make_plan(m)
    r6 = plan.ranks[6]
    assert r6.cpus == [] and r6.numa_node is None and r6.omp_threads == 112 // 8
    assert any(w.startswith("GPU6: NUMA node unknown") for w in plan.warnings)


def test_cost_assumptions_are_printed() -> None:
    polaris = capture("hgx-a100-4gpu-nv4-nps4")  # one EPYC socket in NPS4, no lscpu
    assert polaris.sockets is None and all(n.socket is None for n in polaris.numa)
    est = estimate(polaris, make_plan(polaris))
    links = {est.naive[p].bottleneck for p in est.naive} | {est.planned[p].bottleneck
                                                          for p in est.planned}
    assert not any(b.startswith("socket:") for b in links)  # no node taken for a socket
    assert est.naive["host"].bottleneck == "mem:0"  # 4 ranks on one node's DRAM share
    assert est.naive["host"].seconds == pytest.approx(4 * 300e6 / 50e9)
    text = format_cost(est, StepLoad())
    assert "assumed (facts the input does not give):" in text
    assert "GPU0, GPU1, GPU2 and GPU3: PCIe generation unknown; taken as gen4 (25 GB/s), the " \
        "default for an unknown GPU" in est.assumptions
    assert any(a.startswith("sockets of NUMA nodes [0, 1, 2, 3] unknown") for a in est.assumptions)
    h200 = load_fixture(FIXTURES / "dgx-h200-nvswitch.topo")  # generation and rates known
    assert not any("PCIe generation" in a for a in estimate(h200, make_plan(h200)).assumptions)


def test_fewer_ranks_than_gpus_choose_their_gpus() -> None:
    dgx = capture("dgx-h200-12nic")
    # single-node, 4 of 8 on NVSwitch: one island, spread over both sockets (not GPU0-3,
    # which leaves socket 1 and its NICs idle)
    assert [r.gpu for r in make_plan(dgx, 4).ranks] == [0, 1, 4, 5]
    from terarec.topology.select import choose_gpus

    # multi-node: GPUs next to distinct NICs, spread over both sockets
    four = make_plan(dgx, 4, nnodes=2)
    assert [r.gpu for r in four.ranks] == [0, 1, 4, 5]
    assert len({r.nic for r in four.ranks}) == 4 and four.cuda_visible_devices == "0,1,4,5"
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in four.ranks] == ["0", "1", "4", "5"]
    polaris = capture("hgx-a100-4gpu-nv4-nps4")  # NICs PHB to GPU3 and GPU1 only
    assert [r.gpu for r in make_plan(polaris, 2, nnodes=2).ranks] == [1, 3]
    assert [r.nic_link for r in make_plan(polaris, 2, nnodes=2).ranks] == ["PHB", "PHB"]
    adroit = capture("pcie-4gpu-a100-adroit")  # one NIC, on GPU0/1's socket
    assert choose_gpus(adroit, 2, multi_node=True) == [0, 1]
    # single-node without NVLink: one PCIe fast group (NUMA 0's GPUs), not split
    assert choose_gpus(adroit, 2, multi_node=False) == [0, 1]
    assert make_plan(adroit, 2).fast_groups == [[0, 1]]
    allsys = load_fixture(FIXTURES / "pcie-8gpu-allsys.topo")  # no group of two: spread
    assert choose_gpus(allsys, 2, multi_node=False) == [0, 4]
    # single-node: one NVLink island first
    p9 = capture("power9")  # NV3 pairs (0,1) and (2,3)
    assert choose_gpus(p9, 2, multi_node=False) == [0, 1]
    assert choose_gpus(p9, 2, multi_node=True) == [0, 2]  # two cards
    assert make_plan(p9, 2).fast_groups == [[0, 1]]
    # every GPU: in order, no CUDA_VISIBLE_DEVICES
    full = make_plan(dgx)
    assert full.cuda_visible_devices is None and "CUDA_VISIBLE_DEVICES" not in full.ranks[0].env


def test_missing_disk_facts_are_not_a_missing_disk(capsys: pytest.CaptureFixture[str]) -> None:
    path = next(p for p in CAPTURES if p.name.startswith("hgx-b300"))
    assert main(["--from", str(path), "--check"]) == 0
    assert "disks not in the input" in capsys.readouterr().out
    della = make_plan(capture("pcie-2gpu-a100-della"))
    assert della.fast_groups == [[0], [1]]
    assert any(f.text.startswith("fast groups: each GPU alone: no NVLink") and "SYS" in f.text
               for f in della.findings)
    allsys = make_plan(load_fixture(FIXTURES / "pcie-8gpu-allsys.topo"))
    assert allsys.fast_groups == [[i] for i in range(8)]
    assert any(f.text.startswith("fast groups: each GPU alone") for f in allsys.findings)


def test_inconsistent_input_is_a_warning_naming_the_row(tmp_path: Path) -> None:
    asym = make_plan(load_fixture(VARIANTS / "hgx-a100-4gpu-nv4-asymmetric.txt"))
    assert any("row GPU0, column GPU2: NV4, but row GPU2, column GPU0: NV2 (asymmetric" in w
               for w in asym.warnings)
    twice = load_fixture(VARIANTS / "hgx-a100-4nic-asym-legend-twice.txt")
    assert [(n.name, n.named) for n in twice.nics] == [
        ("mlx5_0", True), ("mlx5_1", True), ("NIC2", False), ("NIC3", False)]
    plan = make_plan(twice)
    assert any("NIC legend: NIC2 and NIC3 are both 'mlx5_2'" in w for w in plan.warnings)
    assert all(r.env.get("NCCL_IB_HCA") != "=mlx5_2" for r in plan.ranks)
    cut = make_plan(load_fixture(VARIANTS / "hgx-h100-11nic-gpu6-row-cut.txt"))
    assert any("row GPU6 ends after its link columns" in w for w in cut.warnings)
    # the real captures themselves are consistent
    for p in CAPTURES:
        assert load_fixture(p).inconsistencies == [], p.name
    # facts a capture does not hold stay unknown in the saved machine
    m = capture("hgx-a100-4nic-asym")
    assert m.sockets is None and m.threads_per_core is None
    assert all(g.pcie_gen is None for g in m.gpus) and not m.disks_known
    saved = tmp_path / "m.topo"
    saved.write_text(machine_to_fixture(m))
    again = load_fixture(saved)
    assert again.sockets is None and not again.disks_known and again.nic_nic_links


def test_a_repeated_nic_name_in_a_saved_machine_is_an_error() -> None:
    m = capture("hgx-a100-4nic-asym")
    m.nics[1].name = "mlx5_0"
    with pytest.raises(TopologyError, match=r"nics\[1\]\.name: 'mlx5_0' repeats nics\[0\]"):
        m.validate()

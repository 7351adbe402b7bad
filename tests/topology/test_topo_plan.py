"""The plan of each named fixture in detail, relays on real captures, and the cost model
against hand-computed link times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from terarec.topology.cores import core_groups, split_cores
from terarec.topology.cost import BANDWIDTH, StepLoad, estimate
from terarec.topology.facts import load_fixture
from terarec.topology.model import TopologyError
from terarec.topology.plan import make_plan, plan_from_dict, plan_to_dict

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
CAPTURES = FIXTURES / "captures"  # verbatim copies of the real captures, with provenance


def fixture(name: str):  # noqa: ANN201
    return load_fixture(FIXTURES / f"{name}.topo")


def capture(prefix: str):  # noqa: ANN201
    found = sorted(CAPTURES.glob(f"{prefix}*.txt"))
    assert found, f"no capture {prefix}* in {CAPTURES}"
    return load_fixture(found[0])


def _disjoint_and_local(m, plan) -> None:  # noqa: ANN001
    seen: set[int] = set()
    for r in plan.ranks:
        assert r.cpus and not (set(r.cpus) & seen), f"rank {r.local_rank} overlaps"
        seen |= set(r.cpus)
        if r.numa_node is not None:
            assert set(r.cpus) <= set(m.node(r.numa_node).cpus)


def test_core_groups_and_split() -> None:
    assert core_groups([0, 1, 2, 3, 112, 113, 114, 115], None) == \
        [[0, 112], [1, 113], [2, 114], [3, 115]]
    assert core_groups(list(range(8)), None) == [[c] for c in range(8)]  # no gap: no SMT
    assert core_groups(list(range(8)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # POWER SMT4
    assert core_groups([0, 8, 1, 9], 1) == [[0], [1], [8], [9]]
    assert split_cores([[0], [1], [2], [3], [4]], 2) == [[[0], [1]], [[2], [3], [4]]]
    assert split_cores([[0]], 3) == [[[0]], [[0]], [[0]]]


def test_dgx_h200_plan() -> None:
    m = fixture("dgx-h200-nvswitch")
    plan = make_plan(m)
    assert len(plan.ranks) == 8 and plan.fast_groups == [list(range(8))]  # NVSwitch
    _disjoint_and_local(m, plan)
    assert [r.numa_node for r in plan.ranks] == [0] * 4 + [1] * 4
    r0 = plan.ranks[0]
    assert r0.cpus == list(range(0, 14)) + list(range(112, 126)) and r0.omp_threads == 14
    # each GPU its own PXB compute NIC, never a storage NIC
    assert [r.nic for r in plan.ranks] == ["mlx5_0", "mlx5_3", "mlx5_4", "mlx5_5",
                                          "mlx5_6", "mlx5_9", "mlx5_10", "mlx5_11"]
    assert all(r.nic_link == "PXB" and r.relay_gpu is None for r in plan.ranks)
    assert all(r.ssd_dir == "/raid/terarec-ssd" for r in plan.ranks)  # not the OS disk
    assert r0.env == {"OMP_NUM_THREADS": "14", "TERAREC_FAST_GROUPS": "0,1,2,3,4,5,6,7",
                      "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "NCCL_IB_HCA": "=mlx5_0",
                      "TERAREC_SSD_DIR": "/raid/terarec-ssd"}
    assert plan.warnings == []
    # fewer ranks: one NVLink island (the whole switch), spread over the sockets; the
    # node's cores go to fewer ranks, groups shrink with them
    p2 = make_plan(m, 2)
    assert [r.gpu for r in p2.ranks] == [0, 4] and p2.cuda_visible_devices == "0,4"
    assert p2.fast_groups == [[0, 1]] and p2.ranks[1].cpus[0] == 56
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in p2.ranks] == ["0", "4"]


def test_pcie_8gpu_plan() -> None:
    m = fixture("pcie-8gpu-2x4-switch")
    plan = make_plan(m)
    assert plan.fast_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]  # no NVLink: one per socket
    _disjoint_and_local(m, plan)
    assert all(r.nic == "mlx5_bond_0" for r in plan.ranks)  # the only NIC
    assert [r.nic_link for r in plan.ranks] == ["PIX"] * 4 + ["SYS"] * 4
    assert all(r.relay_gpu is None for r in plan.ranks)  # no NVLink: nothing to relay over
    assert [r.ssd_dir for r in plan.ranks] == ["/data0/terarec-ssd"] * 4 + \
        ["/data1/terarec-ssd"] * 4  # the socket's own NVMe, not the SATA boot disk
    assert plan.warnings == [f"GPU{g}: nearest NIC mlx5_bond_0 is across sockets (SYS; GPU on "
                             "NUMA 1, NIC on NUMA 0) and no NVLink peer has a nearer one"
                             for g in range(4, 8)]
    assert plan.ranks[0].omp_threads == 9 and plan.ranks[0].env["NCCL_IB_HCA"] == "=mlx5_bond_0"


def test_workstation_plan() -> None:
    m = fixture("pcie-4gpu-workstation")
    plan = make_plan(m)
    assert plan.fast_groups == [[0, 1], [2, 3]]  # NODE within a socket, SYS across
    assert [r.cpus for r in plan.ranks] == [list(range(i * 16, i * 16 + 16)) for i in range(4)]
    assert [r.nic for r in plan.ranks] == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    assert [r.disk for r in plan.ranks] == ["md0", "md0", "md1", "md1"]
    assert plan.warnings == []


def test_h200_vm_plan() -> None:
    m = fixture("h200-vm")
    plan = make_plan(m)
    assert plan.fast_groups == [[0, 1]]
    assert [r.cpus for r in plan.ranks] == [list(range(16)), list(range(16, 32))]
    assert all(r.numa_node == 0 and r.nic == "eth0" for r in plan.ranks)
    assert plan.ranks[0].env["NCCL_SOCKET_IFNAME"] == "=eth0"
    assert "NCCL_IB_HCA" not in plan.ranks[0].env
    assert plan.warnings == ["no NVMe disk: the SSD tier falls back to vda (slow random reads)"]
    assert plan.ranks[0].ssd_dir == "/var/tmp/terarec-ssd"  # the root fs, not /
    three = make_plan(m, 3, backend="gloo")  # more ranks than GPUs: shared, with a warning
    assert [r.gpu for r in three.ranks] == [0, 1, 0] and three.fast_groups == [[0, 1, 2]]
    assert "3 ranks on 2 GPU(s) (gloo): local rank i shares GPU i % 2" in three.warnings
    assert [len(r.cpus) for r in three.ranks] == [10, 11, 11]
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in three.ranks] == ["0", "1", "0"]
    assert three.cuda_visible_devices is None  # one value for the job cannot share GPUs
    with pytest.raises(TopologyError, match="3 ranks on 2 GPU.*NCCL cannot put two ranks"):
        make_plan(m, 3)  # NCCL: one rank per GPU


def test_cpu_box_plan() -> None:
    m = fixture("cpu-box")
    plan = make_plan(m)
    assert len(plan.ranks) == 1 and plan.ranks[0].gpu is None
    assert plan.ranks[0].cpus == [0, 1] and plan.ranks[0].env["OMP_NUM_THREADS"] == "2"
    assert "CUDA_DEVICE_ORDER" not in plan.ranks[0].env
    two = make_plan(m, 2)
    assert [r.cpus for r in two.ranks] == [[0], [1]] and two.fast_groups == [[0, 1]]
    three = make_plan(m, 3)  # more ranks than cores: shared, with a warning
    assert [r.cpus for r in three.ranks] == [[0], [1], [0]]
    assert any("3 ranks share 2 cores" in w for w in three.warnings)
    with pytest.raises(TopologyError, match="nproc: must be >= 1"):
        make_plan(m, 0)


def test_relays_on_real_captures() -> None:
    asym = make_plan(capture("hgx-a100-4nic-asym"))
    # GPU4-7 see every NIC across sockets; each relays over NVLink to a GPU with a PXB NIC.
    # mlx5_2/mlx5_3 (PIX to each other) are one dual-port card, so the relays balance the
    # three cards: 3, 3 and 2 ranks, not 4 on the dual-port card.
    assert [r.relay_gpu for r in asym.ranks] == [None] * 4 + [1, 0, 1, 2]
    assert [r.nic for r in asym.ranks[4:]] == ["mlx5_1", "mlx5_0", "mlx5_1", "mlx5_2"]
    assert all(r.nic_link == "PXB" for r in asym.ranks)
    cards = [{"mlx5_0": 0, "mlx5_1": 1}.get(r.nic, 2) for r in asym.ranks]
    assert sorted(cards.count(c) for c in range(3)) == [2, 3, 3]
    assert asym.warnings == []  # the capture holds no disk facts: a note, not a warning
    polaris = make_plan(capture("hgx-a100-4gpu-nv4-nps4"))
    assert [r.relay_gpu for r in polaris.ranks] == [1, None, 3, None]
    assert [r.numa_node for r in polaris.ranks] == [3, 2, 1, 0]
    p9 = make_plan(capture("power9"))  # NVLink pairs: two islands
    assert p9.fast_groups == [[0, 1], [2, 3]] and p9.ranks[0].omp_threads == 8
    mesh = make_plan(capture("dgx1-v100"))  # cube mesh: one island, a note says not all-to-all
    assert mesh.fast_groups == [list(range(8))]
    assert any("not every pair directly" in f.text for f in mesh.findings)
    della = make_plan(capture("pcie-2gpu-a100-della"))  # SYS between the two GPUs
    assert della.fast_groups == [[0], [1]]


def test_plan_json_round_trip() -> None:
    plan = make_plan(fixture("dgx-h200-nvswitch"))
    again = plan_from_dict(json.loads(json.dumps(plan_to_dict(plan))))
    assert plan_to_dict(again) == plan_to_dict(plan)
    bad = plan_to_dict(plan)
    bad["ranks"][0]["colour"] = 1
    with pytest.raises(TopologyError, match=r"plan\.ranks\[0\]: unknown key"):
        plan_from_dict(bad)



@pytest.mark.parametrize("path, value, match", [
    ("hostname", 5, r"plan\.hostname: expected str, got 5"),
    ("ranks", {}, r"plan\.ranks: expected a list"),
    ("ranks.0", [1], r"plan\.ranks\[0\]: expected an object"),
    ("ranks.0.cpus", "0-13", r'plan\.ranks\[0\]\.cpus: expected list\[int\], got "0-13"'),
    ("ranks.0.cpus.3", -2, r"plan\.ranks\[0\]\.cpus\[3\]: must be >= 0, got -2"),
    ("ranks.2.local_rank", 2.0, r"plan\.ranks\[2\]\.local_rank: expected int, got 2\.0"),
    ("ranks.1.gpu", -1, r"plan\.ranks\[1\]\.gpu: must be >= 0, got -1"),
    ("ranks.1.gpu", True, r"plan\.ranks\[1\]\.gpu: expected int, got true"),
    ("ranks.1.numa_node", "0", r"plan\.ranks\[1\]\.numa_node: expected int"),
    ("ranks.0.omp_threads", 0, r"plan\.ranks\[0\]\.omp_threads: must be >= 1, got 0"),
    ("ranks.0.nic", 3, r"plan\.ranks\[0\]\.nic: expected str, got 3"),
    ("ranks.0.env", ["A=1"], r"plan\.ranks\[0\]\.env: expected dict\[str, str\]"),
    ("ranks.0.env.OMP_NUM_THREADS", 14,
     r"plan\.ranks\[0\]\.env\[OMP_NUM_THREADS\]: expected str, got 14"),
    ("ranks.0.local_rank", None, r"plan\.ranks\[0\]\.local_rank: expected int, got null"),
    ("fast_groups", "0-7", r'plan\.fast_groups: expected list\[list\[int\]\], got "0-7"'),
    ("fast_groups.0.1", "1", r"plan\.fast_groups\[0\]\[1\]: expected int"),
    ("fast_groups", [[0, 1, 2, 3], [4, 5, 6]],
     r"plan\.fast_groups: .* not a partition of the local ranks 0\.\.7"),
    ("fast_groups", [[0, 1, 2, 3], [3, 4, 5, 6, 7]], r"plan\.fast_groups: .* not a partition"),
    ("findings", [{"level": "bad", "text": "x"}],
     r"plan\.findings\[0\]\.level: 'bad', expected one of \['note', 'warning'\]"),
    ("findings", [{"level": "note", "text": 1}], r"plan\.findings\[0\]\.text: expected str"),
])
def test_plan_json_wrong_types_name_the_field(path: str, value: object, match: str) -> None:
    """A saved plan with a mistyped or out-of-range value is a TopologyError naming the
    field, not a plan that fails later (or silently pins the wrong cores)."""
    raw = plan_to_dict(make_plan(fixture("dgx-h200-nvswitch")))
    *parents, last = path.split(".")
    obj = raw
    for key in parents:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value
    with pytest.raises(TopologyError, match=match):
        plan_from_dict(raw)


def test_plan_file_with_a_wrong_type_names_the_file(tmp_path: Path) -> None:
    from terarec.launch.bind import read_plan_file

    raw = plan_to_dict(make_plan(fixture("cpu-box")))
    raw["ranks"][0]["cpus"] = "0-3"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"plan": raw, "user_env": []}))
    with pytest.raises(TopologyError, match=f"{path}: plan\\.ranks\\[0\\]\\.cpus: expected"):
        read_plan_file(str(path))


@pytest.mark.parametrize("name", ["dgx-h200-nvswitch", "pcie-8gpu-2x4-switch", "cpu-box",
                                  "h200-vm", "pcie-4gpu-workstation", "h100-vm-captured"])
def test_every_fixture_plan_round_trips(name: str) -> None:
    plan = make_plan(fixture(name))
    again = plan_from_dict(json.loads(json.dumps(plan_to_dict(plan))))
    assert plan_to_dict(again) == plan_to_dict(plan)

def test_cost_model_against_hand_computed_times() -> None:
    m = fixture("dgx-h200-nvswitch")
    load = StepLoad(host_to_gpu_mb=100, gpu_to_host_mb=100, ssd_read_mb=10, ssd_write_mb=10,
                    net_mb=50)
    est = estimate(m, make_plan(m), load)
    nic_bw = 400 / 8 * 1e9  # the fixture's 400 Gb/s compute NICs
    # net, naive: 8 ranks x 50 MB through mlx5_0; planned: one NIC each
    assert est.naive["net"].seconds == pytest.approx(8 * 50e6 / nic_bw)
    assert est.naive["net"].bottleneck == "nic:mlx5_0"
    assert est.planned["net"].seconds == pytest.approx(50e6 / nic_bw)
    # host, naive: GPU4-7's 4 x 100 MB cross the socket link each way
    socket_bw = BANDWIDTH["socket"][0] * 1e9
    assert est.naive["host"].seconds == pytest.approx(4 * 100e6 / socket_bw)
    assert est.naive["host"].bottleneck == "socket:0>1"
    # host, planned: node 0's DRAM (the whole socket's: one node per socket) carries 4
    # ranks' 200 MB; each GPU's PCIe 5 link carries 100 MB a direction
    dram = BANDWIDTH["dram_socket"][0] * 1e9
    pcie = BANDWIDTH["pcie5"][0] * 1e9
    assert est.planned["host"].seconds == pytest.approx(max(4 * 200e6 / dram, 100e6 / pcie))
    # ssd, naive: everything on md0 (2 NVMe); planned: /raid (8 NVMe)
    nvme = BANDWIDTH["nvme"][0] * 1e9
    assert est.naive["ssd"].seconds == pytest.approx(8 * 20e6 / (2 * nvme))
    assert est.planned["ssd"].seconds == pytest.approx(8 * 20e6 / (8 * nvme))
    assert est.speedup("step") > 1
    step = sum(est.planned[p].seconds for p in ("host", "ssd", "net"))
    assert est.planned["step"].seconds == pytest.approx(step)


def test_cost_model_cpu_box_and_vm_see_no_gain() -> None:
    for name in ("cpu-box", "h200-vm"):
        m = fixture(name)
        est = estimate(m, make_plan(m))
        assert est.speedup("step") == pytest.approx(1.0), name


def test_cost_model_relay_beats_the_socket_crossing() -> None:
    m = capture("hgx-a100-4nic-asym")
    est = estimate(m, make_plan(m))
    assert est.naive["net"].bottleneck == "nic:mlx5_0"
    # 8 ranks on one NIC -> at most 3 per card: NIC2/NIC3 (PIX to each other) are one
    # dual-port card, not two NICs (which would claim 2 per NIC, 4.0x)
    assert est.planned["net"].seconds == pytest.approx(3 * 64e6 / 25e9)
    assert est.speedup("net") == pytest.approx(8 / 3)
    assert "mlx5_2 and mlx5_3: PIX to each other, taken as ports of one card sharing one " \
        "port's bandwidth" in est.assumptions

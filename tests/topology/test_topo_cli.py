"""``terarec-topo`` / ``terarec topo``: output, --json -> --from round trip, --check exit
codes, bad input messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from terarec.cli import main as terarec_main
from terarec.topology.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]


def test_fixture_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--from", str(FIXTURES / "pcie-4gpu-workstation.topo")]) == 0
    out = capsys.readouterr().out
    assert "machine esc8000a (2 socket(s)" in out
    assert "GPU2  NVIDIA RTX 6000 Ada Generation" in out
    assert "fast groups (local ranks): [[0, 1], [2, 3]]" in out
    assert "rank 0: CUDA_DEVICE_ORDER=PCI_BUS_ID NCCL_IB_HCA==mlx5_0 OMP_NUM_THREADS=16" in out
    assert "check: no bad placement found" in out
    assert "naive/planned" in out and "step" in out


def test_json_round_trip_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--from", str(FIXTURES / "pcie-8gpu-2x4-switch.topo"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"machine", "plan", "cost"}
    assert doc["plan"]["fast_groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert doc["cost"]["naive"]["ssd"]["bottleneck"] == "disk:sda"
    saved = tmp_path / "box.json"
    saved.write_text(json.dumps(doc))
    assert main(["--from", str(saved), "--json", "--nproc", "4"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["machine"] == doc["machine"] and len(again["plan"]["ranks"]) == 4
    assert main(["--from", str(saved), "--check"]) == 1  # GPU4-7: NIC across sockets
    out = capsys.readouterr().out
    assert out.count("warning: GPU") == 4 and "across sockets (SYS;" in out
    assert main(["--from", str(FIXTURES / "dgx-h200-nvswitch.topo"), "--check"]) == 0
    assert capsys.readouterr().out.strip() == "check: no bad placement found"


def test_fixture_output_reloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--from", str(FIXTURES / "dgx-h200-nvswitch.topo"), "--fixture"]) == 0
    f = tmp_path / "again.topo"
    f.write_text(capsys.readouterr().out)
    assert main(["--from", str(f), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["nic"] for r in doc["plan"]["ranks"]][:2] == ["mlx5_0", "mlx5_3"]


def test_bad_input_exits_2_naming_the_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hostname": "x", "gpus": [{"index": "zero"}]}')
    assert main(["--from", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"terarec-topo: error: {bad}: machine.gpus[0].index: expected int")
    bad.write_text("{")
    assert main(["--from", str(bad)]) == 2
    assert f"{bad}: not valid JSON" in capsys.readouterr().err
    txt = tmp_path / "bad.topo"
    txt.write_text("hello\n")
    assert main(["--from", str(txt)]) == 2
    assert f"{txt}: no GPU matrix found" in capsys.readouterr().err
    assert main(["--from", str(tmp_path / "none.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["--from", str(FIXTURES / "h200-vm.topo"), "--nproc", "0"]) == 2
    assert "nproc: must be >= 1, got 0" in capsys.readouterr().err


def test_terarec_topo_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert terarec_main(["topo", "--from", str(FIXTURES / "cpu-box.topo"), "--check"]) == 1
    assert "no NVMe disk" in capsys.readouterr().out
    assert terarec_main(["topo", "--applied"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rank"] == 0 and doc["cpus"] and "mempolicy" in doc


def test_console_script_on_this_machine() -> None:
    exe = Path(sys.executable).parent / "terarec-topo"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "terarec.topology"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("machine ") and "plan for " in res.stdout

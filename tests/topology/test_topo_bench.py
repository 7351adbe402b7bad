"""benchmarks/topo_bench.py: the CPU path (no GPU here) measures what it says."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "topo_bench.py"


def _bench():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("topo_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_staging_on_cpu() -> None:
    res = _bench().staging(torch.device("cpu"), table_rows=5000, batch_rows=512, dim=16,
                           iters=2)
    assert 0 < res["rows"] <= 512 and res["batch_mb"] == pytest.approx(res["rows"] * 64 / 1e6)
    assert set(res["gb_s"]) == {"gather_fresh", "gather_prealloc"}  # no CUDA: no copies
    assert all(v > 0 for v in res["gb_s"].values()) and "pinned_over_pageable" not in res


def test_loader_worker_in_process() -> None:
    spec = {"rank": 0, "threads": 1, "cpus": None, "device": "cpu", "seconds": 0.05,
            "batch": 64, "features": 4, "dim": 8, "table_rows": 1000}
    threads = torch.get_num_threads()
    try:
        r = _bench().worker(spec)
    finally:
        torch.set_num_threads(threads)
    assert r["batches"] >= 1 and r["seconds"] >= 0.05 and r["rank"] == 0


@pytest.mark.slow  # starts 4 loader processes (each imports torch)
def test_quick_run_json() -> None:
    res = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    a = out["affinity"]
    assert out["device"] == "cpu" and a["ranks"] == 2 and a["on_over_off"] > 0
    assert sorted(c for cpus in a["plan_cpus"] for c in cpus) == sorted(set(
        c for cpus in a["plan_cpus"] for c in cpus))  # the plan's shares do not overlap

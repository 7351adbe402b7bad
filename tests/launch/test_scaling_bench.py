"""benchmarks/scaling.py on CPU (gloo): both modes run from the repo root and report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch_helpers import REPO, base_env


def _bench(*args: str) -> dict:
    res = subprocess.run([sys.executable, "benchmarks/scaling.py", *args, "--json"],
                         cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_scaling_throughput_on_one_and_two_ranks() -> None:
    out = _bench("--ranks", "1,2", "--steps", "6", "--batch-size", "256")
    assert [r["ranks"] for r in out["runs"]] == [1, 2]
    one, two = out["runs"]
    assert one["ratio"] == 1.0 and two["ratio"] == pytest.approx(
        two["samples_per_s"] / one["samples_per_s"])
    assert all(r["samples_per_s"] > 0 for r in out["runs"])


@pytest.mark.slow
def test_scaling_check_one_vs_two_ranks_passes() -> None:
    out = _bench("--check", "--check-steps", "6", "--check-batch", "128", "--tiers")
    assert out["ok"] and out["same_keys"], out
    assert out["max_abs_diff_loss"] <= 1e-5 and out["max_abs_diff_rows"] <= 1e-5

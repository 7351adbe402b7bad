"""benchmarks/scaling.py on CPU (gloo): both modes run from the repo root and report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch_helpers import REPO, base_env

from tests.numerics import loss_tol, train_tol


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


@pytest.mark.numerics
@pytest.mark.slow
def test_scaling_check_one_vs_two_ranks_passes() -> None:
    # The check trains its DLRM with Adam (rows lr 0.01, dense 0.001) for 6 steps on a
    # global batch of 128 Criteo rows (26 ids each) on 1 and on 2 ranks, and reports
    # the largest differences (tests/numerics.py; train_helpers.run_bounds has the
    # reasoning). Magnitudes: losses and weights (init 0.05, Adam's moments) below 1.
    steps, batch, values = 6, 128, 128 * 26
    rows = train_tol(0.01, steps, values)
    dense = train_tol(0.001, steps, values)
    loss = loss_tol(1.0, steps, batch)
    out = _bench("--check", "--check-steps", str(steps), "--check-batch", str(batch), "--tiers",
                 "--tol", repr(max(rows, dense, loss)))
    assert out["ok"] and out["same_keys"], out
    assert out["max_abs_diff_loss"] <= loss and out["max_abs_diff_rows"] <= rows, out
    assert out["max_abs_diff_dense"] <= dense, out

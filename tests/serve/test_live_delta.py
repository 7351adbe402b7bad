"""Live deltas: a served bundle takes a running job's delta checkpoints in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from serve_helpers import SPLIT, bundle_probs, reference, trained

from terarec.serve.export import export_bundle
from terarec.serve.overlay import OverlayFull
from terarec.serve.scorer import Scorer

TOL = 1e-5  # as the export round trip (float32 sums in another order)


@pytest.fixture(scope="module")
def delta_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """Full checkpoints at steps 20 and 40, a delta at step 30 (parent: step 20)."""
    return trained(tmp_path_factory.mktemp("delta"), model=SPLIT, train={
        "steps": 40, "checkpoint_every": 20, "delta_every": 10, "keep_checkpoints": 2})


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_applied_delta_scores_as_the_delta_checkpoint(delta_run, tmp_path: Path,
                                                      dtype: str) -> None:
    cfg, run = delta_run
    base, step30 = run / "checkpoints" / "step20", run / "deltas" / "step30"
    export_bundle(base, tmp_path / "b", row_dtype=dtype)
    scorer = Scorer.from_bundle(tmp_path / "b", cache_bytes=64 * (4 * 8 + 16))
    try:
        ref = reference(cfg, step30, tmp_path)
        batch = ref[0][0]
        before = bundle_probs(scorer, batch)  # fills the cache with step-20 rows
        scorer.apply_delta(step30)
        assert scorer.step == 30 and scorer.stats()["overlay_rows"] > 0
        after = bundle_probs(scorer, batch)
        assert not torch.equal(before, after)
        if dtype == "fp32":
            for b, p in ref:
                assert float((bundle_probs(scorer, b) - p).abs().max()) <= TOL
        else:  # the overlay is quantised like the bundle: as the delta's own int8 export
            export_bundle(step30, tmp_path / "b30", row_dtype=dtype)
            direct = Scorer.from_bundle(tmp_path / "b30")
            try:
                assert float((bundle_probs(direct, batch) - after).abs().max()) <= TOL
            finally:
                direct.close()
        with pytest.raises(ValueError, match="in order"):
            scorer.apply_delta(step30)  # its parent is no longer the model served
    finally:
        scorer.close()


def test_delta_over_the_overlay_bound_is_refused(delta_run, tmp_path: Path) -> None:
    _, run = delta_run
    export_bundle(run / "checkpoints" / "step20", tmp_path / "b")
    scorer = Scorer.from_bundle(tmp_path / "b", overlay_rows=5)
    try:
        with pytest.raises(OverlayFull, match="export a new bundle"):
            scorer.apply_delta(run / "deltas" / "step30")
        assert scorer.step == 20 and scorer.stats()["overlay_rows"] == 0
    finally:
        scorer.close()


def test_a_full_checkpoint_is_not_a_delta(delta_run, tmp_path: Path) -> None:
    _, run = delta_run
    export_bundle(run / "checkpoints" / "step20", tmp_path / "b")
    scorer = Scorer.from_bundle(tmp_path / "b")
    try:
        with pytest.raises(ValueError, match="new bundle"):
            scorer.apply_delta(run / "checkpoint")
    finally:
        scorer.close()


def test_service_applies_a_delta_during_load_without_a_failed_request(
        delta_run, tmp_path: Path) -> None:
    import shutil
    import time

    import httpx
    import numpy as np
    from serve_helpers import server, under_load, wait_health
    from test_service import request

    _, run = delta_run
    follow = tmp_path / "run"  # the run as it was before its step-30 delta
    shutil.copytree(run / "checkpoints", follow / "checkpoints")
    (follow / "deltas").mkdir()
    export_bundle(follow / "checkpoints" / "step20", tmp_path / "b")
    bodies = [request(np.random.default_rng(i), 50) for i in range(8)]

    with server(tmp_path / "b", "--follow", str(follow), "--follow-every", "0.2") as url:
        with under_load(url, bodies) as load:
            time.sleep(1.0)
            shutil.copytree(run / "deltas" / "step30", follow / "deltas" / ".incoming")
            (follow / "deltas" / ".incoming").rename(follow / "deltas" / "step30")
            wait_health(url, "step", 30, "the delta was not applied")
            time.sleep(1.0)
        health = httpx.get(f"{url}/healthz").json()
        served = httpx.post(f"{url}/score", json=bodies[0]).json()
        metrics = httpx.get(f"{url}/metrics").text
    assert not load.errors, load.errors[:3]
    assert sum(load.counts) > 16
    assert health["deltas"] == 1 and health["delta_errors"] == 0
    assert "terarec_overlay_rows" in metrics
    scorer = Scorer.from_bundle(tmp_path / "b")
    try:
        from terarec.serve.scorer import Request

        scorer.apply_delta(run / "deltas" / "step30")
        want = scorer.score(Request(**bodies[0]))
        assert np.allclose(served["scores"], want.scores.numpy(), rtol=0, atol=1e-6)
    finally:
        scorer.close()

"""A multi-task model leaves terarec like a single-task one: its bundle (split or
single program) scores every task as the training model does, the manifest names the
tasks and the ranking follows the first."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import SPLIT, bundle_probs, reference, server, trained

from terarec.serve.export import export_bundle
from terarec.serve.scorer import Request, Scorer


@pytest.mark.parametrize("split", [True, False], ids=["split", "single"])
def test_multi_task_bundle_scores_every_task(tmp_path: Path, split: bool) -> None:
    cfg, run = trained(tmp_path, data={"synthetic": {"tasks": 2}},
                       model=SPLIT if split else {})
    manifest = export_bundle(run / "checkpoint", tmp_path / "b")
    assert manifest["model"]["tasks"] == ["click", "conversion"]
    assert manifest["model"]["mode"] == ("split" if split else "single")
    scorer = Scorer.from_bundle(tmp_path / "b")
    try:
        for batch, want in reference(cfg, run / "checkpoint", tmp_path)[:1]:
            assert want.shape == (batch.batch_size, 2)
            got = bundle_probs(scorer, batch)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        user = {"C1": 3, "C3": [5, 7]} if split else {}
        cands = {"C2": [1, 2, 3, 4], "C4": [[1], [2, 9], [], [4]]}
        if not split:
            cands.update({"C1": [3] * 4, "C3": [[5, 7]] * 4})
        dense = [0.1, -0.2, 0.3, 0.0]
        res = scorer.score(Request(user=user, candidates=cands,
                                   **({"dense": dense} if split else
                                      {"candidate_dense": [dense] * 4})))
        assert res.tasks is not None and set(res.tasks) == {"click", "conversion"}
        assert torch.equal(res.scores, res.tasks["click"])
        assert torch.equal(res.order, torch.argsort(res.scores, descending=True, stable=True))
        assert (res.tasks["conversion"] < 1).all()
    finally:
        scorer.close()
    if split:  # through the HTTP service: every task's probabilities in the response
        with server(tmp_path / "b") as url:
            body = {"user": user, "dense": dense, "candidates": cands}
            got = httpx.post(f"{url}/score", json=body, timeout=30).json()
        assert got["ranking"] == res.order.tolist()
        for task, p in res.tasks.items():
            assert got["tasks"][task] == pytest.approx(p.tolist(), abs=1e-6)

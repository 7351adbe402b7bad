"""The scorer's fast path (one table, one integer id per feature and entry) scores
exactly as the general path, and every request it does not fit takes the general path
(which scores it or names what is wrong)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from serve_helpers import SPLIT, trained
from serve_helpers import split_request as request

from terarec.serve.export import export_bundle
from terarec.serve.scorer import Request, RequestError, Scorer


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("fast")
    _, run = trained(root, model=SPLIT)
    export_bundle(run / "checkpoint", root / "b")
    s = Scorer.from_bundle(root / "b", cache_bytes=2048)  # a tiny cache: misses too
    yield s
    s.close()


def general(scorer: Any, body: dict[str, Any]) -> Any:
    fast, scorer.fast = scorer.fast, None
    try:
        return scorer.score(Request(**body))
    finally:
        scorer.fast = fast


def test_fast_path_scores_as_the_general_path(scorer: Any) -> None:
    assert scorer.fast is not None and scorer.fast.table == "sparse"
    rng = np.random.default_rng(0)
    for n in (1, 7, 300):
        body = request(rng, n)
        r = Request(**body)
        assert scorer.fast.keys(r.user, r.candidates, n) is not None
        got, want = scorer.score(r), general(scorer, body)
        assert torch.equal(got.scores, want.scores)
        assert torch.equal(got.order, want.order) and got.ids == want.ids


@pytest.mark.parametrize("change", [
    {"candidates": {"C2": [1, 2], "C4": [[3, 4], [5]]}},  # a list of ids
    {"candidates": {"C2": ["a", "b"], "C4": [1, 2]}},  # strings
    {"candidates": {"C2": [1, 2]}},  # a missing feature
    {"candidates": {"C2": [1, 2], "C4": [2**63, 2**64 - 1]}},  # past int64
    {"user": {"C1": 3}},  # a missing user feature
    {"user": {"C1": 3, "C3": [4, 5]}},  # a user list
])
def test_requests_the_fast_path_does_not_fit_take_the_general_one(
        scorer: Any, change: dict[str, Any]) -> None:
    body = request(np.random.default_rng(1), 2, **change)
    body.pop("ids")
    r = Request(**body)
    assert scorer.fast.keys(r.user, r.candidates, 2) is None
    got, want = scorer.score(r), general(scorer, body)
    assert torch.equal(got.scores, want.scores)


def test_bad_ids_get_the_general_paths_error(scorer: Any) -> None:
    body = request(np.random.default_rng(2), 2, candidates={"C2": [1.5, 2], "C4": [1, 2]})
    body.pop("ids")
    with pytest.raises(RequestError, match="candidates.C2"):
        scorer.score(Request(**body))


def test_models_it_does_not_fit_have_none(tmp_path: Path) -> None:
    _, run = trained(tmp_path)  # no user side: one program
    export_bundle(run / "checkpoint", tmp_path / "b")
    s = Scorer.from_bundle(tmp_path / "b")
    try:
        assert s.fast is None
    finally:
        s.close()

"""CUDA graphs of the scorer's programs (serve/graphs.py): padded to a bucket, they score
as the programs run operator by operator, for every batch size, both paths, a
single-program model, and after the weights change in place (a live delta).

The GPU tests skip without CUDA; the bucket rule and the CPU fallback run everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from serve_helpers import SPLIT, trained
from serve_helpers import split_request as request

from terarec.serve.export import export_bundle
from terarec.serve.graphs import MAX_BUCKET, GraphedProgram, bucket
from terarec.serve.scorer import Request, Scorer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# probabilities through layers of at most 16 inputs: a padded batch may pick another
# GEMM kernel (another summation order); each output moves by a few roundings of its
# terms (|terms| <= ~4 here), far inside 64 float32 epsilons
TOL = 64 * torch.finfo(torch.float32).eps


def test_bucket_is_the_next_power_of_two_from_the_least() -> None:
    assert [bucket(n, 64) for n in (0, 1, 64, 65, 128, 129, 1000)] == [
        64, 64, 64, 128, 128, 256, 1024]
    assert [bucket(n, 1) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]


def test_cpu_tensors_run_the_program_as_it_is() -> None:
    lin = torch.nn.Linear(3, 2)
    g = GraphedProgram(lin, (0,), 64)
    x = torch.randn(5, 3)
    assert torch.equal(g(x), lin(x)) and not g.graphs


def test_a_scorer_on_the_cpu_runs_its_programs(split_run: tuple[Any, Path],
                                               tmp_path: Path) -> None:
    export_bundle(split_run[1] / "checkpoint", tmp_path / "b")
    s = Scorer.from_bundle(tmp_path / "b")
    try:
        assert s.run == s.programs
    finally:
        s.close()


def _both(s: Scorer, bodies: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of ``bodies`` (one pass) through the graphs, then through the programs."""
    graphed = torch.cat([r.scores for r in s.score_many([Request(**b) for b in bodies])])
    run, s.run = s.run, dict(s.programs)
    try:
        eager = torch.cat([r.scores for r in s.score_many([Request(**b) for b in bodies])])
    finally:
        s.run = run
    return graphed, eager


@cuda
def test_graphs_score_as_the_programs(split_run: tuple[Any, Path], tmp_path: Path) -> None:
    export_bundle(split_run[1] / "checkpoint", tmp_path / "b")
    s = Scorer.from_bundle(tmp_path / "b", device="cuda", cache_bytes=2048)
    try:
        assert isinstance(s.run["candidate"], GraphedProgram)
        rng = np.random.default_rng(0)
        for n in (1, 63, 64, 65, 300, 64):  # the fast path; a bucket used again
            got, want = _both(s, [request(rng, n)])
            torch.testing.assert_close(got, want, rtol=0, atol=TOL)
        # the general path: three users at once (the user program's batch of 3 padded
        # to 4), then a request with a list of ids
        bodies = [request(rng, n) for n in (5, 70, 1)]
        got, want = _both(s, bodies)
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
        got, want = _both(s, [request(rng, 2, candidates={"C2": [[1, 2], [3]],
                                                          "C4": [4, 5]})])
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
        buckets = {k[0] for k in s.run["candidate"].graphs}
        assert {64, 128, 512} <= buckets
        # weights changed in place (what a live delta does): the graphs read them
        prog = s.programs["candidate"]
        before = _both(s, [request(np.random.default_rng(1), 200)])[0]
        prog.load_state_dict({k: v * 1.5 for k, v in prog.state_dict().items()})
        got, want = _both(s, [request(np.random.default_rng(1), 200)])
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
        assert (got - before).abs().max() > 1e-3
    finally:
        s.close()


SINGLE = {  # single-program models (their graphs check a device: moved on loading)
    "dcn": {"model": {"kind": "dcn", "top_mlp": [16], "dcn_layers": 2, "dcn_low_rank": 4,
                      **SPLIT}},
    "deepfm": {"model": {"kind": "deepfm", "top_mlp": [16], **SPLIT},
               "tables": [{"name": "sparse", "dim": 9}]},
}


@cuda
@pytest.mark.parametrize("kind", sorted(SINGLE))
def test_a_single_program_model_and_a_batch_past_the_buckets(kind: str,
                                                             tmp_path: Path) -> None:
    _, run = trained(tmp_path, **SINGLE[kind])
    export_bundle(run / "checkpoint", tmp_path / "b")
    s = Scorer.from_bundle(tmp_path / "b", device="cuda")
    try:
        assert s.mode == "single" and isinstance(s.run["model"], GraphedProgram)
        rng = np.random.default_rng(2)
        for n in (3, 100):
            got, want = _both(s, [request(rng, n)])
            torch.testing.assert_close(got, want, rtol=0, atol=TOL)
        big = s.run["model"]
        x = [torch.zeros(MAX_BUCKET + 1, *a.shape[1:], device="cuda")
             for a in next(iter(big.graphs.values()))[0]]
        before = len(big.graphs)
        big(*x)  # run as it is, no graph recorded
        assert len(big.graphs) == before
    finally:
        s.close()

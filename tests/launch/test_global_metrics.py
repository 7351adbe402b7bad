"""Rank-sharded data and global metrics on a real 2-process gloo job.

Each rank reads its own shard of the eval stream (uneven: 3 batches vs 2), scores it
with the same freshly built model and computes ``CTRMetrics(distributed=True)``; the
result must be the 1-process metrics over the whole eval set. Also: the ranks' rows are
disjoint and together complete, a rank holding no samples still gets global metrics,
and each rank's train stream resumes from its own position.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from launch_helpers import PY, WORKER, Ranks, free_port, torchrun_env

from terarec.config import config_from_dict
from terarec.data import DataError, build_source
from terarec.trainer.loop import build_components, evaluate
from terarec.trainer.metrics import CTRMetrics
from tests.numerics import assert_close, f32_tol, f64_tol

CFG: dict[str, Any] = {
    "name": "dist-metrics",
    "seed": 3,
    "data": {
        "kind": "synthetic",
        "batch_size": 64,
        "eval_batch_size": 512,
        "prefetch_batches": 0,
        "synthetic": {"num_dense": 4, "num_sparse": 4, "vocab_size": 300,
                      "eval_samples": 4 * 512 + 300},  # 5 batches: 3 on rank 0, 2 on rank 1
    },
    "tables": [{"name": "sparse", "dim": 8, "init": {"kind": "uniform", "scale": 0.5}}],
    "model": {"kind": "dlrm", "bottom_mlp": [16, 8], "top_mlp": [16]},
    "train": {"steps": 1, "device": "cpu", "threads": 1, "progress": False},
}
KEYS = ("auc", "ne", "logloss", "calibration", "ctr")


def _ids(batches: Any) -> list[float]:
    out: list[float] = []
    for b in batches:
        d = b.dense[:, :2].double()
        out += (d[:, 0] * 1e4 + d[:, 1]).tolist()
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dist-metrics")
    port = free_port()
    with Ranks(tmp) as ranks:
        for r in range(2):
            ranks.start([PY, WORKER, "metrics", str(tmp), json.dumps(CFG)],
                        torchrun_env(r, 2, port))
        codes = ranks.wait(58)
        assert codes == [0, 0], ranks.output(0)[-2000:] + ranks.output(1)[-2000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def metric_tol(key: str, value: float, n: int) -> float:
    """Bound on one metric summed over ``n`` samples in two groupings: float64 sums,
    but calibration's numerator is a float32 sum (torchrec, per update)."""
    if key == "calibration":
        return f32_tol(abs(value), terms=n) + f64_tol(abs(value), terms=n)
    return f64_tol(abs(value), terms=n)


@pytest.mark.numerics
def test_global_auc_equals_the_one_process_auc(job: list[dict[str, Any]]) -> None:
    cfg = config_from_dict(CFG)
    parts = build_components(cfg)
    ref = evaluate(parts.model, build_source(cfg.data, "eval", seed=cfg.seed), parts.device)
    assert ref["samples"] == 4 * 512 + 300 and 0.05 < abs(ref["auc"] - 0.5)  # a real model
    locals_ = [r["local"]["samples"] for r in job]
    assert locals_ == [2 * 512 + 300, 2 * 512]  # uneven shards
    # The same model scores the same batches on every rank and in this process; what
    # differs is how the sums group the samples: float64 sums across batches and ranks,
    # and calibration's float32 sum of the predictions, taken over all of a process's
    # staged batches at once (the ranks' halves vs the whole; tests/numerics.py).
    n = ref["samples"]
    for r in job:
        got = r["global"]
        assert got["samples"] == n
        for k in KEYS:
            assert_close(got[k], ref[k], metric_tol(k, ref[k], n), k)


@pytest.mark.numerics
def test_a_rank_without_samples_still_gets_the_global_metrics(job: list[dict]) -> None:
    cfg = config_from_dict(CFG)
    parts = build_components(cfg)
    ref = CTRMetrics()
    with torch.no_grad():
        for b in build_source(cfg.data, "eval", seed=cfg.seed, rank=0, world_size=2):
            ref.update(torch.sigmoid(parts.model.eval()(b.dense, b.sparse)), b.labels)
    want = ref.compute()
    for r in job:
        got = r["rank0_only"]
        assert got["samples"] == want["samples"] == 2 * 512 + 300
        for k in KEYS:  # the same batches: only the float64 sums' order differs
            assert_close(got[k], want[k], metric_tol(k, want[k], want["samples"]), k)


def test_eval_shards_are_disjoint_and_complete(job: list[dict[str, Any]]) -> None:
    cfg = config_from_dict(CFG)
    whole = _ids(build_source(cfg.data, "eval", seed=cfg.seed))
    a, b = job[0]["eval_ids"], job[1]["eval_ids"]
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(whole) and len(set(whole)) == len(whole)


def test_each_rank_reads_and_resumes_its_own_train_stream(job: list[dict[str, Any]]) -> None:
    r0, r1 = job
    assert not set(sum(r0["train_ids"], [])) & set(sum(r1["train_ids"], []))
    for r, res in enumerate(job):
        assert res["resume_same"]  # a fresh source continues exactly after its position
        assert (res["train_state"]["rank"], res["train_state"]["world_size"]) == (r, 2)
    # The same stream as a source built for that rank in any process.
    cfg = config_from_dict(CFG)
    src = build_source(cfg.data, "train", seed=cfg.seed, rank=1, world_size=2)
    it = iter(src)
    assert [_ids([next(it)]) for _ in range(2)] == r1["train_ids"]
    src.close()
    # Another rank's position is refused, not silently read as this rank's.
    with pytest.raises(DataError, match="does not match this source"):
        build_source(cfg.data, "train", seed=cfg.seed, rank=0, world_size=2).load_state_dict(
            r1["train_state"])

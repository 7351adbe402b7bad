"""`terarec train` with the ``sync:`` config on two nodes of one rank each (loopback gloo).

* ``sync.k: 1`` is fully synchronous training: the same loss curve, rows and dense
  weights as one process on the global batch, within bounds derived from float32
  rounding (``train_helpers.run_bounds``: dense gradients averaged over the cross group,
  rows' gradients combined by the exchange, in another order than one process adds
  them), with device and host budgets that make both ranks evict into their host and
  SSD tiers;
* ``sync.k: 4`` merges every 4 steps: after the run both replicas hold the same rows
  (each node a full replica), the loss curve is not the synchronous one, and the
  cross-node bytes in ``metrics.jsonl`` / ``summary.json`` are a fraction of k = 1's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from train_helpers import (  # noqa: E402
    assert_same_run,
    equivalence_config,
    launch_ranks,
    losses,
    run_bounds,
    run_dir,
)

from terarec.config import config_from_dict  # noqa: E402
from terarec.trainer.checkpoint import read_tables  # noqa: E402
from terarec.trainer.loop import train  # noqa: E402


def _nodes(tmp: Path, cfg: dict[str, Any], nodes: int, *extra: str) -> None:
    """``terarec train`` on ``nodes`` nodes of one rank each (torchrun's variables)."""
    launch_ranks(tmp, cfg, nodes, 1, *extra)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kstep-train")


@pytest.fixture(scope="module")
def sync_run(work: Path) -> dict[str, Any]:
    cfg = equivalence_config(work, 2, "k1")
    cfg["sync"] = {"k": 1}
    _nodes(work, cfg, 2)
    return cfg


def _summary(cfg: dict[str, Any]) -> dict[str, Any]:
    return json.loads((run_dir(cfg) / "summary.json").read_text())


@pytest.mark.numerics
def test_k1_on_two_nodes_is_the_one_process_run(work: Path, sync_run: dict[str, Any]) -> None:
    ref = equivalence_config(work, 1, "one")
    threads = torch.get_num_threads()
    try:
        train(config_from_dict(ref, "<test>"))
    finally:
        torch.set_num_threads(threads)
    assert_same_run(sync_run, ref)
    sync = _summary(sync_run)["sync"]
    assert sync["merges"] == 0 and sync["dense_bytes"] > 0 and sync["sparse_bytes"] > 0
    assert sync["bytes_per_sample"] == pytest.approx(
        sync["bytes"] / (_summary(sync_run)["samples"] / 2))


@pytest.mark.numerics
@pytest.mark.slow
def test_k4_merges_and_replicas_agree(work: Path, sync_run: dict[str, Any]) -> None:
    cfg = equivalence_config(work, 2, "k4")
    cfg["sync"] = {"k": 4, "dense": "params+moments"}
    _nodes(work, cfg, 2)
    steps = cfg["train"]["steps"]
    ckpt = run_dir(cfg) / "checkpoint"
    a, b = (read_tables(ckpt, f"rank{r}/") for r in (0, 1))  # SSD snapshots' rows too
    for name in a:  # each node holds a full replica; after the last merge they agree
        ka, kb = a[name]["keys"], b[name]["keys"]
        oa, ob = torch.argsort(ka), torch.argsort(kb)
        assert torch.equal(ka[oa], kb[ob])
        dim = 8  # the weights (each replica keeps its own Adam state: sparse: delta)
        assert torch.equal(a[name]["rows"][oa, :dim], b[name]["rows"][ob, :dim])
    # not the sync path: the curve leaves the synchronous run's rounding bounds
    bound = run_bounds(sync_run)["loss"]
    assert any(abs(a - b) > bound(b, i) for i, (a, b) in enumerate(zip(losses(cfg),
                                                                       losses(sync_run))))
    sync = _summary(cfg)["sync"]
    assert sync["merges"] == steps // 4
    assert sync["bytes"] < 0.75 * _summary(sync_run)["sync"]["bytes"]  # here: 0.55x
    recs = [json.loads(ln) for ln in (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    logged = [r["sync"]["merges"] for r in recs if r["split"] == "train"]
    assert logged == [s // 4 for s in range(1, steps + 1)]  # log_every: 1


@pytest.mark.numerics
@pytest.mark.slow  # three 2-node launches
def test_a_resumed_k4_run_ends_where_the_straight_run_ends(work: Path) -> None:
    """Replicas' dense optimizer states differ between merges (``dense: params`` merges
    the weights only) and so does the bf16 merge's error feedback: each rank saves and
    restores its own, so a run resumed at a merge ends where the straight run ends, from a
    full checkpoint or from a delta."""
    steps = 16

    def config(name: str, n: int) -> dict[str, Any]:
        cfg = equivalence_config(work, 2, name, steps=n)
        cfg["sync"] = {"k": 4, "dense": "params", "dense_dtype": "bf16"}
        return cfg

    straight = config("k4-straight", steps)
    _nodes(work, straight, 2)
    cfg = config("k4-resumed", steps // 2)
    _nodes(work, cfg, 2)
    cfg["train"]["steps"] = steps
    _nodes(work, cfg, 2, "--resume", str(run_dir(cfg) / "checkpoint"))
    assert_same_run(cfg, straight, exact=True)  # the same ranks, kernels and batches
    # from a delta (taken at a merge): full@4 (no parent yet), delta@8, resumed at 8
    cfg = config("k4-delta", steps // 2 + 1)
    cfg["train"].update(delta_every=4, keep_checkpoints=2)
    _nodes(work, cfg, 2)
    delta = run_dir(cfg) / "deltas" / f"step{steps // 2}"
    assert json.loads((delta / "manifest.json").read_text())["kind"] == "delta"
    cfg["train"]["steps"] = steps
    _nodes(work, cfg, 2, "--resume", str(delta))
    assert_same_run(cfg, straight, exact=True)

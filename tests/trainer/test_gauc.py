"""GAUC against a hand computation: per group, the share of (click, non-click) pairs
ranked right (ties 1/2), weighted by the group's impressions."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.trainer.gauc import GAUCMeter, first_ids, gauc_of


def by_hand(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    num = den = 0.0
    for g in np.unique(groups):
        s, y = scores[groups == g], labels[groups == g] > 0.5
        pos, neg = s[y], s[~y]
        if len(pos) == 0 or len(neg) == 0:
            continue
        right = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg))
        num += len(s) * right / (len(pos) * len(neg))
        den += len(s)
    return num / den if den else math.nan


@pytest.mark.parametrize("seed", range(5))
def test_gauc_matches_a_hand_computation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    groups = rng.integers(0, 25, n) * 7919 - 10**12  # any int64 ids
    scores = rng.integers(0, 6, n) / 5.0  # many ties, within and across groups
    labels = (rng.random(n) < 0.3).astype(np.float32)
    assert gauc_of(scores, labels, groups) == pytest.approx(by_hand(scores, labels, groups),
                                                            abs=1e-12)


def test_gauc_edge_cases() -> None:
    assert math.isnan(gauc_of([], [], []))
    assert math.isnan(gauc_of([0.1, 0.2], [1, 1], [5, 5]))  # one class: no group counts
    # a perfect ranker within each group, a bad one across groups
    scores = [0.9, 0.8, 0.2, 0.1]
    labels = [1, 0, 1, 0]
    groups = [1, 1, 2, 2]
    assert gauc_of(scores, labels, groups) == 1.0


def test_meter_takes_the_first_id_of_the_feature_and_skips_samples_without_one() -> None:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["user", "ad"], torch.tensor([7, 7, 8, 9, 1, 2, 3, 4]),
        torch.tensor([1, 2, 0, 1, 1, 1, 1, 1]))  # user: [7], [7, 8], [], [9]
    ids, present = first_ids(kjt, "user")
    assert present.tolist() == [True, True, False, True]
    assert ids[present].tolist() == [7, 7, 9]
    m = GAUCMeter("user")
    probs = torch.tensor([0.9, 0.1, 0.5, 0.3])
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0])
    m.update(probs, labels, kjt)
    assert m.compute() == gauc_of([0.9, 0.1, 0.3], [1, 0, 1], [7, 7, 9]) == 1.0


def _cfg(tmp_path, gauc_feature: str):
    from terarec.config import config_from_dict

    return config_from_dict({
        "name": "g", "seed": 0,
        "data": {"kind": "synthetic", "batch_size": 64, "eval_batch_size": 256,
                 "synthetic": {"num_dense": 2, "num_sparse": 3, "vocab_size": 30,
                               "eval_samples": 1024}},
        "tables": [{"name": "sparse", "dim": 4}],
        "model": {"kind": "dlrm", "bottom_mlp": [4], "top_mlp": [8]},
        "train": {"steps": 30, "device": "cpu", "threads": 1, "progress": False,
                  "runs_dir": str(tmp_path), "gauc_feature": gauc_feature}}, "<gauc>")


def test_a_run_reports_gauc_by_its_feature(tmp_path) -> None:
    import json

    from terarec.trainer.loop import train

    summary = train(_cfg(tmp_path, "C1"))
    final = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text()
             .splitlines() if json.loads(x).get("split") == "eval"][-1]
    assert 0.0 < final["gauc"] < 1.0, final
    assert summary is not None


def test_an_unknown_gauc_feature_is_a_config_error_before_training(tmp_path) -> None:
    from terarec.config import ConfigError
    from terarec.trainer.loop import train

    with pytest.raises(ConfigError, match="train.gauc_feature: 'user'"):
        train(_cfg(tmp_path, "user"))


def _rank(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        rng = np.random.default_rng(rank)
        n = 40
        users = torch.tensor(rng.integers(0, 5, n))
        kjt = KeyedJaggedTensor.from_lengths_sync(["user"], users, torch.ones(n, dtype=torch.int64))
        probs = torch.tensor(rng.random(n), dtype=torch.float32)
        labels = torch.tensor(rng.random(n) < 0.4, dtype=torch.float32)
        m = GAUCMeter("user", distributed=True)
        m.update(probs, labels, kjt)
        out.put((rank, m.compute(), probs.numpy(), labels.numpy(), users.numpy()))
    finally:
        dist.destroy_process_group()


def test_distributed_gauc_is_the_gauc_of_every_rank_together() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    got.sort(key=lambda x: x[0])
    want = gauc_of(np.concatenate([g[2] for g in got]), np.concatenate([g[3] for g in got]),
                   np.concatenate([g[4] for g in got]))
    assert got[0][1] == got[1][1] == pytest.approx(want, abs=1e-12)

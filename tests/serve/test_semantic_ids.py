"""Semantic-id features: prefix keys, the planted ads of the synthetic generator, held-out
ads scored from their prefixes in training and through an exported bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from serve_helpers import trained
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import AdsConfig, ConfigError, SyntheticConfig, config_from_dict
from terarec.data import semantic_id_features
from terarec.data.keys import int_keys, semantic_id_keys
from terarec.data.synthetic import SyntheticGenerator, sparse_names
from terarec.hashing import mix64_np, salt_for
from terarec.serve.export import export_bundle
from terarec.serve.scorer import Request, RequestError, Scorer
from terarec.trainer.checkpoint import load_checkpoint
from terarec.trainer.loop import build_components, train


def chain_keys(tokens: list[int], feature: str) -> list[int]:
    """The prefix keys of one sequence, one token at a time (the reference)."""
    h, out = salt_for(feature) & ((1 << 64) - 1), []
    for t in tokens:
        h = int(mix64_np(np.array([h ^ (t & ((1 << 64) - 1))], np.uint64))[0])
        out.append(h - (1 << 64) if h >= 1 << 63 else h)
    return out


def test_prefix_keys_share_prefixes_and_follow_the_chain() -> None:
    seqs = [[3, 1, 4], [3, 1, 5], [3, 2], [], [9], [3, 1, 4, 1, 5]]
    lengths = np.array([len(s) for s in seqs])
    keys = semantic_id_keys(np.array([t for s in seqs for t in s]), lengths, "SID")
    got = np.split(keys, np.cumsum(lengths)[:-1])
    assert [list(g) for g in got] == [chain_keys(s, "SID") for s in seqs]
    assert got[0][:2].tolist() == got[1][:2].tolist() and got[0][2] != got[1][2]
    assert got[0][0] == got[2][0] and got[0][1] != got[2][1]
    assert got[5][:3].tolist() == got[0].tolist()
    assert semantic_id_keys(np.array([3]), np.array([1]), "other")[0] != got[0][0]
    with pytest.raises(ValueError, match="2 tokens for lengths summing to 3"):
        semantic_id_keys(np.array([1, 2]), np.array([3]), "SID")


def test_planted_ads_are_opt_in_and_hold_ads_out() -> None:
    plain = SyntheticConfig(num_dense=3, num_sparse=3, vocab_size=500)
    ads = SyntheticConfig(num_dense=3, num_sparse=3, vocab_size=500,
                          ads=AdsConfig(num_ads=3000, held_out=0.2))
    assert sparse_names(plain) == ["C1", "C2", "C3"]
    assert sparse_names(ads) == ["C1", "C2", "C3", "AD", "SID"]
    g0, g = SyntheticGenerator(plain, 0), SyntheticGenerator(ads, 0)
    base = g0.rows(np.random.default_rng(5), 4000)
    rows, raw = g.rows_and_raw(np.random.default_rng(5), 4000, "train")
    # the ads are drawn after everything else: the other features are the same draws
    assert np.array_equal(base.dense, rows.dense)
    assert all(np.array_equal(a, b) for a, b in zip(base.values, rows.values[:3]))
    # keys from raw values, as a file reader and the scorer make them
    assert np.array_equal(rows.values[4], semantic_id_keys(
        raw["SID"].ravel(), np.full(4000, 3), "SID"))
    assert np.array_equal(rows.lengths[4], np.full(4000, 3))
    held = set(np.flatnonzero(g.ads.held).tolist())
    assert 0.15 < len(held) / 3000 < 0.25
    assert not held & set(raw["AD"].ravel().tolist())
    _, ev = g.rows_and_raw(np.random.default_rng(6), 4000, "eval")
    assert set(ev["AD"].ravel().tolist()) <= held
    # held-out ads share their paths' prefixes with ads in training
    seen = {tuple(t[:2]) for t in g.ads.tokens[~g.ads.held]}
    assert np.mean([tuple(t[:2]) in seen for t in g.ads.tokens[g.ads.held]]) > 0.99
    with pytest.raises(ConfigError, match="ads: drawn by the numpy generator only"):
        config_from_dict({"name": "x", "data": {"synthetic": {
            "generator": "torch", "ads": {}}}, "tables": [{"name": "t", "dim": 4}],
            "train": {"steps": 1}}, "<x>")


ADS = {"synthetic": {"num_dense": 4, "num_sparse": 4, "vocab_size": 1000,
                     "zipf_alpha": 1.1, "teacher_scale": 0.5, "eval_samples": 16384,
                     "ads": {"num_ads": 2000}},
       "batch_size": 256, "eval_batch_size": 4096}


def ads_config(runs: Path, seed: int, semantic_ids: bool) -> Any:
    data = {**ADS, "synthetic": {**ADS["synthetic"], "ads": {"num_ads": 2000,
                                                              "semantic_ids": semantic_ids}}}
    return config_from_dict({
        "name": f"ads{seed}{int(semantic_ids)}", "seed": seed, "data": {"kind": "synthetic",
                                                                       **data},
        "tables": [{"name": "sparse", "dim": 8}],
        "model": {"kind": "dlrm", "bottom_mlp": [16, 8], "top_mlp": [32]},
        "optimizer": {"sparse": {"kind": "adam", "lr": 0.02},
                      "dense": {"kind": "adam", "lr": 0.005}},
        "train": {"steps": 300, "log_every": 300, "device": "cpu", "threads": 1,
                  "progress": False, "save_checkpoint": False, "runs_dir": str(runs)},
    }, "<ads>")


# Measured (these configs, 300 steps): held-out AUC gains of 0.188, 0.182, 0.184 for
# seeds 0, 1, 2; the test asserts half of the smallest.
MIN_GAIN = 0.09


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semantic_ids_score_ads_never_seen_in_training(tmp_path: Path, seed: int) -> None:
    """Eval shows only the 20% of ads held out of training: their AD keys were never
    trained, so without SID the model knows nothing of them; with SID it scores them
    from the prefixes they share with seen ads."""
    with_sid = train(ads_config(tmp_path, seed, True))["final_eval"]["auc"]
    without = train(ads_config(tmp_path, seed, False))["final_eval"]["auc"]
    assert with_sid - without > MIN_GAIN, (with_sid, without)


@pytest.mark.numerics
def test_bundle_scores_semantic_id_tokens_like_training(tmp_path: Path) -> None:
    """A bundle of a model trained with SID: requests send raw ids and token lists, the
    scorer keys the tokens by prefix, and the scores equal the training model's forward
    on the same samples (fp32 bundle: within a few float32 ulps of the probability)."""
    model = {"user_features": ["C1", "C3"], "user_dense": True}
    cfg, run = trained(tmp_path, data=ADS, model=model, train={"steps": 60})
    manifest = export_bundle(run / "checkpoint", tmp_path / "b")
    assert manifest["features"]["semantic_ids"] == {"SID": 3}
    assert manifest["features"]["candidate"] == ["C2", "C4", "AD", "SID"]
    assert semantic_id_features(cfg.data) == {"SID": 3}
    gen = SyntheticGenerator(cfg.data.synthetic, cfg.seed)
    rows, raw = gen.rows_and_raw(np.random.default_rng(11), 64, "eval")
    parts = build_components(cfg)
    load_checkpoint(run / "checkpoint", parts)
    parts.model.eval()
    batch = rows.to_batch(gen.names)
    with torch.no_grad():
        want = torch.sigmoid(parts.model(batch.dense, batch.sparse))
    # four requests of 16 candidates, each under its first sample's user side
    scorer = Scorer.from_bundle(tmp_path / "b")
    try:
        for r in range(4):
            first, at = 16 * r, np.arange(16 * r, 16 * (r + 1))
            req = Request(
                user={f: int(raw[f][first, 0]) for f in ("C1", "C3")},
                dense=rows.dense[first].tolist(),
                candidates={**{f: raw[f][at, 0].tolist() for f in ("C2", "C4", "AD")},
                            "SID": raw["SID"][at].tolist()})
            got = scorer.score(req).scores
            # the reference: the training model on those 16 samples with the user side
            # (C1, C3, dense) of the first, keys made from the raw values
            who = {f: np.full(16, first) if f in ("C1", "C3") else at for f in gen.names}
            values = [int_keys(raw[f][who[f], 0], f) for f in gen.names[:-1]]
            values.append(semantic_id_keys(raw["SID"][at].ravel(), np.full(16, 3), "SID"))
            kjt = KeyedJaggedTensor.from_lengths_sync(
                gen.names, torch.from_numpy(np.concatenate(values)),
                torch.tensor([1] * 16 * (len(gen.names) - 1) + [3] * 16, dtype=torch.int32))
            dense = torch.from_numpy(np.repeat(rows.dense[first: first + 1], 16, axis=0))
            with torch.no_grad():
                ref = torch.sigmoid(parts.model(dense, kjt))
            assert float((got - ref).abs().max()) <= 1e-5
            # the first candidate is the first sample itself
            assert abs(float(got[0]) - float(want[first])) <= 1e-5
        with pytest.raises(RequestError, match="SID: semantic-id tokens must be integers"):
            scorer.score(Request(user={"C1": 1}, candidates={"SID": [["a", "b"]]}))
    finally:
        scorer.close()

"""The synthetic generator: determinism, shape, Zipf skew, teacher signal."""

from __future__ import annotations

import numpy as np
import pytest

from terarec.config import DataConfig, SyntheticConfig
from terarec.data import build_source, dense_feature_names, sparse_feature_names
from terarec.data.keys import int_keys
from terarec.data.synthetic import SyntheticGenerator, zipf_ranks
from tests.numerics import assert_close, f32_tol


def take(src, n: int) -> list:
    it = iter(src)
    out = [next(it) for _ in range(n)]
    src.close()
    return out


def test_shape_and_names() -> None:
    cfg = DataConfig(batch_size=64, synthetic=SyntheticConfig(num_dense=3, num_sparse=4,
                                                              values_per_feature=2))
    assert sparse_feature_names(cfg) == ["C1", "C2", "C3", "C4"]
    assert dense_feature_names(cfg) == ["I1", "I2", "I3"]
    (b,) = take(build_source(cfg, "train", seed=1), 1)
    assert b.dense.shape == (64, 3) and b.labels.shape == (64,)
    assert b.sparse.keys() == ["C1", "C2", "C3", "C4"]
    assert b.sparse.lengths().eq(2).all() and b.sparse.values().numel() == 4 * 64 * 2
    assert set(b.labels.unique().tolist()) <= {0.0, 1.0}
    assert b.teacher_prob is not None and b.teacher_prob.shape == (64,)
    assert b.position == {"kind": "synthetic", "split": "train", "rank": 0, "world_size": 1,
                          "batch": 1}


def test_deterministic_by_seed_split_rank(as_tuple) -> None:
    cfg = DataConfig(batch_size=128, prefetch_batches=2)
    a = [as_tuple(b) for b in take(build_source(cfg, "train", seed=3), 3)]
    b = [as_tuple(b) for b in take(build_source(cfg, "train", seed=3), 3)]
    c = [as_tuple(b) for b in take(build_source(cfg, "train", seed=4), 3)]
    r1 = [as_tuple(b) for b in take(build_source(cfg, "train", seed=3, rank=1, world_size=2), 3)]
    assert a == b and a != c and a != r1


def test_eval_stream_is_finite_and_same_for_any_world_size() -> None:
    cfg = DataConfig(eval_batch_size=100, synthetic=SyntheticConfig(eval_samples=1050))
    one = list(build_source(cfg, "eval", seed=0))
    assert [b.batch_size for b in one] == [100] * 10 + [50]
    parts = [list(build_source(cfg, "eval", seed=0, rank=r, world_size=3)) for r in range(3)]
    lab = sorted(x for p in parts for b in p for x in b.teacher_prob.tolist())
    assert lab == sorted(x for b in one for x in b.teacher_prob.tolist())
    train = take(build_source(cfg, "train", seed=0), 1)[0]
    assert not np.isin(train.sparse.values().numpy()[:100], one[0].sparse.values().numpy()).all()


@pytest.mark.parametrize("alpha", [0.6, 1.0, 1.1, 2.0])
def test_zipf_bounded_and_skewed(alpha: float) -> None:
    u = np.random.default_rng(0).random(200_000)
    r = zipf_ranks(u, alpha, 1000)
    assert r.min() >= 1 and r.max() <= 1000
    counts = np.bincount(r, minlength=1001)[1:]
    # P(1)/P(10) ~ 10^alpha for the continuous law (rank 1 covers [1, 2)).
    ratio = counts[0] / counts[9]
    expect = (1 - 2 ** (1 - alpha)) / (10 ** (1 - alpha) - 11 ** (1 - alpha)) if alpha != 1 \
        else np.log(2) / np.log(11 / 10)
    assert ratio == pytest.approx(expect, rel=0.15)
    near = zipf_ranks(u[:1000], 1.0 + 1e-12, 1000)
    assert (near == zipf_ranks(u[:1000], 1.0, 1000)).mean() > 0.99


def test_keys_skewed_not_small_and_match_reader_hashing() -> None:
    cfg = SyntheticConfig(num_sparse=2, vocab_size=1000)
    gen = SyntheticGenerator(cfg, 0)
    rows = gen.rows(np.random.default_rng(0), 50_000)
    keys, counts = np.unique(rows.values[0], return_counts=True)
    top = np.sort(counts)[::-1]
    assert top[0] > 20 * np.median(counts)  # heavy head
    assert len(keys) <= 1000
    ids = np.arange(1000, dtype=np.uint64)
    assert set(keys.tolist()) <= set(int_keys(ids, "C1").tolist())  # key = mix64(id ^ salt)
    # the most popular id is not id 0 (rank -> id is a bijective mix)
    id_of = dict(zip(int_keys(ids, "C1").tolist(), range(1000)))
    assert id_of[int(keys[np.argmax(counts)])] != 0


def test_teacher_auc_in_range(roc_auc) -> None:
    gen = SyntheticGenerator(SyntheticConfig(), 0)
    rows = gen.rows(np.random.default_rng(0), 100_000)
    auc = roc_auc(rows.teacher, rows.labels)
    assert 0.75 < auc < 0.87
    assert 0.2 < rows.labels.mean() < 0.4
    assert abs(rows.labels.mean() - rows.teacher.mean()) < 0.01  # calibrated
    flat = SyntheticGenerator(SyntheticConfig(teacher_scale=0.0, teacher_dim=0), 0)
    r0 = flat.rows(np.random.default_rng(0), 50_000)
    # only the bias remains: sigmoid(-1) in float32, a few roundings of its size
    want = np.full(r0.teacher.shape, 1 / (1 + np.exp(1.0)))
    assert_close(r0.teacher, want, f32_tol(1.0, terms=4), "sigmoid(bias)")

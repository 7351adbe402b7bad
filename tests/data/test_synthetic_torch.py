"""The torch synthetic generator against the numpy one it reproduces.

Exact: rank -> key (every V up to 2**62, wraparound included), uniform -> rank, the KJT
layout, determinism. Within float32 rounding: the teacher as a function of (keys, dense).
Statistical (bounds from standard errors, 5 sigma): key-rank frequencies, dense moments,
label rate, oracle AUC. CUDA variants skip without CUDA.

``python tests/data/test_synthetic_torch.py`` prints samples/s of both generators.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from terarec.config import DenseTransform, SyntheticConfig
from terarec.data.rows import Rows
from terarec.data.synthetic import SALT_A, SALT_U, SyntheticGenerator, zipf_ranks
from terarec.data.synthetic_torch import (
    TorchSyntheticGenerator,
    _mix64_,
    batch_seed,
    zipf_ranks_torch,
)
from terarec.hashing import mix64_np

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
    ),
]
EPS32 = torch.finfo(torch.float32).eps
SIGMAS = 5.0


def cfg_with_vocab(v: int, **kw) -> SyntheticConfig:
    """A config with any ``vocab_size`` (the config checks <= 1e9; the code allows 2**62)."""
    cfg = SyntheticConfig(**kw)
    cfg.vocab_size = v
    return cfg


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a loaded 2-core machine a second one only spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def numpy_keys(gen: SyntheticGenerator, ranks: np.ndarray) -> np.ndarray:
    """``SyntheticGenerator.rows``' rank -> key lines: uint64 ranks ``[F, m]`` -> int64."""
    with np.errstate(over="ignore"):
        ids = ((ranks - np.uint64(1)) * gen.mult + gen.add) % np.uint64(gen.cfg.vocab_size)
    return mix64_np(ids ^ gen.salts).view(np.int64)


def test_inplace_mix_equals_mix64_np() -> None:
    x = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 10_000, dtype=np.int64)
    x[:4] = [0, -1, 2**63 - 1, -(2**63)]
    t = torch.from_numpy(x.copy())
    assert np.array_equal(_mix64_(t, torch.empty_like(t)).numpy(), mix64_np(x).view(np.int64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "vocab", [1, 7, 2**20, 100_000, 10**9, 3_037_000_499, 3_000_000_019, 2**40 + 15, 2**62 - 57]
)
def test_rank_to_key_matches_numpy(vocab: int, device: str) -> None:
    """Bit-identical to numpy's uint64 formula; for V > ~3.04e9 its product wraps."""
    cfg = cfg_with_vocab(vocab)
    gen, tgen = SyntheticGenerator(cfg, 0), TorchSyntheticGenerator(cfg, 0, device=device)
    r = np.random.default_rng(vocab % 1000).integers(1, vocab + 1, (cfg.num_sparse, 3000))
    r[:, :4] = [1, min(2, vocab), max(vocab - 1, 1), vocab]
    want = numpy_keys(gen, r.astype(np.uint64))
    got = tgen.ranks_to_keys(torch.from_numpy(r).to(device)).cpu().numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.0 + 1e-12, 1.1, 1.2, 2.5])
@pytest.mark.parametrize("vocab", [7, 2**20, 3_000_000_019])
def test_uniform_to_rank_to_key_matches_numpy(vocab: int, alpha: float, device: str) -> None:
    """Same ranks for the same uniforms, except where x is within float64 rounding of an
    integer (libm vs torch's exp/log1p may differ by an ulp there); keys then equal."""
    u = np.random.default_rng(1).random(20_000)
    u[:3] = [0.0, 0.5, 1.0 - 2.0**-53]
    want = zipf_ranks(u, alpha, vocab)
    got = zipf_ranks_torch(torch.from_numpy(u).to(device), alpha, vocab).cpu().numpy()
    assert got.min() >= 1 and got.max() <= vocab and got[0] == 1
    bad = np.flatnonzero(got != want)
    if bad.size:  # allowed only at a near-integer x (4 ulps), off by one
        s, big_l = 1.0 - alpha, math.log(vocab + 1.0)
        ub = u[bad]
        if abs(s) < 1e-9:
            x = np.exp(ub * big_l)
        else:
            x = np.exp(np.log1p(ub * math.expm1(s * big_l)) / s)
        assert np.all(np.abs(x - np.round(x)) <= 4 * np.spacing(x))
        assert np.all(np.abs(got[bad] - want[bad]) <= 1)
    cfg = cfg_with_vocab(vocab, num_sparse=1, zipf_alpha=alpha)
    tkeys = TorchSyntheticGenerator(cfg, 0, device=device).ranks_to_keys(
        torch.from_numpy(want[None]).to(device)
    )
    assert np.array_equal(
        tkeys.cpu().numpy(), numpy_keys(SyntheticGenerator(cfg, 0), want[None].astype(np.uint64))
    )


def teacher64(gen: SyntheticGenerator, keys: np.ndarray, dense: np.ndarray):
    """The teacher in float64 from ``gen``'s constants, and its error scale.

    Returns:
        (logit ``[n]``, mabs ``[n]``, n_terms): ``mabs`` is the logit's expression with every
        term replaced by its absolute value (``|uf|`` by the sum of ``|u|`` over the ``k``
        keys), ``n_terms`` the number of terms summed anywhere in it. A float32 evaluation,
        in any summation order, is within ``n_terms * (eps / 2) * mabs`` of the exact value
        (first order), so two evaluations differ by at most ``n_terms * eps * mabs``.
    """
    cfg = gen.cfg
    nf, k, d, nd = cfg.num_sparse, cfg.values_per_feature, cfg.teacher_dim, cfg.num_dense
    n = keys.shape[1] // k
    ku = keys.view(np.uint64)

    def lanes(h: np.ndarray, m: int) -> np.ndarray:
        return np.stack(
            [((h >> np.uint64(16 * j)) & np.uint64(0xFFFF)) * (2.0 / 65536.0) - 1.0
             for j in range(m)], -1)

    a = lanes(mix64_np(ku ^ SALT_A), 4).sum(-1) * gen.a_scale  # [F, n*k]
    w = gen.w.astype(np.float64)
    dense = dense.astype(np.float64)
    logit = cfg.teacher_bias + dense @ w + a.reshape(nf, n, k).sum((0, 2))
    mabs = abs(cfg.teacher_bias) + np.abs(dense) @ np.abs(w)
    mabs += np.abs(a).reshape(nf, n, k).sum((0, 2))
    if d and gen.u_scale:
        u = np.concatenate(
            [lanes(mix64_np(ku ^ SALT_U[g]), min(4, d - 4 * g)) for g in range((d + 3) // 4)], -1
        ).reshape(nf, n, k, d) * gen.u_scale
        uf, uabs = u.sum(2), np.abs(u).sum(2)  # [F, n, d]
        logit += 0.5 * ((uf.sum(0) ** 2).sum(-1) - (uf**2).sum((0, 2)))
        mabs += 0.5 * ((uabs.sum(0) ** 2).sum(-1) + (uabs**2).sum((0, 2)))
    n_terms = 1 + nd + nf * k * 5 + d * (nf * k + nf + 2) + nf * d + 4
    return logit, mabs, n_terms


TEACHER_CFGS = [
    SyntheticConfig(),
    SyntheticConfig(num_dense=0, values_per_feature=3, teacher_dim=6, teacher_pairwise_scale=2.0),
    SyntheticConfig(num_sparse=5, teacher_dim=0, teacher_scale=3.0, teacher_bias=0.5),
    SyntheticConfig(num_sparse=40, teacher_dim=9, teacher_scale=4.0, values_per_feature=2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ci", range(len(TEACHER_CFGS)))
def test_teacher_equals_numpy_generator(ci: int, device: str) -> None:
    """Given the numpy generator's own keys and dense values, the torch teacher's prob is
    numpy's ``Rows.teacher`` within the float32 bound (sigmoid' <= 1/4, plus a few ulps
    for each sigmoid), and its logit the float64 teacher within half that bound."""
    cfg = TEACHER_CFGS[ci]
    gen = SyntheticGenerator(cfg, 0)
    rows = gen.rows(np.random.default_rng(ci), 2000)
    keys = np.stack(rows.values)
    t = TorchSyntheticGenerator(cfg, 0, device=device)
    logit = t.teacher_logit(
        torch.from_numpy(keys).to(device), torch.from_numpy(rows.dense).to(device)
    )
    assert logit.dtype == torch.float32 and logit.device.type == device
    logit = logit.cpu().numpy().astype(np.float64)
    ref, mabs, n_terms = teacher64(gen, keys, rows.dense)
    bound = n_terms * EPS32 * mabs
    assert np.all(np.abs(logit - ref) <= bound / 2)
    prob = 1.0 / (1.0 + np.exp(-logit))
    assert np.all(np.abs(prob - rows.teacher) <= bound / 4 + 4 * EPS32)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_transform_after_teacher(device: str) -> None:
    cfg = SyntheticConfig(num_sparse=3)
    a = TorchSyntheticGenerator(cfg, 0, device=device)
    b = TorchSyntheticGenerator(cfg, 0, DenseTransform.LOG1P, device=device)
    ga = torch.Generator(device=device).manual_seed(5)
    gb = torch.Generator(device=device).manual_seed(5)
    sa, sb = a.sample(ga, 500), b.sample(gb, 500)
    assert torch.equal(sa.teacher, sb.teacher) and torch.equal(sa.labels, sb.labels)
    assert torch.equal(sb.dense, torch.log1p(sa.dense.clamp_min(0.0)))


def auc_and_se(score: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mann-Whitney AUC (tied scores share their mean rank) and its Hanley-McNeil SE."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    ranks = np.empty(len(s))
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    n1 = int(y.sum())
    n0 = len(y) - n1
    auc = (ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    return float(auc), math.sqrt(var)


def rank_bin_probs(cfg: SyntheticConfig, edges: list[int]) -> np.ndarray:
    """P(rank in [edges[i], edges[i+1])) of the continuous power law, floored."""
    s, v = 1.0 - cfg.zipf_alpha, cfg.vocab_size
    x = np.array(edges, dtype=np.float64)
    cdf = np.log(x) / math.log(v + 1.0) if abs(s) < 1e-9 else np.expm1(s * np.log(x)) / math.expm1(
        s * math.log(v + 1.0))
    return np.diff(cdf)


def rank_hist(t: TorchSyntheticGenerator, keys: np.ndarray, edges: list[int]) -> np.ndarray:
    """Counts of keys ``[F, m]`` whose rank falls in each bin (ranks past edges[-2]: last)."""
    top = edges[-2]
    table = t.ranks_to_keys(
        torch.arange(1, top, device=t.device).expand(keys.shape[0], -1).contiguous()
    ).cpu().numpy()
    counts = np.zeros(len(edges) - 1, np.int64)
    for f in range(keys.shape[0]):
        order = np.argsort(table[f])
        pos = np.searchsorted(table[f], keys[f], sorter=order).clip(0, top - 2)
        hit = table[f][order[pos]] == keys[f]
        rank = np.where(hit, order[pos] + 1, top)
        counts += np.histogram(rank, bins=edges)[0]
    return counts


@pytest.mark.parametrize("device", DEVICES)
def test_distribution_matches_numpy(device: str) -> None:
    """200k samples from each: rank frequencies against the exact bin probabilities,
    dense moments against N(0, 1), label rate, mean teacher prob and oracle AUC between the
    generators, labels against their teacher prob; all at 5 standard errors."""
    cfg, n = SyntheticConfig(), 200_000
    rows = SyntheticGenerator(cfg, 0).rows(np.random.default_rng(7), n)
    t = TorchSyntheticGenerator(cfg, 0, device=device)
    st = t.sample(torch.Generator(device=device).manual_seed(7), n)
    got = {
        "numpy": (np.stack(rows.values), rows.dense, rows.labels, rows.teacher),
        "torch": tuple(x.cpu().numpy() for x in (st.keys, st.dense, st.labels, st.teacher)),
    }
    edges = [1, 2, 3, 4, 5, 6, 11, 101, 1001, cfg.vocab_size + 1]
    p = rank_bin_probs(cfg, edges)
    m = cfg.num_sparse * n * cfg.values_per_feature  # independent draws
    stats = {}
    for name, (keys, dense, labels, teacher) in got.items():
        freq = rank_hist(t, keys, edges) / m
        assert np.all(np.abs(freq - p) <= SIGMAS * np.sqrt(p * (1 - p) / m)), (name, freq, p)
        nd = dense.size
        assert abs(dense.mean()) <= SIGMAS / math.sqrt(nd)
        assert abs(dense.var() - 1.0) <= SIGMAS * math.sqrt(2.0 / nd)
        se = math.sqrt(float((teacher * (1 - teacher)).astype(np.float64).sum())) / n
        assert abs(labels.mean() - teacher.mean(dtype=np.float64)) <= SIGMAS * se
        stats[name] = (labels.mean(), teacher.mean(dtype=np.float64), teacher.std(), *auc_and_se(
            teacher, labels))
    (ra, ta, sa, aa, ea), (rb, tb, sb, ab, eb) = stats["numpy"], stats["torch"]
    assert abs(ra - rb) <= SIGMAS * math.sqrt(ra * (1 - ra) * 2 / n)
    assert abs(ta - tb) <= SIGMAS * math.hypot(sa, sb) / math.sqrt(n)
    assert abs(aa - ab) <= SIGMAS * math.hypot(ea, eb), (aa, ab, ea, eb)
    assert 0.7 < aa < 0.9  # the documented oracle AUC of about 0.8


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_by_seed(device: str) -> None:
    seeds = {batch_seed(s, sp, r, i) for s in (0, 1, -3) for sp in (0, 1) for r in (0, 1, 7)
             for i in (0, 1, 2**40)}
    assert len(seeds) == 3 * 2 * 3 * 3 and all(0 <= s < 2**63 for s in seeds)
    assert batch_seed(3, 0, 1, 5) == batch_seed(3, 0, 1, 5)
    cfg = SyntheticConfig(values_per_feature=2)
    t = TorchSyntheticGenerator(cfg, 3, device=device)
    names = [f"C{i}" for i in range(1, cfg.num_sparse + 1)]

    def draw(i: int):
        gen = torch.Generator(device=device).manual_seed(batch_seed(3, 0, 1, i))
        b = t.batch(gen, 256, names)
        return b.sparse.values(), b.dense, b.labels, b.teacher_prob

    a, b, c = draw(4), draw(4), draw(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("transform", [DenseTransform.NONE, DenseTransform.LOG1P])
def test_cuda_graph_replays_the_eager_samples(transform: DenseTransform) -> None:
    """On CUDA each batch size's sample ops replay as one captured graph: the same
    samples, bit for bit, as the eager ops; later batches do not overwrite earlier
    ones; another batch size gets its own graph."""
    cfg = SyntheticConfig(values_per_feature=2, teacher_dim=6)
    graphed = TorchSyntheticGenerator(cfg, 0, transform, device="cuda")
    eager = TorchSyntheticGenerator(cfg, 0, transform, device="cuda", graphs=False)

    def draw(t: TorchSyntheticGenerator, i: int, n: int):
        return t.sample(torch.Generator(device="cuda").manual_seed(batch_seed(0, 0, 0, i)), n)

    got = [draw(graphed, i, n) for i, n in ((0, 512), (1, 512), (2, 100), (3, 512))]
    want = [draw(eager, i, n) for i, n in ((0, 512), (1, 512), (2, 100), (3, 512))]
    assert graphed.graphs and sorted(graphed._graphs) == [100, 512]
    for g, w in zip(got, want):
        for name, x, y in zip(w._fields, g, w):
            assert torch.equal(x, y), name
    assert not torch.equal(got[0].keys, got[1].keys)


@pytest.mark.parametrize("device", DEVICES)
def test_kjt_layout_equals_rows_to_batch(device: str) -> None:
    cfg = SyntheticConfig(num_dense=4, num_sparse=3, values_per_feature=2)
    t = TorchSyntheticGenerator(cfg, 0, device=device)
    names = ["C1", "C2", "C3"]
    st = t.sample(torch.Generator(device=device).manual_seed(1), 50)
    got = t.to_batch(st, names, {"batch": 1})
    cpu = [x.cpu().numpy() for x in st]
    want = Rows(labels=cpu[2], dense=cpu[0], lengths=np.full((3, 50), 2, np.int32),
                values=list(cpu[1]), teacher=cpu[3]).to_batch(names, {"batch": 1})
    assert got.sparse.keys() == want.sparse.keys() == names
    assert got.sparse.stride() == want.sparse.stride() == 50 and got.position == {"batch": 1}
    for g, w in [(got.sparse.values(), want.sparse.values()),
                 (got.sparse.lengths(), want.sparse.lengths()),
                 (got.dense, want.dense), (got.labels, want.labels),
                 (got.teacher_prob, want.teacher_prob)]:
        assert g.device.type == device and g.dtype == w.dtype and torch.equal(g.cpu(), w)
    assert torch.equal(got.sparse.values()[50 * 2 : 51 * 2].cpu(), st.keys[1, :2].cpu())
    with pytest.raises(ValueError, match="names"):
        t.to_batch(st, names[:2])


def bench(n: int = 16_384, reps: int = 8) -> None:
    """Prints samples/s of both generators (default config, ``n`` per batch)."""
    cfg = SyntheticConfig()
    gen = SyntheticGenerator(cfg, 0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def rate(f) -> float:
        f(0)
        t0 = time.perf_counter()
        for i in range(reps):
            f(i + 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return reps * n / (time.perf_counter() - t0)

    print(f"numpy: {rate(lambda i: gen.rows(np.random.default_rng(i), n)) / 1e6:.3f} M/s")
    for dev in devices:
        t = TorchSyntheticGenerator(cfg, 0, device=dev)
        tg = torch.Generator(device=dev)
        for threads in [1, torch.get_num_threads()] if dev == "cpu" else [None]:
            if threads:
                torch.set_num_threads(threads)
            r = rate(lambda i, t=t, tg=tg: t.sample(tg.manual_seed(i), n))
            print(f"torch {dev} (threads={threads}): {r / 1e6:.3f} M/s")


if __name__ == "__main__":
    bench()

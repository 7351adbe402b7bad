"""Count-min sketch and frequency-based admission against exact counts (a Counter)."""

from __future__ import annotations

import io
import math
import time
from collections import Counter

import numpy as np
import pytest
import torch

from terarec.ps.admission import INT32_MAX, Admission, CountMinSketch


def _batches(seed: int, n_batches: int, size: int, universe: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Keys spread over int64 (negative ones, extremes) with many duplicates per batch.
    pool = torch.randint(-(2**63), 2**63 - 1, (universe,), generator=g)
    pool[:3] = torch.tensor([-1, 0, 2**63 - 1])
    return [pool[torch.randint(0, universe, (size,), generator=g)] for _ in range(n_batches)]


def _zipf_stream(seed: int, n: int, universe: int, s: float = 1.1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, universe + 1) ** s
    ids = rng.choice(universe, size=n, p=p / p.sum())
    salt = rng.integers(-(2**62), 2**62, universe)  # arbitrary int64 ids per rank
    return torch.from_numpy(salt[ids])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("width", [7, 64, 4096])
def test_estimates_never_below_true_counts(seed: int, width: int) -> None:
    """Plain adds with duplicates and with counts; small widths force collisions."""
    sk = CountMinSketch(width, depth=3, seed=seed)
    ref: Counter[int] = Counter()
    for i, keys in enumerate(_batches(seed, 8, 300, 500)):
        if i % 2:
            uniq, counts = torch.unique(keys, return_counts=True)
            sk.add(uniq, counts * 2)
            ref.update({k: 2 * c for k, c in zip(uniq.tolist(), counts.tolist())})
        else:
            sk.add(keys)
            ref.update(keys.tolist())
        probe = torch.tensor(list(ref))
        est = sk.estimate(probe)
        assert est.dtype == torch.int64 and est.shape == probe.shape
        assert (est >= torch.tensor([ref[k] for k in probe.tolist()])).all()
    assert sk.total == sum(ref.values())


@pytest.mark.parametrize("seed", range(4))
def test_conservative_between_truth_and_plain(seed: int) -> None:
    """Same hashes: truth <= conservative <= plain, key by key, batch by batch."""
    plain = CountMinSketch(32, depth=2, seed=seed)
    cons = CountMinSketch(32, depth=2, seed=seed)
    ref: Counter[int] = Counter()
    for keys in _batches(seed, 10, 200, 400):
        uniq, counts = torch.unique(keys, return_counts=True)
        plain.add(uniq, counts)
        cons.add(uniq, counts, conservative=True)
        ref.update(keys.tolist())
        probe = torch.tensor(list(ref))
        truth = torch.tensor([ref[k] for k in probe.tolist()])
        c, p = cons.estimate(probe), plain.estimate(probe)
        assert (truth <= c).all() and (c <= p).all()


def test_exact_without_collisions() -> None:
    sk = CountMinSketch(1 << 16, depth=4)
    keys = torch.tensor([5, -5, 2**62, 5, 5])
    sk.add(keys)
    sk.add(torch.tensor([-5]), torch.tensor([10]))
    assert sk.estimate(torch.tensor([5, -5, 2**62, 6])).tolist() == [3, 11, 1, 0]


@pytest.mark.parametrize("conservative", [False, True])
def test_zipf_error_within_bound(conservative: bool) -> None:
    """P[est > true + e/width * N] <= e^-depth, checked over all distinct keys."""
    stream = _zipf_stream(0, 200_000, 50_000)
    width, depth = 2048, 4
    sk = CountMinSketch(width, depth, seed=1)
    for chunk in stream.split(16_384):
        uniq, counts = torch.unique(chunk, return_counts=True)
        sk.add(uniq, counts, conservative=conservative)
    uniq, truth = torch.unique(stream, return_counts=True)
    err = sk.estimate(uniq) - truth
    assert (err >= 0).all()
    bound = math.e / width * stream.numel()
    assert sk.epsilon * sk.total == pytest.approx(bound)
    assert (err > bound).double().mean() <= math.exp(-depth)
    # The hot keys carry most of N, so their relative error is tiny.
    hot = truth >= 1000
    assert hot.sum() > 10
    assert (err[hot].double() / truth[hot]).max() < 0.25
    if conservative:  # on a skewed stream CU is much tighter than the bound
        assert err.double().mean() < 0.1 * bound


def test_saturates_instead_of_wrapping() -> None:
    sk = CountMinSketch(8, depth=2)
    k = torch.tensor([3])
    sk.add(k, torch.tensor([INT32_MAX - 5]))
    sk.add(torch.tensor([3, 3, 3]), torch.tensor([4, 4, 2**40]))  # duplicates, past max
    assert sk.estimate(k).item() == INT32_MAX
    assert (sk.counters >= 0).all()
    sk.add(k, torch.tensor([7]), conservative=True)
    assert sk.estimate(k).item() == INT32_MAX
    sk.decay()
    assert sk.estimate(k).item() == INT32_MAX // 2
    sk.add(k, torch.tensor([1]))  # headroom again: the fast path
    assert sk.estimate(k).item() == INT32_MAX // 2 + 1


def test_decay_halves() -> None:
    sk = CountMinSketch(1 << 12, depth=4)
    keys = torch.tensor([1, 2, 3])
    sk.add(keys, torch.tensor([10, 7, 1]))
    sk.decay()
    assert sk.estimate(keys).tolist() == [5, 3, 0]
    assert sk.total == 9


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="width"):
        CountMinSketch(0)
    with pytest.raises(ValueError, match="depth"):
        CountMinSketch(16, depth=0)
    sk = CountMinSketch(16)
    with pytest.raises(ValueError, match=">= 0"):
        sk.add(torch.tensor([1, 2]), torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="2 keys but 1 counts"):
        sk.add(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="threshold"):
        Admission(0)
    with pytest.raises(ValueError, match="decay_every"):
        Admission(2, decay_every=-1)


def test_empty_inputs() -> None:
    sk = CountMinSketch(16)
    empty = torch.empty(0, dtype=torch.int64)
    sk.add(empty)
    assert sk.estimate(empty).shape == (0,)
    assert Admission(3, width=64).observe_and_admit(empty, empty).shape == (0,)


# -- Admission ------------------------------------------------------------------------
@pytest.mark.parametrize("conservative", [False, True])
def test_threshold(conservative: bool) -> None:
    adm = Admission(3, width=1 << 16, conservative=conservative)
    keys = torch.tensor([10, 20, 30])
    got = [adm.observe_and_admit(keys, torch.tensor([1, 3, 2])).tolist()]
    got.append(adm.observe_and_admit(keys, torch.tensor([1, 1, 1])).tolist())
    got.append(adm.observe_and_admit(keys[:1]).tolist())  # counts default to 1
    assert got == [[False, True, False], [False, True, True], [True]]
    assert adm.stats()["observed"] == 7 and adm.stats()["admitted"] == 4


def test_threshold_one_admits_everything_without_a_sketch() -> None:
    adm = Admission(1, width=1 << 20)
    assert adm.sketch is None and adm.stats()["bytes"] == 0
    keys = torch.tensor([4, 5, 6])
    assert adm.observe_and_admit(keys, torch.tensor([1, 1, 1])).all()
    state = adm.state_dict()
    assert state["sketch"] is None
    Admission(1).load_state_dict(state)


def test_never_admits_late_vs_exact_counts() -> None:
    """Every key is admitted no later than its true count reaches the threshold."""
    adm = Admission(4, width=256, depth=3, seed=3)  # small: collisions admit some early
    seen: Counter[int] = Counter()
    admitted: set[int] = set()
    for keys in _batches(5, 20, 400, 3000):
        uniq, counts = torch.unique(keys, return_counts=True)
        fresh = torch.tensor([k not in admitted for k in uniq.tolist()])
        uniq, counts = uniq[fresh], counts[fresh]
        ok = adm.observe_and_admit(uniq, counts)
        for k, c, a in zip(uniq.tolist(), counts.tolist(), ok.tolist()):
            seen[k] += c
            if seen[k] >= 4:
                assert a, (k, seen[k])
            if a:
                admitted.add(k)
    assert len(admitted) < len(seen)  # one-off keys stay out


def test_decay_every() -> None:
    adm = Admission(4, width=1 << 14, decay_every=2)
    a, b = torch.tensor([1]), torch.tensor([2])
    two = torch.tensor([2])
    assert not adm.observe_and_admit(a, two).item()  # a: 2
    assert adm.observe_and_admit(a, two).item()  # a: 4 -> admitted, then halved to 2
    assert adm.sketch is not None and adm.sketch.estimate(a).item() == 2
    for want in (False, False, False, False):  # b: 1, 2 -> halved 1, 2, 3 -> halved 1
        assert adm.observe_and_admit(b).item() is want
    assert adm.stats()["decays"] == 3


def test_state_round_trip() -> None:
    adm = Admission(5, width=512, depth=3, seed=7, decay_every=3)
    stream = _batches(2, 4, 300, 800)
    for keys in stream:
        uniq, counts = torch.unique(keys, return_counts=True)
        adm.observe_and_admit(uniq, counts)
    buf = io.BytesIO()
    torch.save(adm.state_dict(), buf)
    buf.seek(0)
    back = Admission(5, width=512, depth=3, seed=7, decay_every=3)
    back.load_state_dict(torch.load(buf))
    assert back.sketch is not None and adm.sketch is not None
    assert torch.equal(back.sketch.counters, adm.sketch.counters)
    assert back.stats() == adm.stats() and back.sketch.total == adm.sketch.total
    # Same future: the decay phase and counts carried over.
    for keys in _batches(3, 4, 300, 800):
        uniq, counts = torch.unique(keys, return_counts=True)
        assert torch.equal(
            adm.observe_and_admit(uniq, counts), back.observe_and_admit(uniq, counts)
        )
    # The state is a copy: later adds do not change a saved state.
    state = adm.state_dict()
    adm.observe_and_admit(torch.tensor([123]), torch.tensor([9]))
    assert not torch.equal(state["sketch"]["counters"], adm.sketch.counters)


@pytest.mark.parametrize(
    "kwargs, field", [({"width": 256}, "width"), ({"depth": 2}, "depth"), ({"seed": 8}, "seed")]
)
def test_state_mismatch_is_an_error(kwargs: dict[str, int], field: str) -> None:
    state = CountMinSketch(512, depth=3, seed=7).state_dict()
    args = {"width": 512, "depth": 3, "seed": 7} | kwargs
    with pytest.raises(ValueError, match=f"{field} .* in the checkpoint"):
        CountMinSketch(**args).load_state_dict(state)


def test_state_wrong_counters_and_missing_entries() -> None:
    state = CountMinSketch(16, depth=2).state_dict()
    bad = dict(state, counters=state["counters"].long())
    with pytest.raises(ValueError, match="expected torch.int32"):
        CountMinSketch(16, depth=2).load_state_dict(bad)
    with pytest.raises(ValueError, match="missing 'total'"):
        CountMinSketch(16, depth=2).load_state_dict(
            {k: v for k, v in state.items() if k != "total"}
        )


def test_admission_threshold_may_change_on_resume() -> None:
    adm = Admission(10, width=1 << 12)
    adm.observe_and_admit(torch.tensor([1]), torch.tensor([5]))
    lower = Admission(5, width=1 << 12)
    lower.load_state_dict(adm.state_dict())
    assert lower.observe_and_admit(torch.tensor([1]), torch.tensor([0])).item()
    fresh = Admission(5, width=1 << 12)
    fresh.load_state_dict(Admission(1).state_dict())  # saved without counts
    assert fresh.sketch is not None and int(fresh.sketch.counters.sum()) == 0


def test_speed_one_million_keys() -> None:
    """1M keys add + estimate in well under a second on one quiet CPU thread (~0.3 s);
    the bound leaves room for a loaded shared machine and still catches any per-key
    Python (which would take minutes)."""
    keys = torch.randint(
        -(2**63), 2**63 - 1, (1_000_000,), generator=torch.Generator().manual_seed(0)
    )
    sk = CountMinSketch(1 << 20, depth=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded shared machine punishes OpenMP barriers, not work
    try:
        sk.add(keys[:1000])  # warm-up
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            sk.add(keys)
            sk.estimate(keys)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    assert best < 3.0, f"1M keys add + estimate took {best:.3f}s"


def test_rejected_counters_and_calls() -> None:
    adm = Admission(3, width=1 << 16)
    keys = torch.tensor([10, 20, 30])
    assert adm.observe_and_admit(keys, torch.tensor([1, 3, 2])).tolist() == [False, True, False]
    assert adm.observe_and_admit(keys[:0], keys[:0]).shape == (0,)  # a step with no new key
    assert adm.observe_and_admit(keys[::2], torch.tensor([5, 0])).tolist() == [True, False]
    s = adm.stats()
    assert (s["observed"], s["admitted"], s["rejected"]) == (5, 2, 3)
    assert s["rejected_values"] == 1 + 2 + 0  # occurrences of the keys left out
    assert adm.calls == 3
    one = Admission(1)
    one.observe_and_admit(keys, torch.tensor([1, 1, 1]))
    assert one.calls == 1 and one.stats()["rejected"] == 0


def test_empty_state_starts_over() -> None:
    """``{}`` (a checkpoint saved without admission) restores zero counts and counters."""
    adm = Admission(3, width=1 << 12, decay_every=4)
    adm.observe_and_admit(torch.tensor([1, 2]), torch.tensor([2, 5]))
    adm.load_state_dict({})
    assert adm.calls == 0 and all(v == 0 for k, v in adm.stats().items() if k != "bytes")
    assert adm.sketch is not None and int(adm.sketch.counters.sum()) == 0

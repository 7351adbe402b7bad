"""CacheTier: a bounded, fully associative row cache with LRU/LFU eviction and locks."""

from __future__ import annotations

import pytest
import torch

from terarec.ps.tiers.cache import CacheTier, TierFullError

W = 3


def rows_of(keys: torch.Tensor) -> torch.Tensor:
    return keys.to(torch.float32).unsqueeze(1).repeat(1, W) + torch.arange(W)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_nothing_is_lost_under_churn(policy: str) -> None:
    """Each batch's rows are made resident (misses come from below or are new), updated
    in place; evicted rows go below. Every row ends bit-exact in exactly one place."""
    g = torch.Generator().manual_seed(0)
    cache = CacheTier(W, capacity=32, policy=policy)  # type: ignore[arg-type]
    below: dict[int, torch.Tensor] = {}
    touches: dict[int, int] = {}
    for step in range(1, 200):
        keys = torch.unique(torch.randint(-500, 500, (20,), generator=g))
        slots = cache.lookup(keys)
        hit = (slots >= 0).nonzero().squeeze(1)
        cache.touch(slots[hit], step)
        cache.lock(slots[hit], step)
        miss = keys[slots < 0].tolist()
        fetched = [below.pop(k) if k in below else rows_of(torch.tensor([k]))[0] for k in miss]
        new_rows = torch.stack(fetched) if miss else torch.empty(0, W)
        _, ev = cache.admit(torch.tensor(miss, dtype=torch.int64), new_rows, step, step)
        for k, r in zip(ev.keys.tolist(), ev.rows):
            assert k not in below
            below[k] = r.clone()
        assert len(cache) <= 32
        s = cache.lookup(keys)
        assert (s >= 0).all()  # the batch is resident
        cache.write(s, cache.read(s) + 1.0)
        for k in keys.tolist():
            touches[k] = touches.get(k, 0) + 1
    keys, rows = cache.export()
    held = dict(zip(keys.tolist(), rows))
    assert not set(held) & set(below) and set(held) | set(below) == set(touches)
    for k, n in touches.items():
        got = held[k] if k in held else below[k]
        assert torch.equal(got, rows_of(torch.tensor([k]))[0] + n), k


def test_lru_and_lfu_pick_the_right_victims() -> None:
    for policy, expect in (("lru", {1, 2}), ("lfu", {3, 4})):
        c = CacheTier(W, capacity=4, policy=policy)  # type: ignore[arg-type]
        keys = torch.tensor([1, 2, 3, 4])
        slots, _ = c.admit(keys, rows_of(keys), step=1)
        c.touch(slots[2:], 2)  # 3, 4 recent but touched once more ...
        if policy == "lfu":
            c.touch(slots[:2], 3)  # ... while 1, 2 are touched again, later: more frequent
            c.touch(slots[:2], 4)
        _, ev = c.admit(torch.tensor([5, 6]), rows_of(torch.tensor([5, 6])), step=5)
        assert set(ev.keys.tolist()) == expect
        assert torch.equal(ev.rows, rows_of(ev.keys))


def test_locked_rows_stay_and_full_is_a_clear_error() -> None:
    c = CacheTier(W, capacity=4, name="device")
    keys = torch.tensor([1, 2, 3, 4])
    slots, _ = c.admit(keys, rows_of(keys), step=1, lock_until=2)
    with pytest.raises(TierFullError, match="device tier: needs 1 more"):
        c.admit(torch.tensor([9]), rows_of(torch.tensor([9])), step=2)
    c.lock(slots[:1], 3)
    _, ev = c.admit(torch.tensor([7, 8, 9]), rows_of(torch.tensor([7, 8, 9])), step=3)
    assert 1 not in ev.keys.tolist() and len(c) == 4


def test_tier_protocol_find_insert_remove() -> None:
    c = CacheTier(W, capacity=8)
    keys = torch.tensor([10, -1, 2**62])
    assert c.insert(keys, rows_of(keys)).keys.numel() == 0
    out = torch.full((4, W), -7.0)
    missed = c.find(torch.tensor([10, 5, 2**62, -1]), out)
    assert missed.tolist() == [1] and torch.equal(out[1], torch.full((W,), -7.0))
    assert torch.equal(out[[0, 2, 3]], rows_of(torch.tensor([10, 2**62, -1])))
    c.insert(torch.tensor([10]), torch.zeros(1, W))  # overwrite
    k, r, _ = c.remove(torch.tensor([10, 77]))
    assert k.tolist() == [10] and torch.count_nonzero(r) == 0 and len(c) == 2
    st = c.stats()
    assert st["rows"] == 2 and st["bytes"] == 2 * (W * 4 + 16) and st["hits"] >= 3  # + meta

from __future__ import annotations

import pytest
import torch

from terarec.ps.hash_index import HashIndex


@pytest.mark.parametrize("max_load", [0.5, 0.9])
def test_matches_python_dict(max_load: float) -> None:
    g = torch.Generator().manual_seed(0)
    idx = HashIndex(capacity=16, max_load=max_load)
    ref: dict[int, int] = {}
    for _ in range(30):
        batch = torch.unique(torch.randint(-(2**63), 2**63 - 1, (500,), generator=g) % 3000 - 1500)
        batch = torch.cat([batch, torch.tensor([-(2**63), 2**63 - 1, 0])]).unique()
        slots, inserted = idx.find_or_insert(batch)
        for k, s, ins in zip(batch.tolist(), slots.tolist(), inserted.tolist()):
            assert ins == (k not in ref)
            ref.setdefault(k, s)
            assert ref[k] == s
    assert len(idx) == len(ref)
    assert sorted(ref.values()) == list(range(len(ref)))  # dense slot ids
    keys = torch.tensor(list(ref))
    assert torch.equal(idx.keys()[idx.find(keys)], keys)
    absent = torch.arange(10_000, 10_100)
    assert (idx.find(absent) == -1).all()


def test_find_with_duplicates_and_empty() -> None:
    idx = HashIndex()
    idx.find_or_insert(torch.tensor([5, 7, 9]))
    out = idx.find(torch.tensor([7, 7, 8, 5]))
    assert out[0] == out[1] and out[2] == -1 and out[3] >= 0
    assert idx.find(torch.empty(0, dtype=torch.int64)).numel() == 0
    s, ins = idx.find_or_insert(torch.empty(0, dtype=torch.int64))
    assert s.numel() == 0 and ins.numel() == 0


def test_growth_keeps_slots_and_load_keys_round_trip() -> None:
    idx = HashIndex(capacity=16)
    keys = torch.randperm(100_000) * 1_000_003
    first, _ = idx.find_or_insert(keys[:10])
    idx.find_or_insert(keys[10:])
    assert idx.capacity >= 2 * len(idx)
    assert torch.equal(idx.find(keys[:10]), first)
    other = HashIndex()
    other.load_keys(idx.keys())
    assert torch.equal(other.find(keys), idx.find(keys))
    with pytest.raises(ValueError, match="unique"):
        other.load_keys(torch.tensor([1, 1]))

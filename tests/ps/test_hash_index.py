from __future__ import annotations

import pytest
import torch

from terarec.hashing import mix64_torch
from terarec.ps.index import triton_hash
from terarec.ps.index.hash_index import HashIndex, fbgemm_hashmap_available

BACKENDS = (
    ["torch"]
    + (["fbgemm"] if fbgemm_hashmap_available() else [])
    + (
        ["triton"] if triton_hash.available(torch.device("cpu")) else []  # TRITON_INTERPRET=1
    )
)
M64 = (1 << 64) - 1


def _unmix64(z: int) -> int:
    """Inverse of the splitmix64 finalizer (to build the key whose mixed value is -1)."""

    def unxorshift(x: int, s: int) -> int:
        out = x
        for _ in range(64 // s + 1):
            out = x ^ (out >> s)
        return out & M64

    z = unxorshift(z, 31)
    z = (z * pow(0x94D049BB133111EB, -1, 1 << 64)) & M64
    z = unxorshift(z, 27)
    z = (z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & M64
    z = unxorshift(z, 30)
    return z - (1 << 64) if z >= 1 << 63 else z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_load", [0.5, 0.9])
def test_matches_python_dict(max_load: float, backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    idx = HashIndex(capacity=16, max_load=max_load, backend=backend)  # type: ignore[arg-type]
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_find_with_duplicates_and_empty(backend: str) -> None:
    idx = HashIndex(backend=backend)  # type: ignore[arg-type]
    idx.find_or_insert(torch.tensor([5, 7, 9]))
    out = idx.find(torch.tensor([7, 7, 8, 5]))
    assert out[0] == out[1] and out[2] == -1 and out[3] >= 0
    assert idx.find(torch.empty(0, dtype=torch.int64)).numel() == 0
    s, ins = idx.find_or_insert(torch.empty(0, dtype=torch.int64))
    assert s.numel() == 0 and ins.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_growth_keeps_slots_and_load_keys_round_trip(backend: str) -> None:
    idx = HashIndex(capacity=16, backend=backend)  # type: ignore[arg-type]
    keys = torch.randperm(100_000) * 1_000_003
    first, _ = idx.find_or_insert(keys[:10])
    idx.find_or_insert(keys[10:])
    assert idx.capacity >= 2 * len(idx)
    assert torch.equal(idx.find(keys[:10]), first)
    other = HashIndex(backend=backend)  # type: ignore[arg-type]
    other.load_keys(idx.keys())
    assert torch.equal(other.find(keys), idx.find(keys))
    with pytest.raises(ValueError, match="unique"):
        other.load_keys(torch.tensor([1, 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reserved_values_are_ordinary_keys(backend: str) -> None:
    """-1 (a common 'missing' id, and the fbgemm kernels' empty marker) and the key
    whose mixed value is -1 (the triton tables' empty marker) are stored like any other
    key, through growth too."""
    special = _unmix64(M64)
    assert int(mix64_torch(torch.tensor([special]))[0]) == -1
    idx = HashIndex(capacity=16, backend=backend)  # type: ignore[arg-type]
    assert int(idx.find(torch.tensor([special]))[0]) == -1
    keys = torch.tensor([-1, special, 0, 5])
    slots, inserted = idx.find_or_insert(keys)
    assert inserted.all() and slots.tolist() == [0, 1, 2, 3]
    idx.find_or_insert(torch.arange(100, 5000))  # forces rehashes
    assert idx.find(keys).tolist() == [0, 1, 2, 3]
    again, inserted = idx.find_or_insert(keys)
    assert again.tolist() == [0, 1, 2, 3] and not inserted.any()
    other = HashIndex(backend=backend)  # type: ignore[arg-type]
    other.load_keys(idx.keys())
    assert other.find(keys).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_lookup_matches_dict(threads: int) -> None:
    """Batches large enough for the fbgemm lookup to be split over threads (and the
    -1 key inside them, shuffled non-contiguous keys) give the dict's answers."""
    if "fbgemm" not in BACKENDS:
        pytest.skip("fbgemm_gpu not installed")
    g = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        idx = HashIndex(capacity=16, backend="fbgemm")
        ref: dict[int, int] = {}
        universe = torch.randint(-(2**63), 2**63 - 1, (150_000,), generator=g).unique()
        universe[0] = -1
        for _ in range(4):
            pick = torch.randperm(universe.numel(), generator=g)[:60_000]
            batch = torch.stack([universe[pick], universe[pick]], 1)[:, 0]  # strided view
            assert not batch.is_contiguous()
            slots, inserted = idx.find_or_insert(batch)
            for k, s, ins in zip(batch.tolist(), slots.tolist(), inserted.tolist()):
                assert ins == (k not in ref)
                ref.setdefault(k, s)
                assert ref[k] == s
        assert -1 in ref
        keys = torch.tensor(list(ref))
        want = torch.tensor(list(ref.values()))
        assert torch.equal(idx.find(keys), want)
        absent = torch.arange(40_000) * 7919 + 3  # (practically) never drawn
        absent = absent[~torch.isin(absent, keys)]
        assert (idx.find(absent) == -1).all()
        assert sorted(ref.values()) == list(range(len(ref)))
    finally:
        torch.set_num_threads(before)


def test_backend_choice() -> None:
    assert HashIndex(backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        HashIndex(backend="nope")  # type: ignore[arg-type]

"""Key ownership and the exchange's local pieces (no processes needed).

* ``owner_of`` spreads sequential, strided and heavily skewed ids evenly over the ranks,
  and independently of the hash index's buckets (the low bits of ``mix64``);
* the block layout round-trips and carries gradients;
* the owners' pair dedup matches a plain Python reference, tables kept apart.
"""

from __future__ import annotations

import pytest
import torch

from terarec.hashing import mix64_torch
from terarec.ps.shard.exchange import owner_of, pack_blocks, unpack_blocks
from terarec.ps.shard.sharded import dedup_pairs


def load_ratio(owner: torch.Tensor, world: int) -> float:
    counts = torch.bincount(owner, minlength=world).double()
    return float(counts.max() / counts.mean())


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_owners_balanced_for_sequential_and_strided_ids(world: int) -> None:
    n = 200_000
    seq = torch.arange(n, dtype=torch.int64)
    for keys in (seq, seq * 1024, seq << 40, -seq - 7):  # low or high bits constant
        owner = owner_of(keys, world)
        assert int(owner.min()) >= 0 and int(owner.max()) < world
        assert load_ratio(owner, world) < 1.02


@pytest.mark.parametrize("world", [2, 4, 8])
def test_skewed_traffic_spreads(world: int) -> None:
    """Zipf(1.1) traffic over 10^6 ids: the unique keys of a batch split evenly, and so
    does the traffic once the few hottest keys (a single key can't be split) are out."""
    g = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, 1_000_001, dtype=torch.float64)
    probs = ranks.pow(-1.1)
    draws = torch.multinomial(probs / probs.sum(), 200_000, replacement=True, generator=g)
    keys = draws.to(torch.int64) * 7  # sequential ids, skewed frequencies
    uniq = torch.unique(keys)
    assert load_ratio(owner_of(uniq, world), world) < 1.05
    tail = keys[draws >= 100]
    assert load_ratio(owner_of(tail, world), world) < 1.05


def test_owner_independent_of_index_buckets() -> None:
    """One owner's keys still fill every bucket of a hash index (low bits of mix64)."""
    keys = torch.arange(400_000, dtype=torch.int64)
    mine = keys[owner_of(keys, 4) == 1]
    buckets = torch.bincount(mix64_torch(mine) & 1023, minlength=1024).double()
    mean = float(buckets.mean())  # ~98 keys a bucket: Poisson spread, std ~ sqrt(mean)
    assert float(buckets.min()) > 0.5 * mean
    assert float(buckets.std()) < 1.2 * mean**0.5
    # (owner = low bits of the same mix would leave 3 buckets in 4 empty)


def test_owner_is_deterministic_and_world_one_is_local() -> None:
    keys = torch.tensor([5, -3, 1 << 62, 0])
    assert torch.equal(owner_of(keys, 4), owner_of(keys.clone(), 4))
    assert torch.equal(owner_of(keys, 1), torch.zeros(4, dtype=torch.int64))


def test_blocks_round_trip_and_gradient() -> None:
    counts = torch.tensor([[1, 0, 2], [0, 0, 1], [3, 0, 0]])  # [ranks, groups]
    widths = [2, 5, 3]
    parts = [torch.randn(int(counts[:, g].sum()), w, requires_grad=True)
             for g, w in enumerate(widths)]
    flat = pack_blocks(parts, counts)
    # rank 0: group 0 row 0, group 2 rows 0-1; rank 1: group 2 row 2; rank 2: group 0 rows 1-3
    want = torch.cat([parts[0][0], parts[2][:2].reshape(-1), parts[2][2],
                      parts[0][1:].reshape(-1)])
    assert torch.equal(flat, want)
    back = unpack_blocks(flat, counts, widths)
    for p, b in zip(parts, back):
        assert torch.equal(p, b)
    weights = [torch.randn_like(p) for p in parts]
    sum((b * w).sum() for b, w in zip(back, weights)).backward()
    for p, w in zip(parts, weights):
        assert torch.equal(p.grad, w)


def test_dedup_pairs_matches_python() -> None:
    g = torch.Generator().manual_seed(1)
    comp = torch.randint(-5, 5, (300,), generator=g)
    tables = torch.randint(0, 3, (300,), generator=g)
    d = dedup_pairs(comp, tables, multi=True)
    want = sorted({(int(c), int(t)) for c, t in zip(comp, tables)})
    assert list(zip(d.keys.tolist(), d.tables.tolist())) == want
    assert torch.equal(d.keys[d.inverse], comp) and torch.equal(d.tables[d.inverse], tables)
    one = dedup_pairs(comp, torch.zeros_like(comp), multi=False)
    assert one.keys.tolist() == sorted(set(comp.tolist()))
    assert torch.equal(one.keys[one.inverse], comp)
    empty = dedup_pairs(comp[:0], tables[:0], multi=True)
    assert empty.keys.numel() == 0 and empty.inverse.numel() == 0


def test_empty_batch_on_one_rank() -> None:
    """An empty batch (a rank without samples) pools to ``[0, sum of dims]`` and its
    backward steps every group once (an empty step, as on the other ranks)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from terarec.config import SparseOptimConfig, TableConfig
    from terarec.ps.embedding import HierarchicalEmbeddingBagCollection

    tables = [TableConfig(name="a", dim=4, features=["f"]),
              TableConfig(name="b", dim=4, features=["g", "h"])]
    ebc = HierarchicalEmbeddingBagCollection(
        tables, ["f", "g", "h"], SparseOptimConfig(kind="adam")
    )
    empty = torch.empty(0, dtype=torch.int64)
    kt = ebc(KeyedJaggedTensor.from_lengths_sync(["f", "g", "h"], empty, empty))
    assert kt.values().shape == (0, 12)
    kt.values().sum().backward()
    assert [g.optimizer.step for g in ebc.groups] == [1]
    assert sum(ebc.num_rows().values()) == 0

"""Pairs changed since the last checkpoint (delta checkpoints) and the feature permutation.

``changed_state`` must hold exactly the rows a step touched (O(changed), not the
table), their current values, and the keys a TTL sweep deleted; ``permute_features``
must equal torchrec's ``KeyedJaggedTensor.permute``.
"""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import SparseOptimConfig, TableConfig
from terarec.ps.changes import ChangedPairs
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.features import permute_features


def kjt_of(keys: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        ["f1"], torch.tensor(keys), torch.ones(len(keys), dtype=torch.int64))


def train_on(ebc: HierarchicalEmbeddingBagCollection, keys: list[int]) -> None:
    ebc(kjt_of(keys)).values().sum().backward()


def test_changed_pairs_record_each_pair_once_and_forget_on_clear() -> None:
    c = ChangedPairs("cpu")
    c.record(torch.tensor([5, 9, 5]), torch.tensor([0, 1, 0]))
    c.record(torch.tensor([9, 2]), torch.tensor([1, 0]))
    comp, tables = c.pairs()
    assert sorted(zip(comp.tolist(), tables.tolist())) == [(2, 0), (5, 0), (9, 1)]
    with pytest.raises(ValueError, match="share a composite key"):
        c.record(torch.tensor([9]), torch.tensor([0]))  # 9 is table 1's
    c.clear()
    assert len(c) == 0
    big = torch.arange(5000)
    c.record(big, torch.zeros_like(big))  # grows past its first capacity
    assert len(c) == 5000


@pytest.mark.parametrize("layout", ["memory", "tiered"])
def test_changed_state_holds_the_touched_rows_only(layout: str) -> None:
    extra = {"device_rows": 64} if layout == "tiered" else {}
    ebc = HierarchicalEmbeddingBagCollection(
        [TableConfig(name="t", dim=4, **extra)], ["f1"], SparseOptimConfig(kind="adam"))
    for start in range(0, 1000, 50):  # 1000 rows, most of them evicted to the host
        train_on(ebc, list(range(start, start + 50)))
    ebc.track_changes(True)
    train_on(ebc, [7, 3, 7, 2000])  # two old rows (7 twice) and a new one
    got = ebc.changed_state()["t"]
    assert got["keys"].tolist() == [3, 7, 2000] and got["deleted"].numel() == 0
    keys, rows = ebc.tables[0].export()
    by_key = dict(zip(keys.tolist(), rows))
    for k, r in zip(got["keys"].tolist(), got["rows"]):
        assert torch.equal(r, by_key[k])
    ebc.clear_changes()
    assert ebc.changed_state()["t"]["keys"].numel() == 0


def test_a_ttl_sweep_reports_its_deletions() -> None:
    ebc = HierarchicalEmbeddingBagCollection(
        [TableConfig(name="t", dim=4, ttl_steps=4)], ["f1"], SparseOptimConfig(kind="sgd"))
    ebc.track_changes(True)
    train_on(ebc, [1, 2, 3])  # step 1
    ebc.clear_changes()  # a checkpoint holds 1, 2, 3
    for _ in range(6):  # steps 2..7 never use 1 or 2; 3 stays alive
        train_on(ebc, [3, 4])
    got = ebc.changed_state()["t"]
    assert got["deleted"].tolist() == [1, 2] and got["keys"].tolist() == [3, 4]


def test_permute_features_is_torchrec_permute() -> None:
    g = torch.Generator().manual_seed(0)
    f, b = 5, 7
    lengths = torch.randint(0, 4, (f * b,), generator=g)
    values = torch.randint(-(2**40), 2**40, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g)
    kjt = KeyedJaggedTensor(keys=list("abcde"), values=values, lengths=lengths, weights=weights)
    perm = [3, 0, 4, 1, 2]
    want, got = kjt.permute(perm), permute_features(kjt, perm)
    assert got.keys() == want.keys() and got.stride() == want.stride()
    for name in ("values", "lengths", "offsets", "weights"):
        assert torch.equal(getattr(got, name)(), getattr(want, name)()), name
    assert got.length_per_key() == want.length_per_key()
    assert got.offset_per_key() == want.offset_per_key()

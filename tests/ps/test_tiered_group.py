"""Tiered tables of one dim train as one group exactly as each in a group of its own.

Three tiered tables with different budgets (device over host; device, host cache and
SSD with LFU; a tiny device tier with a scratch pad) are trained on the same batches,
batched into one group and each in a group of its own (``group_tables=False``): losses,
rows and optimizer state agree bitwise, every table keeps its own budgets and counters,
and checkpoints load across the two layouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.store.tiered import TieredStore
from terarec.ps.tiers.protocol import TierFullError
from terarec.ps.tiers.ssd import SSDStore, SSDTierConfig

FEATS = ["f0", "f1", "f2", "f3", "f4"]
BATCH = 6


def tables(scratch: bool = True) -> list[TableConfig]:
    return [
        TableConfig(name="a", dim=4, features=["f0", "f1"], device_rows=30),
        TableConfig(name="b", dim=4, features=["f2"], device_rows=20, host_rows=8,
                    cache_policy="lfu"),
        TableConfig(name="c", dim=4, features=["f3", "f4"], device_rows=6, scratch_pad=scratch),
    ]


def build(grouped: bool, tmp: Path, kind: str = "adam", **kw: Any) -> Any:
    store = SSDStore(tmp / ("g" if grouped else "s"), SSDTierConfig(path=str(tmp)))
    ebc = HierarchicalEmbeddingBagCollection(
        tables(**kw), FEATS, SparseOptimConfig(kind=kind, lr=0.05), seed=3, ssd_store=store,
        group_tables=grouped,
    )
    assert len(ebc.groups) == (1 if grouped else 3)
    return ebc, store


def batches(steps: int, seed: int = 0) -> list[KeyedJaggedTensor]:
    """Bags of 0-3 ids over 40 ids per feature, repeats within and across features."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, 4, (len(FEATS) * BATCH,), generator=g)
        values = torch.randint(0, 40, (int(lengths.sum()),), generator=g)
        out.append(KeyedJaggedTensor.from_lengths_sync(FEATS, values, lengths))
    return out


def train(ebc: HierarchicalEmbeddingBagCollection, data: list[KeyedJaggedTensor]) -> list[float]:
    w = torch.linspace(-1, 1, 4 * len(FEATS))
    losses = []
    for kjt in data:
        loss = ((ebc(kjt).values() - 0.25) ** 2 * w).sum()
        loss.backward()
        losses.append(loss.item())
    return losses


def content(ebc: HierarchicalEmbeddingBagCollection) -> dict[str, dict[int, list[float]]]:
    out = {}
    for t in ebc.tables:
        keys, rows = t.export()
        out[t.name] = {int(k): r.tolist() for k, r in zip(keys, rows)}
    return out


@pytest.mark.parametrize("kind", ["adam", "rowwise_adagrad", "sgd"])
def test_grouped_trains_bitwise_like_separate_groups(tmp_path: Path, kind: str) -> None:
    (g, sg), (s, ss) = build(True, tmp_path, kind), build(False, tmp_path, kind)
    data = batches(25)
    assert train(g, data) == train(s, data)
    assert content(g) == content(s)
    assert g.num_rows() == s.num_rows()
    store = g.groups[0].store
    assert isinstance(store, TieredStore)
    for t, chain in enumerate(store.chains):  # each table cached as it would be alone
        alone = s.groups[t].store
        assert chain.top.capacity == alone.top.capacity
        assert len(chain) == len(alone)
        assert [len(x) for x in chain.tiers] == [len(x) for x in alone.tiers]
    assert store.chains[2].stats()["scratch_rows_in"] > 0  # the pad took rows
    assert store.chains[1].stats()["ssd_rows_in"] > 0  # the SSD tier took rows
    g.eval(), s.eval()
    with torch.no_grad():
        for kjt in batches(3, seed=1):
            assert torch.equal(g(kjt).values(), s(kjt).values())
    sg.close(), ss.close()


def test_checkpoints_load_across_layouts(tmp_path: Path) -> None:
    (g, sg), (s, ss) = build(True, tmp_path), build(False, tmp_path)
    data = batches(12)
    train(s, data)
    g.load_tables_state_dict(s.tables_state_dict())  # saved per table, loaded grouped
    assert content(g) == content(s)
    more = batches(8, seed=2)
    assert train(g, more) == train(s, more)
    assert content(g) == content(s)
    (s2, ss2) = build(False, tmp_path / "again")
    s2.load_tables_state_dict(g.tables_state_dict())  # and back
    assert content(s2) == content(g)
    sg.close(), ss.close(), ss2.close()


def test_a_batch_over_one_budget_names_that_table(tmp_path: Path) -> None:
    g, sg = build(True, tmp_path, scratch=False)
    values = torch.arange(20)  # 10 ids in each of f3, f4: 20 unique keys of table c (6 rows)
    lengths = torch.tensor([0] * (3 * BATCH) + [5, 5] + [0] * (BATCH - 2) + [5, 5]
                           + [0] * (BATCH - 2))
    kjt = KeyedJaggedTensor.from_lengths_sync(FEATS, values, lengths)
    with pytest.raises(TierFullError) as err:
        g(kjt)
    assert err.value.table == "c" and err.value.tier == "device"
    sg.close()

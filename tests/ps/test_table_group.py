"""Table groups: several tables in one store keep exact per-table namespaces.

The reference is the same collection with every table in its own group (tables that
differ only in an unused initializer scale of ``zeros`` init do not group), trained on
the same batches; crafted ids make composite keys collide across tables.
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import InitConfig, SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection

FEATS = ["f1", "f2", "f3"]


def build(grouped: bool) -> HierarchicalEmbeddingBagCollection:
    tables = [
        TableConfig(
            name=f"t{i}",
            dim=4,
            features=[f"f{i}"],
            init=InitConfig(kind="zeros", scale=0.0 if grouped else 0.01 * i),
        )
        for i in (1, 2, 3)
    ]
    ebc = HierarchicalEmbeddingBagCollection(tables, FEATS, SparseOptimConfig(kind="sgd", lr=0.1))
    assert len(ebc.groups) == (1 if grouped else 3)
    return ebc


def colliding_batches(ebc: HierarchicalEmbeddingBagCollection) -> list[KeyedJaggedTensor]:
    """Batches where ``(t2, k ^ s2)`` and ``(t3, k ^ s3)`` share ``(t1, k)``'s composite."""
    salts = ebc.groups[0].salts.tolist()
    assert salts[0] == 0 and salts[1] != 0 and salts[2] != 0
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(30):
        base = torch.randint(0, 40, (6,), generator=g)
        f1 = base[:2]
        # same batch: f2 collides with f1; earlier/later batches: collide across steps
        f2 = torch.cat([base[:1] ^ salts[1], base[2:4]])
        f3 = torch.cat([(base[4:5] if step % 2 else base[:1]) ^ salts[2], base[5:6]])
        vals = torch.cat([f1, f2, f3])
        lengths = torch.tensor([1, 1, 2, 1, 1, 1])  # batch 2: bags per feature
        out.append(KeyedJaggedTensor.from_lengths_sync(FEATS, vals, lengths))
    return out


def train(ebc: HierarchicalEmbeddingBagCollection, batches: list[KeyedJaggedTensor]) -> list:
    losses = []
    w = torch.linspace(-1, 1, 3 * 4)
    for kjt in batches:
        loss = ((ebc(kjt).values() - 0.5) ** 2 * w).sum()
        loss.backward()
        losses.append(loss.item())
    return losses


def per_table(ebc: HierarchicalEmbeddingBagCollection) -> dict[str, dict[int, list[float]]]:
    out = {}
    for t in ebc.tables:
        keys, rows = t.export()
        out[t.name] = {int(k): r.tolist() for k, r in zip(keys, rows)}
    return out


def test_colliding_composites_train_like_separate_tables() -> None:
    grouped, ref = build(True), build(False)
    batches = colliding_batches(grouped)
    assert train(grouped, batches) == train(ref, batches)
    assert per_table(grouped) == per_table(ref)
    assert grouped.num_rows() == ref.num_rows()
    assert grouped.groups[0].store.collisions  # the crafted collisions took the side path
    grouped.eval(), ref.eval()
    with torch.no_grad():
        for kjt in batches[:5]:
            assert torch.equal(grouped(kjt).values(), ref(kjt).values())


def test_round_trip_and_growth_keep_side_slots() -> None:
    a = build(True)
    batches = colliding_batches(a)
    train(a, batches)
    b = build(True)
    b.load_tables_state_dict(a.tables_state_dict())
    assert per_table(a) == per_table(b) and b.groups[0].store.collisions
    # many new ids force index rehashes with side (unindexed) slots present
    many = torch.arange(1000, 9000)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        FEATS, torch.cat([many, many, many]), torch.full((3 * 8000,), 1)
    )
    before = per_table(b)
    b(kjt).values().sum().backward()
    after = per_table(b)
    for name, rows in before.items():
        for key in rows:  # every old row is still found (updated only if touched)
            assert key in after[name]
    for t in b.tables:
        keys, _ = t.export()
        assert keys.unique().numel() == keys.numel() == len(t)
    b.eval()
    with torch.no_grad():
        probe = colliding_batches(b)[0]
        got = b(probe).values()
    assert torch.count_nonzero(got) > 0


def test_same_raw_id_in_two_tables_is_two_rows() -> None:
    ebc = build(True)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        FEATS, torch.tensor([7, 7, 7]), torch.tensor([1, 0, 1, 0, 1, 0])
    )
    ebc(kjt).values().pow(2).sum().backward()
    assert ebc.num_rows() == {"t1": 1, "t2": 1, "t3": 1}


def test_row_counts_past_the_initial_capacity() -> None:
    for grouped in (True, False):
        ebc = build(grouped)
        ids = torch.arange(5000)
        kjt = KeyedJaggedTensor(
            keys=FEATS,
            values=torch.cat([ids, ids[:3000], ids[:10]]),
            lengths=torch.tensor([5000, 3000, 10]),
            stride=1,
        )
        ebc(kjt).values().sum().backward()
        assert ebc.num_rows() == {"t1": 5000, "t2": 3000, "t3": 10}
        assert [len(t.export()[0]) for t in ebc.tables] == [5000, 3000, 10]

"""Admission in training: tables that create a row only for keys seen ``min_count`` times.

Reference: one ``nn.EmbeddingBag(sparse=True)`` per table over every key of the run, row
``i`` starting as the first-touch row of the i-th smallest key, plus an exact per-key
occurrence count (a plain tensor, no sketch). A key is *admitted* in the batch in which
its count (this batch's occurrences included) reaches ``min_count``; the values of keys
not admitted yet are left out of the bags (``mean`` still divides by the full bag
length: they pool as zero vectors), so their rows get no gradient and no optimizer
state. With ``decay_every`` the counts are halved (floor) after every N steps.

Checked, step by step over a few hundred steps: the unbounded table with admission and
the tiered one (64-row device tier over a 256-row host tier over the SSD tier, with and
without prefetch on a background thread) against the reference within bounds derived
from float32 rounding (``tests/numerics.py``), the tiered one bitwise against the
unbounded one; at the end the rows of admitted keys (weights and
optimizer state), that no tier holds a row of a key never admitted, and the counters.
"""

from __future__ import annotations

import threading
from typing import Optional

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import AdmissionConfig, InitConfig, Pooling, SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.ssd import SSDStore, SSDTierConfig
from tests.numerics import assert_close, loss_tol, max_grad, train_tol
from tests.ps.test_embedding_equivalence import reference_dtype, reference_optimizer
from tests.ps.test_table_group import FEATS as FEATS3
from tests.ps.test_table_group import colliding_batches, per_table
from tests.ps.test_table_group import train as train_group

FEATS = ["a", "b", "c"]
BATCH = 8
STEPS = 300
VALUES = len(FEATS) * BATCH * 3  # the most values a batch holds: bags of up to 3 ids


def batches(steps: int, seed: int = 3, vocab: int = 5000) -> list[KeyedJaggedTensor]:
    """A hot head (seen often: admitted early) and a long tail (seen once or twice)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, 4, (len(FEATS) * BATCH,), generator=g)
        n = int(lengths.sum())
        hot = torch.randint(0, 60, (n,), generator=g)
        cold = torch.randint(0, vocab, (n,), generator=g)
        ids = torch.where(torch.rand(n, generator=g) < 0.5, hot, cold) * 7919 - 2**40
        out.append(KeyedJaggedTensor.from_lengths_sync(FEATS, ids, lengths))
    return out


class MaskedReference:
    """Dense ``nn.EmbeddingBag`` per table, keys masked until their ``min_count``-th
    occurrence (exact counts, per table: a key shared by two features counts both)."""

    def __init__(
        self,
        ebc: HierarchicalEmbeddingBagCollection,
        data: list[KeyedJaggedTensor],
        opt: SparseOptimConfig,
        min_count: int,
        decay_every: int = 0,
    ) -> None:
        self.out_features = ebc.out_features
        self.min_count = min_count
        self.decay_every = decay_every
        self.steps = 0
        self.parts = []
        self.dtype = dtype = reference_dtype(opt.kind)
        for table, feats in zip(ebc.tables, ebc.table_features):
            keys = torch.unique(torch.cat([b[f].values() for b in data for f in feats]))
            bag = nn.EmbeddingBag(
                keys.numel(), table.dim, mode="sum", sparse=True, dtype=dtype
            )
            with torch.no_grad():
                bag.weight.copy_(table.initial_weights(keys))
            count = torch.zeros(keys.numel(), dtype=torch.int64)
            admitted = torch.zeros(keys.numel(), dtype=torch.bool)
            mean = table.cfg.pooling == Pooling.MEAN
            self.parts.append((feats, keys, bag, count, admitted, mean))
        self.opt = reference_optimizer(opt, [p[2].weight for p in self.parts])
        self.left_out_values = 0  # values of keys not admitted (they read zeros)
        self.lr, self.sgd = opt.lr, opt.kind == "sgd"
        self.grad = 0.0  # the largest |gradient entry| so far

    def train_step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        self.grad = max(self.grad, max_grad([p[2].weight for p in self.parts]))
        self.opt.step()

    def row_tol(self, t: int) -> float:
        """The bound on the rows of table ``t`` after the steps so far (tests/numerics.py:
        each step rounds a row and adds an update from a gradient summing at most every
        value of a batch; SGD's update is lr * g, Adam's and Adagrad's ~lr)."""
        size = float(self.rows(t).abs().max()) if self.rows(t).numel() else 0.0
        return train_tol(self.lr, self.steps, VALUES, size, self.grad if self.sgd else 1.0)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        outs: dict[str, torch.Tensor] = {}
        for feats, keys, bag, count, admitted, mean in self.parts:
            idx = {f: torch.searchsorted(keys, kjt[f].values()) for f in feats}
            count += torch.bincount(torch.cat(list(idx.values())), minlength=keys.numel())
            admitted |= count >= self.min_count  # a row, once created, stays
            for f in feats:
                lengths = kjt[f].lengths()
                keep = admitted[idx[f]]
                self.left_out_values += int((~keep).sum())
                bag_of = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
                weight = torch.ones(idx[f].numel(), dtype=self.dtype)
                if mean:
                    weight = 1.0 / lengths.clamp(min=1)[bag_of].to(self.dtype)
                kept = torch.bincount(bag_of[keep], minlength=lengths.numel())
                offsets = torch.cat([torch.zeros(1, dtype=torch.int64), kept.cumsum(0)])
                outs[f] = bag(idx[f][keep], offsets[:-1], per_sample_weights=weight[keep])
        self.steps += 1
        if self.decay_every and self.steps % self.decay_every == 0:
            for part in self.parts:
                part[3].bitwise_right_shift_(1)
        return torch.cat([outs[f] for f in self.out_features], dim=1)

    def admitted_keys(self, t: int) -> torch.Tensor:
        _, keys, _, _, admitted, _ = self.parts[t]
        return keys[admitted]

    def rows(self, t: int) -> torch.Tensor:
        _, _, bag, _, admitted, _ = self.parts[t]
        return bag.weight.detach()[admitted]


def loss_of(pooled: torch.Tensor) -> torch.Tensor:
    head = torch.linspace(-1, 1, pooled.shape[1]).unsqueeze(1).to(pooled.dtype)
    return (torch.tanh(pooled) @ head).square().sum()


@pytest.mark.numerics
@pytest.mark.parametrize(
    "kind,min_count,pooling,decay_every",
    [
        ("sgd", 3, "sum", 0),
        ("rowwise_adagrad", 2, "mean", 0),
        ("adam", 3, "sum", 0),
        ("adam", 4, "mean", 25),
    ],
)
def test_unbounded_table_matches_masked_reference(
    kind: str, min_count: int, pooling: str, decay_every: int
) -> None:
    data = batches(STEPS)
    opt = SparseOptimConfig(kind=kind, lr=0.05, initial_accumulator_value=0.1)
    table = TableConfig(
        name="t",
        dim=4,
        pooling=Pooling(pooling),
        init=InitConfig(kind="uniform", scale=0.1),
        admission=AdmissionConfig(min_count=min_count, decay_every=decay_every),
    )
    ebc = HierarchicalEmbeddingBagCollection([table], FEATS, opt, seed=5)
    ref = MaskedReference(ebc, data, opt, min_count, decay_every)
    for step, kjt in enumerate(data):
        loss = loss_of(ebc(kjt).values())
        loss.backward()
        ref_loss = loss_of(ref.forward(kjt))
        ref.train_step(ref_loss)
        assert_close(loss.item(), ref_loss.item(), loss_tol(ref_loss.item(), step, BATCH),
                     f"loss at step {step}")
        assert len(ebc.tables[0]) == ref.admitted_keys(0).numel(), step
    _check_rows(ebc, ref, 0)
    stats = ebc.groups[0].stats()
    assert stats["admission_admitted"] == len(ebc.tables[0])
    assert stats["admission_observed"] == stats["admission_admitted"] + stats["admission_rejected"]
    assert stats["admission_rejected_values"] == ref.left_out_values > 0
    assert stats["admission_decays"] == (STEPS // decay_every if decay_every else 0)
    all_keys = torch.unique(torch.cat([b.values() for b in data]))
    assert 0 < len(ebc.tables[0]) < 0.5 * all_keys.numel()  # the tail stayed out


def _check_rows(ebc: HierarchicalEmbeddingBagCollection, ref: MaskedReference, t: int) -> None:
    keys, rows = ebc.tables[t].export()
    order = torch.argsort(keys)
    assert torch.equal(keys[order], ref.admitted_keys(t))
    assert_close(rows[order, : ebc.tables[t].dim], ref.rows(t), ref.row_tol(t), f"rows of {t}")


@pytest.mark.numerics
def test_table_group_counts_each_table_apart() -> None:
    """Two tables in one group share one sketch, but count (table, key) pairs: the same
    raw id in both tables is two keys with two counts."""
    data = batches(200, seed=11, vocab=400)
    opt = SparseOptimConfig(kind="adam", lr=0.05)
    adm = AdmissionConfig(min_count=3)
    init = InitConfig(kind="uniform", scale=0.1)
    tables = [
        TableConfig(name="ab", dim=4, features=["a", "b"], init=init, admission=adm),
        TableConfig(name="c", dim=4, features=["c"], init=init, admission=adm),
    ]
    ebc = HierarchicalEmbeddingBagCollection(tables, FEATS, opt, seed=2)
    assert len(ebc.groups) == 1 and ebc.groups[0].admission is not None
    ref = MaskedReference(ebc, data, opt, 3)
    for step, kjt in enumerate(data):
        loss = loss_of(ebc(kjt).values())
        loss.backward()
        ref_loss = loss_of(ref.forward(kjt))
        ref.train_step(ref_loss)
        assert_close(loss.item(), ref_loss.item(), loss_tol(ref_loss.item(), step, BATCH),
                     f"loss at step {step}")
    for t in range(2):
        _check_rows(ebc, ref, t)
    shared = set(ref.admitted_keys(0).tolist()) ^ set(ref.admitted_keys(1).tolist())
    assert shared  # some ids admitted in one table only: the counts are per table


def test_admission_settings_split_groups() -> None:
    init = InitConfig(kind="uniform", scale=0.1)
    tables = [
        TableConfig(name="a", dim=4, features=["a"], init=init, admission=AdmissionConfig(2)),
        TableConfig(name="b", dim=4, features=["b"], init=init, admission=AdmissionConfig(3)),
        TableConfig(name="c", dim=4, features=["c"], init=init),
    ]
    ebc = HierarchicalEmbeddingBagCollection(tables, FEATS, SparseOptimConfig(kind="sgd"))
    assert [g.names for g in ebc.groups] == [["a"], ["b"], ["c"]]
    assert [None if g.admission is None else g.admission.threshold for g in ebc.groups] == [
        2,
        3,
        None,
    ]


@pytest.mark.numerics
@pytest.mark.parametrize(
    "kind,host_rows,prefetch",
    [("sgd", 256, False), ("adam", 256, True), ("rowwise_adagrad", None, True)],
)
def test_tiered_table_matches_unbounded_and_reference(
    tmp_path, kind: str, host_rows: Optional[int], prefetch: bool
) -> None:
    data = batches(STEPS, seed=4)
    opt = SparseOptimConfig(kind=kind, lr=0.05, initial_accumulator_value=0.1)
    init = InitConfig(kind="uniform", scale=0.1)
    adm = AdmissionConfig(min_count=3)
    tiered = TableConfig(
        name="t", dim=4, init=init, admission=adm, device_rows=64, host_rows=host_rows
    )
    store = SSDStore(tmp_path / "ssd", SSDTierConfig(path=str(tmp_path / "ssd")))
    ebc = HierarchicalEmbeddingBagCollection([tiered], FEATS, opt, seed=5, ssd_store=store)
    plain = HierarchicalEmbeddingBagCollection(
        [TableConfig(name="t", dim=4, init=init, admission=adm)], FEATS, opt, seed=5
    )
    ref = MaskedReference(plain, data, opt, 3)
    group = ebc.groups[0]
    assert group.tiered and group.admission is not None
    for step, kjt in enumerate(data):
        loss = loss_of(ebc(kjt).values())
        worker = None
        if prefetch and step + 1 < STEPS:  # the next batch, while this one trains
            worker = threading.Thread(target=ebc.prefetch, args=(data[step + 1],))
            worker.start()
        loss.backward()
        if worker is not None:
            worker.join()
        plain_loss = loss_of(plain(kjt).values())
        plain_loss.backward()
        assert loss.item() == plain_loss.item(), f"step {step}: tiers changed the math"
        ref_loss = loss_of(ref.forward(kjt))
        ref.train_step(ref_loss)
        assert_close(loss.item(), ref_loss.item(), loss_tol(ref_loss.item(), step, BATCH),
                     f"loss at step {step}")
    stats = group.stats()
    assert stats["device_evictions"] > 0
    if host_rows:
        assert stats["host_evictions"] > 0 and stats["ssd_rows_in"] > 0
    for key in ("admitted", "rejected", "rejected_values", "observed"):
        assert stats[f"admission_{key}"] == plain.groups[0].stats()[f"admission_{key}"], key
    keys, rows = ebc.tables[0].export()
    plain_keys, plain_rows = plain.tables[0].export()
    assert torch.equal(rows[torch.argsort(keys)], plain_rows[torch.argsort(plain_keys)])
    _check_rows(ebc, ref, 0)
    assert len(ebc.tables[0]) == keys.numel() == stats["admission_admitted"]
    # no tier holds a row of a key never admitted
    admitted = set(ref.admitted_keys(0).tolist())
    for tier in group.store.tiers:
        held, _ = tier.export()
        assert set(held.tolist()) <= admitted, tier.name
    store.close()


def test_unadmitted_keys_read_zeros_and_leave_no_trace(tmp_path) -> None:
    """Forward: unadmitted keys pool as zeros and get no row, optimizer state or tier
    traffic; prefetch observes nothing and creates nothing; eval neither."""
    opt = SparseOptimConfig(kind="adam", lr=0.1)
    table = TableConfig(
        name="t",
        dim=2,
        init=InitConfig(kind="uniform", scale=0.5),
        device_rows=8,
        admission=AdmissionConfig(min_count=2),
    )
    ebc = HierarchicalEmbeddingBagCollection([table], ["a"], opt, seed=1)
    group = ebc.groups[0]
    assert group.tiered and group.admission is not None

    def kjt(*ids: int) -> KeyedJaggedTensor:
        return KeyedJaggedTensor.from_lengths_sync(
            ["a"], torch.tensor(ids), torch.tensor([len(ids)])
        )

    def train(*ids: int) -> torch.Tensor:
        out = ebc(kjt(*ids)).values()
        out.sum().backward()
        return out.detach()

    init = ebc.tables[0].initial_weights(torch.tensor([7, 5]))
    # 7 twice in one batch: admitted at once; 5 once: zeros, no row
    assert torch.equal(train(7, 5, 7), (2 * init[0]).unsqueeze(0))
    assert ebc.tables[0].export()[0].tolist() == [7]
    # 5 seen 3 times now: admitted, with its first-touch row
    assert torch.equal(train(5, 5), (2 * init[1]).unsqueeze(0))
    assert set(ebc.tables[0].export()[0].tolist()) == {5, 7}
    # a prefetch of new keys: no row, no count
    before = dict(group.admission.stats())
    ebc.prefetch(kjt(9, 9, 9))
    assert group.admission.stats() == before and len(ebc.tables[0]) == 2
    assert group.stats()["device_rows"] == 2
    # eval: zeros for the unknown key, nothing created or counted
    ebc.eval()
    with torch.no_grad():
        ev = ebc(kjt(9)).values()
    ebc.train()
    assert torch.equal(ev, torch.zeros(1, 2)) and group.admission.stats() == before
    # 9 once in training: still out (the prefetch and the eval did not count)
    assert torch.equal(train(9), torch.zeros(1, 2))
    assert len(ebc.tables[0]) == 2 and group.stats()["admission_rejected_values"] == 2
    _, found = group.store.lookup_rows(torch.tensor([9, 5]))
    assert found.tolist() == [False, True]
    assert all(9 not in t.export()[0].tolist() for t in group.store.tiers)
    assert group.stats()["device_inserts"] == 2  # only the two admitted rows moved in


def test_checkpoint_state_round_trip() -> None:
    """The sketch travels with the first table's state and comes back exactly."""
    opt = SparseOptimConfig(kind="sgd", lr=0.1)
    adm = AdmissionConfig(min_count=3, width=4096, depth=3, decay_every=7)
    tables = [
        TableConfig(name="ab", dim=4, features=["a", "b"], admission=adm),
        TableConfig(name="c", dim=4, features=["c"], admission=adm),
    ]
    data = batches(30, seed=9, vocab=300)
    a = HierarchicalEmbeddingBagCollection(tables, FEATS, opt, seed=3)
    for kjt in data[:20]:
        a(kjt).values().sum().backward()
    state = a.tables_state_dict()
    assert "admission" in state["ab"] and "admission" not in state["c"]
    b = HierarchicalEmbeddingBagCollection(tables, FEATS, opt, seed=3)
    b.load_tables_state_dict(state)
    for kjt in data[20:]:
        la, lb = a(kjt).values().sum(), b(kjt).values().sum()
        assert la.item() == lb.item()
        la.backward()
        lb.backward()
    adm_a, adm_b = (
        {k: v for k, v in e.groups[0].stats().items() if k.startswith("admission_")} for e in (a, b)
    )
    assert adm_a == adm_b and adm_a["admission_decays"] == 30 // 7
    sa, sb = a.tables_state_dict(), b.tables_state_dict()
    for name in ("ab", "c"):
        assert torch.equal(sa[name]["keys"].sort().values, sb[name]["keys"].sort().values)
    assert torch.equal(
        sa["ab"]["admission"]["sketch"]["counters"], sb["ab"]["admission"]["sketch"]["counters"]
    )
    # a checkpoint saved without admission: counting starts from zero
    plain = HierarchicalEmbeddingBagCollection(
        [TableConfig(name=t.name, dim=4, features=t.features) for t in tables], FEATS, opt
    )
    c = HierarchicalEmbeddingBagCollection(tables, FEATS, opt, seed=3)
    c.load_tables_state_dict(plain.tables_state_dict())
    assert c.groups[0].admission is not None and c.groups[0].admission.calls == 0
    # another sketch geometry cannot read the counts
    other = AdmissionConfig(min_count=3, width=2048, depth=3, decay_every=7)
    d = HierarchicalEmbeddingBagCollection(
        [TableConfig(name=t.name, dim=4, features=t.features, admission=other) for t in tables],
        FEATS,
        opt,
        seed=3,
    )
    with pytest.raises(ValueError, match="width 4096 in the checkpoint, 2048 here"):
        d.load_tables_state_dict(state)


@pytest.mark.parametrize("min_count", [1, 2])
def test_colliding_composites_with_admission(min_count: int) -> None:
    """Crafted composite-key collisions between tables of one group (the side-slot
    path) under admission: with min_count 1 exactly the separate tables' training; with
    2, every admitted pair has its own row and the rest read zeros."""

    def build(grouped: bool) -> HierarchicalEmbeddingBagCollection:
        tables = [
            TableConfig(
                name=f"t{i}",
                dim=4,
                features=[f"f{i}"],
                init=InitConfig(kind="zeros", scale=0.0 if grouped else 0.01 * i),
                admission=AdmissionConfig(min_count=min_count),
            )
            for i in (1, 2, 3)
        ]
        ebc = HierarchicalEmbeddingBagCollection(tables, FEATS3, SparseOptimConfig(kind="sgd"))
        assert len(ebc.groups) == (1 if grouped else 3)
        return ebc

    grouped, separate = build(True), build(False)
    data = colliding_batches(grouped)
    losses = [train_group(e, data) for e in (grouped, separate)]
    assert grouped.groups[0].store.collisions  # the crafted collisions took the side path
    if min_count == 1:
        assert losses[0] == losses[1]
        assert per_table(grouped) == per_table(separate)
    for t in grouped.tables:
        keys, _ = t.export()
        assert keys.unique().numel() == keys.numel() == len(t)
    stats = grouped.groups[0].stats()
    assert stats["admission_admitted"] == sum(grouped.num_rows().values())
    assert (stats["admission_rejected"] > 0) == (min_count > 1)

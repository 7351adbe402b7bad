"""TTL (``TableConfig.ttl_steps``): rows unused for more than ``ttl_steps`` steps are
deleted from every tier and come back freshly initialised on their next use.

Checked on every layout (unbounded; device cache over the host tier; device cache over
a host cache over the SSD tier), against a dense ``nn.EmbeddingBag`` reference that
re-initialises a row when its key comes back after more than ``ttl_steps`` idle steps,
and tiered bit for bit against unbounded (with and without prefetch).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import ConfigError, InitConfig, SparseOptimConfig, TableConfig, load_config
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.store.chain import sweep_every
from terarec.ps.tiers import host as host_tier_mod
from terarec.ps.tiers.ssd import SSDStore, SSDTier, SSDTierConfig
from tests.numerics import assert_close, f32_tol, loss_tol, max_grad, train_tol
from tests.ps.test_tiers_equivalence import BATCH, FEATS, VALUES, batches

INIT = InitConfig(kind="uniform", scale=0.1)
LAYOUTS = {"unbounded": (None, None), "device": (8, None), "device+host+ssd": (8, 16)}


def make(
    tmp_path: Path,
    layout: str,
    ttl: Optional[int],
    kind: str = "sgd",
    feats: tuple[str, ...] = ("a",),
    budgets: Optional[tuple[Optional[int], Optional[int]]] = None,
) -> HierarchicalEmbeddingBagCollection:
    device_rows, host_rows = budgets or LAYOUTS[layout]
    table = TableConfig(
        name="t", dim=4, init=INIT, device_rows=device_rows, host_rows=host_rows, ttl_steps=ttl
    )
    store = None
    if host_rows is not None:
        store = SSDStore(tmp_path / f"ssd-{layout}", SSDTierConfig(path=str(tmp_path)))
    opt = SparseOptimConfig(kind=kind, lr=0.05, initial_accumulator_value=0.1)
    return HierarchicalEmbeddingBagCollection([table], list(feats), opt, seed=3, ssd_store=store)


def step(ebc: HierarchicalEmbeddingBagCollection, keys: list[int]) -> None:
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor(keys), torch.tensor([len(keys)]))
    ebc(kjt).values().sum().backward()


def close(ebc: HierarchicalEmbeddingBagCollection) -> None:
    chain = ebc.groups[0].store
    if ebc.groups[0].tiered and isinstance(chain.tiers[-1], SSDTier):
        chain.tiers[-1].store.close()


def held_anywhere(ebc: HierarchicalEmbeddingBagCollection, key: int) -> list[str]:
    """Names of the tiers holding ``key`` (row present, expired or not)."""
    group = ebc.groups[0]
    k = torch.tensor([key])
    if not group.tiered:
        return ["host"] if int(group.store.tier.lookup_slots(k)[0]) >= 0 else []
    out = []
    for tier in group.store.tiers:
        if tier.find(k, torch.zeros(1, group.row_width)).numel() == 0:
            out.append(tier.name)
    return out


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_ttl_steps_must_be_a_positive_int_or_null(bad: object) -> None:
    assert TableConfig(name="t", dim=4, ttl_steps=None).ttl_steps is None
    assert TableConfig(name="t", dim=4, ttl_steps=7).ttl_steps == 7
    with pytest.raises(ValueError, match="ttl_steps: must be a positive number of steps"):
        TableConfig(name="t", dim=4, ttl_steps=bad)  # type: ignore[arg-type]


def test_ttl_steps_config_error_names_the_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntables: [{name: t, dim: 8, ttl_steps: 0}]\n")
    with pytest.raises(ConfigError, match=r"tables\[0\].*ttl_steps: must be a positive"):
        load_config(p)
    p.write_text("name: x\ntables: [{name: t, dim: 8, ttl_steps: 100}]\n")
    assert load_config(p).tables[0].ttl_steps == 100
    assert sweep_every(100) == 25 and sweep_every(3) == 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_idle_key_is_deleted_everywhere_and_comes_back_fresh(tmp_path: Path, layout: str) -> None:
    ttl, key = 8, 5
    ebc = make(tmp_path, layout, ttl)
    table, group = ebc.tables[0], ebc.groups[0]
    step(ebc, [key])  # step 1: trained once, so it differs from its initial row
    trained = table.lookup(torch.tensor([key]))
    init = table.initial_weights(torch.tensor([key]))
    assert not torch.equal(trained[:, :4], init)
    for s in range(2, 1 + ttl):  # churn: pushes the key down to the host / SSD tier
        step(ebc, list(range(100 + 8 * s, 108 + 8 * s)))
    assert held_anywhere(ebc, key) and len(table) == 1 + 8 * (ttl - 1)
    assert torch.equal(table.lookup(torch.tensor([key])), trained)  # idle ttl - 1 steps
    for s in range(1 + ttl, 4 + ttl + sweep_every(ttl)):
        step(ebc, list(range(100 + 8 * s, 108 + 8 * s)))
    # idle for more than ttl steps and swept: in no tier, reads as zeros, not exported
    assert held_anywhere(ebc, key) == []
    assert torch.equal(table.lookup(torch.tensor([key])), torch.zeros(1, group.row_width))
    assert key not in table.export()[0].tolist()
    stats = group.stats()
    assert stats["expired"] >= 1 and len(table) < 1 + 8 * (3 + ttl + sweep_every(ttl))
    live = sorted(table.export()[0].tolist())
    assert all(k >= 100 for k in live)
    # len counts rows up to the last sweep: at most sweep_every steps' worth more
    assert len(live) <= len(table) <= len(live) + 8 * sweep_every(ttl)
    # the next use creates it again, as a new key
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([key]), torch.tensor([1]))
    out = ebc(kjt).values()
    torch.testing.assert_close(out, init, rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(table.lookup(torch.tensor([key])), trained, rtol=0, atol=0)
    close(ebc)


@pytest.mark.numerics
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_key_used_within_ttl_survives(tmp_path: Path, layout: str) -> None:
    """A key back after ttl - 1 idle steps keeps training; one back after ttl idle
    steps starts over from its initial row."""
    ttl = 6
    ebc = make(tmp_path, layout, ttl)
    plain = make(tmp_path, "unbounded", None)
    table = ebc.tables[0]
    for s in range(1, 40):
        keys = list(range(1000 + 6 * s, 1006 + 6 * s))  # + keys 1, 2: fits 8 device rows
        if s % ttl == 1:  # steps 1, 7, 13, ...: ttl - 1 idle steps in between
            keys.append(1)
        if s in (39 - ttl - 1, 39):  # back after ttl idle steps (at the last step)
            keys.append(2)
        for e in (ebc, plain):
            step(e, keys)
    one = torch.tensor([1])
    assert torch.equal(table.lookup(one), plain.tables[0].lookup(one))  # never expired
    two = table.lookup(torch.tensor([2]))[:, :4]
    init2 = table.initial_weights(torch.tensor([2]))
    once = init2 - 0.05  # sgd, one use, grad 1
    # one float32 rounding of a value of size |init| + lr
    assert_close(two, once, f32_tol(float(init2.abs().max()) + 0.05), "row of key 2")
    assert not torch.equal(two, plain.tables[0].lookup(torch.tensor([2]))[:, :4])
    close(ebc)


class _TTLReference:
    """``nn.EmbeddingBag`` over every key + SGD, in float64; a row comes back as its
    initial row when its key was idle for more than ``ttl`` steps (what TTL deletion
    means)."""

    def __init__(self, keys: torch.Tensor, init: torch.Tensor, ttl: int, lr: float) -> None:
        self.keys, self.init, self.ttl = keys, init.double(), ttl
        self.bag = nn.EmbeddingBag(
            keys.numel(), init.shape[1], mode="sum", sparse=True, dtype=torch.float64
        )
        with torch.no_grad():
            self.bag.weight.copy_(init)
        self.last = torch.full((keys.numel(),), -(10**9))
        self.opt = torch.optim.SGD(self.bag.parameters(), lr=lr)

    def loss(self, kjt: KeyedJaggedTensor, s: int, head: torch.Tensor) -> torch.Tensor:
        used = torch.unique(torch.searchsorted(self.keys, kjt.values()))
        stale = used[self.last[used] < s - self.ttl]
        with torch.no_grad():
            self.bag.weight[stale] = self.init[stale]
        self.last[used] = s
        outs = [
            self.bag(torch.searchsorted(self.keys, kjt[f].values()), kjt[f].offsets()[:-1])
            for f in FEATS
        ]
        return (torch.tanh(torch.cat(outs, dim=1)) @ head.double()).square().sum()

    def rows(self, alive_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        alive = (self.last >= alive_from).nonzero().squeeze(1)
        return self.keys[alive], self.bag.weight.detach()[alive]


@pytest.mark.numerics
@pytest.mark.parametrize(
    "kind,host_rows,prefetch",
    [
        ("sgd", 256, False),
        ("sgd", None, True),
        ("adam", 256, True),
        ("rowwise_adagrad", None, False),
    ],
)
def test_tiered_with_ttl_matches_unbounded_with_ttl(
    tmp_path: Path, kind: str, host_rows: Optional[int], prefetch: bool
) -> None:
    """The issue's equivalence setting (64-row device tier, 256-row host tier over SSD,
    ~5,000 keys) with a TTL short enough that most of the tail expires: the tiered
    table computes exactly what the unbounded one does, and (SGD) the dense reference."""
    steps, ttl = 400, 40
    data = batches(steps)
    tiered = make(tmp_path, "t", ttl, kind, tuple(FEATS), budgets=(64, host_rows))
    plain = make(tmp_path, "unbounded", ttl, kind, tuple(FEATS))
    head = torch.linspace(-1, 1, 8).unsqueeze(1)
    keys = torch.unique(torch.cat([b.values() for b in data]))
    ref = None
    if kind == "sgd":
        ref = _TTLReference(keys, plain.tables[0].initial_weights(keys), ttl, lr=0.05)
    group = tiered.groups[0]
    grad = 0.0  # the reference's largest |gradient entry| (SGD: the update is lr * g)
    for s, kjt in enumerate(data, start=1):
        loss = (torch.tanh(tiered(kjt).values()) @ head).square().sum()
        worker = None
        if prefetch and s < steps:
            worker = threading.Thread(target=tiered.prefetch, args=(data[s],))
            worker.start()
        loss.backward()
        if worker is not None:
            worker.join()
        plain_loss = (torch.tanh(plain(kjt).values()) @ head).square().sum()
        plain_loss.backward()
        assert loss.item() == plain_loss.item(), f"step {s}: tiers changed the math"
        if ref is not None:
            ref.opt.zero_grad()
            ref_loss = ref.loss(kjt, s, head)
            ref_loss.backward()
            grad = max(grad, max_grad(ref.bag.parameters()))
            ref.opt.step()
            assert_close(loss.item(), ref_loss.item(), loss_tol(ref_loss.item(), s - 1, BATCH),
                         f"loss at step {s}")
    stats, plain_stats = group.stats(), plain.groups[0].stats()
    assert stats["device_evictions"] > 0 and stats["expired"] > 1000
    assert plain_stats["expired"] > 1000
    got_keys, rows = tiered.tables[0].export()
    plain_keys, plain_rows = plain.tables[0].export()
    order, plain_order = torch.argsort(got_keys), torch.argsort(plain_keys)
    assert torch.equal(got_keys[order], plain_keys[plain_order])
    assert torch.equal(rows[order], plain_rows[plain_order])  # weights and optimizer state
    assert got_keys.numel() < keys.numel() / 2  # most of the tail expired
    if ref is not None:
        ref_keys, ref_rows = ref.rows(steps + 1 - ttl)
        assert torch.equal(got_keys[order], ref_keys)
        tol = train_tol(0.05, steps, VALUES, float(ref_rows.abs().max()), grad)
        assert_close(rows[order, :4], ref_rows, tol, "rows")
    # the same through eval: expired keys read as zeros on both
    probe = keys[::7]
    torch.testing.assert_close(
        tiered.tables[0].lookup(probe), plain.tables[0].lookup(probe), rtol=0, atol=0
    )
    close(tiered)


@pytest.mark.numerics
def test_unbounded_group_of_tables_with_ttl_and_compaction(monkeypatch) -> None:
    """Two tables in one group (composite keys, slot -> table map), compacted on every
    sweep: each trains like its own dense reference with TTL."""
    monkeypatch.setattr(host_tier_mod, "_MIN_COMPACT", 0)
    ttl, steps = 12, 150
    tables = [
        TableConfig(name=n, dim=4, init=INIT, features=[f], ttl_steps=ttl)
        for n, f in (("t1", "a"), ("t2", "b"))
    ]
    opt = SparseOptimConfig(kind="sgd", lr=0.05)
    ebc = HierarchicalEmbeddingBagCollection(tables, FEATS, opt, seed=3)
    assert len(ebc.groups) == 1 and ebc.groups[0].num_tables == 2
    data = batches(steps)
    head = torch.linspace(-1, 1, 8).unsqueeze(1)
    refs = []
    for i, f in enumerate(FEATS):
        keys = torch.unique(torch.cat([b[f].values() for b in data]))
        refs.append(_TTLReference(keys, ebc.tables[i].initial_weights(keys), ttl, lr=0.05))
    compactions = 0
    grad = 0.0  # the references' largest |gradient entry| (SGD: the update is lr * g)
    for s, kjt in enumerate(data, start=1):
        before = ebc.groups[0].store.tier.num_slots
        loss = (torch.tanh(ebc(kjt).values()) @ head).square().sum()
        compactions += ebc.groups[0].store.tier.num_slots < before
        loss.backward()
        ref_loss = 0.0
        for i, (f, ref) in enumerate(zip(FEATS, refs)):
            ref.opt.zero_grad()
            used = torch.unique(torch.searchsorted(ref.keys, kjt[f].values()))
            stale = used[ref.last[used] < s - ttl]
            with torch.no_grad():
                ref.bag.weight[stale] = ref.init[stale]
            ref.last[used] = s
            out = ref.bag(torch.searchsorted(ref.keys, kjt[f].values()), kjt[f].offsets()[:-1])
            part = torch.tanh(out) @ head[4 * i : 4 * i + 4].double()
            ref_loss = ref_loss + part
        ref_total = ref_loss.square().sum()
        ref_total.backward()
        grad = max(grad, max_grad([ref.bag.weight for ref in refs]))
        for ref in refs:
            ref.opt.step()
        assert_close(loss.item(), ref_total.item(), loss_tol(ref_total.item(), s - 1, BATCH),
                     f"loss at step {s}")
    assert compactions > 3
    for i, ref in enumerate(refs):
        got_keys, rows = ebc.tables[i].export()
        ref_keys, ref_rows = ref.rows(steps + 1 - ttl)
        order = torch.argsort(got_keys)
        assert torch.equal(got_keys[order], ref_keys)
        tol = train_tol(0.05, steps, VALUES, float(ref_rows.abs().max()), grad)
        assert_close(rows[order, :4], ref_rows, tol, f"rows of table {i}")
    assert sum(ebc.num_rows().values()) == len(ebc.groups[0])

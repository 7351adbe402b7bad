"""One contract, every slot store: the flat store (one table, several tables, TTL), tier
chains (device cache over host, over a host cache and the SSD tier, with a scratch pad,
LFU) and a group of tiered tables with different budgets, built by the factory from
table configs, each with tiny caches that force every eviction path.

Each test drives the store through the ``SlotStore`` protocol only (``ps/store/protocol.py``)
and checks it against a dict reference ``(table, key) -> row``: training steps create,
read and update rows by slot; nothing is ever lost on eviction; admission leaves
declined pairs without a row; overwrite, export, load, prefetch and TTL keep the table's
content. A new store joins by one entry in ``STORES``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from terarec.config import SparseOptimConfig, TableConfig
from terarec.optim.sparse import build_row_optimizer
from terarec.ps.store.factory import build_store
from terarec.ps.store.protocol import SlotStore
from terarec.ps.tiers.ssd import SSDStore, SSDTierConfig

DIM = 3
W = DIM  # SGD keeps no state: row = weights
CUDA = torch.cuda.is_available()


def tables_cfg(n: int = 1, **kw: Any) -> list[TableConfig]:
    return [TableConfig(name=f"t{i}", dim=DIM, **kw) for i in range(n)]


# name -> (table configs, needs an SSD store, device)
STORES: dict[str, tuple[Callable[[], list[TableConfig]], bool, str]] = {
    "flat": (lambda: tables_cfg(), False, "cpu"),
    "flat-3-tables": (lambda: tables_cfg(3), False, "cpu"),
    "chain-host": (lambda: tables_cfg(device_rows=24), False, "cpu"),
    "chain-ssd": (lambda: tables_cfg(device_rows=24, host_rows=16), True, "cpu"),
    "chain-ssd-lfu": (
        lambda: tables_cfg(device_rows=24, host_rows=16, cache_policy="lfu"), True, "cpu"
    ),
    "chain-scratch": (lambda: tables_cfg(device_rows=8, scratch_pad=True), False, "cpu"),
    "tiered-3-tables": (
        lambda: [
            TableConfig(name="a", dim=DIM, device_rows=24),
            TableConfig(name="b", dim=DIM, device_rows=16, host_rows=12, cache_policy="lfu"),
            TableConfig(name="c", dim=DIM, device_rows=4, scratch_pad=True),
        ],
        True,
        "cpu",
    ),
    "flat-cuda": (lambda: tables_cfg(2), False, "cuda"),
    "tiered-2-tables-cuda": (
        lambda: [
            TableConfig(name="a", dim=DIM, device_rows=24),
            TableConfig(name="b", dim=DIM, device_rows=6, host_rows=12, scratch_pad=True),
        ],
        True,
        "cuda",
    ),
    "chain-ssd-cuda": (lambda: tables_cfg(device_rows=24, host_rows=16), True, "cuda"),
}
PARAMS = [
    pytest.param(n, marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))
    if "cuda" in n else n
    for n in STORES
]


class Case:
    """A store, its table count, and a dict reference of what it must hold."""

    def __init__(self, store: SlotStore, num_tables: int, device: str) -> None:
        self.store = store
        self.n = num_tables
        self.dev = torch.device(device)
        self.ref: dict[tuple[int, int], torch.Tensor] = {}
        self.step = 0

    def pairs(self, keys: list[int], tables: Optional[list[int]] = None) -> tuple[Any, Any]:
        """Sorted unique pairs as (keys, tables or None)."""
        tabs = tables if tables is not None else [0] * len(keys)
        pairs = sorted(set(zip(keys, [t % self.n for t in tabs])))
        k = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=self.dev)
        t = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=self.dev)
        return k, (t if self.n > 1 else None)

    def table_list(self, keys: torch.Tensor, tables: Optional[torch.Tensor]) -> list[int]:
        return [0] * keys.numel() if tables is None else tables.tolist()

    def create(self, keys: torch.Tensor, tables: Optional[torch.Tensor]) -> Any:
        def make(pos: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
            rows = initial(keys[pos], None if tables is None else tables[pos])
            return rows if out is None else out.copy_(rows)

        return make

    def train(self, keys: list[int], tables: Optional[list[int]] = None) -> torch.Tensor:
        """One step: prepare, check the rows read against the reference, add 1 to them."""
        self.step += 1
        self.store.expire(self.step)
        k, t = self.pairs(keys, tables)
        slots = self.store.prepare(k, self.step, self.create(k, t), tables=t)
        assert slots.dtype == torch.int64 and slots.shape == k.shape and bool((slots >= 0).all())
        got = self.store.read(slots)
        for i, (key, tab) in enumerate(zip(k.tolist(), self.table_list(k, t))):
            want = self.ref.get((tab, key))
            if want is None:
                want = initial(k[i : i + 1], None if t is None else t[i : i + 1])[0].cpu()
            assert torch.equal(got[i].cpu(), want), (key, tab)
            self.ref[(tab, key)] = want + 1
        self.store.write(slots, got + 1)
        return slots

    def check_content(self) -> None:
        """Every table's export (and lookup_rows) equals the reference."""
        for tab in range(self.n):
            keys, rows = self.store.export_table(tab)
            assert keys.numel() == rows.shape[0] and rows.shape[1:] == (W,)
            got = {int(k): r.cpu() for k, r in zip(keys, rows)}
            want = {k: r for (t, k), r in self.ref.items() if t == tab}
            assert got.keys() == want.keys(), tab
            for k, r in want.items():
                assert torch.equal(got[k], r), (tab, k)
            # the same rows in the same order, chunk after chunk (a streamed checkpoint)
            chunks = list(self.store.export_table_chunks(tab, chunk_rows=3))
            assert all(c[0].numel() <= 3 for c in chunks) or len(chunks) == 1
            assert torch.equal(torch.cat([c[0] for c in chunks]), keys)
            assert torch.equal(torch.cat([c[1] for c in chunks]), rows)
        assert len(self.store) == len(self.ref)
        assert self.store.rows_per_table(self.n) == [
            sum(1 for t, _ in self.ref if t == tab) for tab in range(self.n)
        ]
        if self.ref:
            pairs = list(self.ref)
            k = torch.tensor([p[1] for p in pairs], device=self.dev)
            t = torch.tensor([p[0] for p in pairs], device=self.dev) if self.n > 1 else None
            rows, found = self.store.lookup_rows(k, t)
            assert bool(found.all())
            assert torch.equal(rows.cpu(), torch.stack([self.ref[p] for p in pairs]))


def initial(keys: torch.Tensor, tables: Optional[torch.Tensor]) -> torch.Tensor:
    """Distinct, exactly representable initial rows per pair ``[N, W]``."""
    t = torch.zeros_like(keys) if tables is None else tables
    base = (keys.remainder(4099) * 4 + t).to(torch.float32).unsqueeze(1)
    return base * 8 + torch.arange(W, device=keys.device)


@pytest.fixture(params=PARAMS)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    make, ssd, dev = STORES[request.param]
    cfgs = make()
    store_db = SSDStore(tmp_path / "db", SSDTierConfig(path=str(tmp_path / "db"))) if ssd else None
    salts = [0, 0x5555, -0x7777][: len(cfgs)]  # composite keys: key ^ salt[table]
    store = build_store(cfgs, W, dev, store_db, salts=salts)
    assert isinstance(store, SlotStore)
    yield Case(store, len(cfgs), dev)
    if store_db is not None:
        store_db.close()


def test_training_steps_never_lose_a_row(case: Case) -> None:
    """Batches over 60 keys (tiny caches: every step evicts); every row read back is the
    one last written, every table's content equals the reference."""
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        keys = torch.randperm(60, generator=g)[:20].tolist()
        tabs = torch.randint(0, 3, (20,), generator=g).tolist()
        case.train(keys, tabs)
    case.check_content()
    assert all(isinstance(v, float) for v in case.store.stats().values())
    case.store.flush()


def test_same_key_in_two_tables_is_two_rows(case: Case) -> None:
    if case.n == 1:
        pytest.skip("one table")
    case.train([5, 5, 9], [0, 1, 1])
    case.train([5], [1])
    case.check_content()
    assert case.store.rows_per_table(case.n)[:2] == [1, 2]


def test_admission_declines_create_no_row(case: Case) -> None:
    case.step += 1
    k, t = case.pairs([1, 2, 3, 4])
    seen: list[torch.Tensor] = []

    def admit(pos: torch.Tensor) -> torch.Tensor:
        seen.append(pos.clone())
        return k[pos].remainder(2) == 0  # even keys only

    slots = case.store.prepare(k, case.step, case.create(k, t), tables=t, admit=admit)
    # every absent pair, once (per table at most)
    assert len(seen) <= case.n and sorted(torch.cat(seen).tolist()) == [0, 1, 2, 3]
    assert (slots >= 0).tolist() == [False, True, False, True]
    rows, found = case.store.lookup_rows(k, t)
    assert found.tolist() == [False, True, False, True]
    assert bool((rows[~found] == 0).all())
    assert len(case.store) == 2


def test_optimizer_step_by_slot(case: Case) -> None:
    opt = build_row_optimizer(SparseOptimConfig(kind="sgd", lr=0.5), DIM)
    slots = case.train([3, 7, 11])
    before = case.store.read(slots)
    grad = torch.tensor([[1.0, -2.0, 0.5]] * 3, device=case.dev)
    if opt.fused_on(case.dev, None):  # the fused kernel (CUDA + triton)
        case.store.update_rows(slots, grad, opt)
    else:  # the gather / update / scatter path the group takes without it
        case.store.write(slots, opt.update(case.store.read(slots), grad))
    # w - lr * g with lr * g exact in float32 (powers of two): no rounding
    assert torch.equal(case.store.read(slots), before - 0.5 * grad)


def test_overwrite_sets_rows_wherever_they_live(case: Case) -> None:
    for i in range(6):  # rows spread over the tiers
        case.train(list(range(10 * i, 10 * i + 10)))
    k, t = case.pairs([0, 15, 59, 100, 101])  # held (maybe far down) and absent
    new = torch.full((k.numel(), W), -3.0, device=case.dev)
    created = case.store.overwrite(k, new, case.step, tables=t)
    assert created == 2
    for key in k.tolist():
        case.ref[(0, key)] = torch.full((W,), -3.0)
    case.check_content()
    case.train([15, 100])  # and training reads them from there
    case.check_content()


def test_load_replaces_every_row(case: Case) -> None:
    case.train(list(range(20)))
    case.train(list(range(10, 30)))
    keys = torch.tensor([-(2**63), -1, 7, 2**62], dtype=torch.int64, device=case.dev)
    rows = torch.arange(4 * W, dtype=torch.float32, device=case.dev).view(4, W)
    tables = torch.zeros(4, dtype=torch.int64, device=case.dev) if case.n > 1 else None
    case.store.load(keys, rows, case.step, tables=tables)
    case.ref = {(0, int(k)): r.cpu() for k, r in zip(keys, rows)}
    case.check_content()
    case.train([7, 8])
    case.check_content()


def test_prefetch_moves_rows_not_content(case: Case) -> None:
    for i in range(4):
        case.train(list(range(8 * i, 8 * i + 8)))
    k, t = case.pairs([0, 1, 2, 90])  # 90: in no tier, left for the step to create
    assert isinstance(case.store.prefetch(k, case.step, tables=t), bool)
    case.check_content()
    case.train([0, 1, 2, 90])
    case.check_content()


@pytest.mark.parametrize("kind", ["flat", "chain"])
def test_ttl_rows_unused_for_ttl_steps_are_gone(kind: str) -> None:
    extra: dict[str, Any] = {"device_rows": 16} if kind == "chain" else {}
    c = Case(build_store(tables_cfg(ttl_steps=4, **extra), W, "cpu"), 1, "cpu")
    c.train([1, 2])
    for _ in range(6):
        c.train([3])
    c.ref = {p: r for p, r in c.ref.items() if p[1] == 3}
    keys, _ = c.store.export_table(0, fresh_from=c.step + 1 - 4)
    assert keys.tolist() == [3]
    _, found = c.store.lookup_rows(torch.tensor([1, 3]), fresh_from=c.step + 1 - 4)
    assert found.tolist() == [False, True]
    c.train([1])  # created again from the initializer, like a new key
    assert torch.equal(c.ref[(0, 1)], initial(torch.tensor([1]), None)[0] + 1)

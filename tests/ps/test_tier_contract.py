"""One contract, every tier: HostTier, CacheTier (device tier; budgeted host tier),
SSDTier, and their CUDA variants (skipped without CUDA).

Each test runs the tier against a plain dict reference (key -> row bits, metadata):
find fills what it has and returns the missed positions, insert upserts and hands back
what it displaced, evict / expire remove, export lists everything once, the metadata
``(last_step, freq)`` travels with the row, and bad inputs raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from terarec.ps.tiers import host as host_tier_mod
from terarec.ps.tiers.cache import CacheTier
from terarec.ps.tiers.host import HostTier
from terarec.ps.tiers.protocol import STAT_KEYS, Rows, Tier
from terarec.ps.tiers.ssd import SSDStore, SSDTier, SSDTierConfig

W = 5
CAP = 64  # bounded tiers hold this many rows: the tests stay within it unless they say so
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

Factory = Callable[[Path], Any]
TIERS: dict[str, tuple[Factory, str]] = {
    "host": (lambda p: HostTier(W, "cpu"), "cpu"),
    "device-cache": (lambda p: CacheTier(W, CAP, "cpu", "lru", "device"), "cpu"),
    "host-cache": (lambda p: CacheTier(W, CAP, "cpu", "lfu", "host", pin=False), "cpu"),
    "ssd": (lambda p: SSDTier(SSDStore(p / "db", SSDTierConfig(path=str(p / "db"))), W), "cpu"),
    "host-cuda": (lambda p: HostTier(W, "cuda"), "cuda"),
    "device-cache-cuda": (lambda p: CacheTier(W, CAP, "cuda", "lru", "device"), "cuda"),
    "host-cache-pinned": (lambda p: CacheTier(W, CAP, "cpu", "lru", "host", pin=True), "cpu"),
}
PARAMS = [
    pytest.param(name, marks=needs_cuda) if ("cuda" in name or "pinned" in name) else name
    for name in TIERS
]
BOUNDED = {"device-cache", "host-cache", "device-cache-cuda", "host-cache-pinned"}


@pytest.fixture(params=PARAMS)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, str, str]]:
    make, dev = TIERS[request.param]
    tier = make(tmp_path)
    yield tier, dev, request.param
    if isinstance(tier, SSDTier):
        tier.store.close()


def keys_t(values: list[int], dev: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=dev)


def rows_for(keys: torch.Tensor, salt: float = 0.0) -> torch.Tensor:
    """Distinct, exactly representable rows per key: ``[N, W]``."""
    k = (keys.remainder(100_003)).to(torch.float32).unsqueeze(1)
    return k * 8 + torch.arange(W, device=keys.device) + salt


def meta_for(keys: torch.Tensor, step: int) -> torch.Tensor:
    """Metadata per key ``[N, 2]``: (step + key % 7, 1 + key % 5)."""
    k = keys.remainder(35)
    return torch.stack([step + k.remainder(7), 1 + k.remainder(5)], dim=1)


def test_protocol_and_empty_tier(case) -> None:
    tier, dev, _ = case
    assert isinstance(tier, Tier)
    assert tier.row_width == W and isinstance(tier.name, str) and len(tier) == 0
    st = tier.stats()
    assert set(STAT_KEYS) <= set(st) and st["rows"] == 0 and st["bytes"] == 0
    keys, rows = tier.export()[:2]
    assert keys.numel() == 0 and rows.shape == (0, W)


def test_empty_inputs(case) -> None:
    tier, dev, _ = case
    empty = keys_t([], dev)
    out = torch.zeros(0, W, device=dev)
    missed = tier.find(empty, out, torch.zeros(0, 2, dtype=torch.int64, device=dev))
    assert missed.numel() == 0 and missed.dtype == torch.int64
    displaced = tier.insert(empty, out)
    assert isinstance(displaced, Rows) and displaced.keys.numel() == 0
    assert tier.evict(empty) == 0
    assert tier.expire(10).numel() == 0
    assert len(tier) == 0


def test_find_fills_hits_and_returns_missed_positions(case) -> None:
    tier, dev, _ = case
    held = keys_t([7, -3, 2**62, -(2**63), 0], dev)
    tier.insert(held, rows_for(held), meta_for(held, 10))
    query = keys_t([1, 7, 7, -(2**63), 99, 0, -3], dev)  # duplicates allowed
    out = torch.full((7, W), -1.5, device=dev)
    meta = torch.full((7, 2), -9, dtype=torch.int64, device=dev)
    missed = tier.find(query, out, meta)
    assert missed.dtype == torch.int64 and missed.device == query.device
    assert missed.tolist() == [0, 4]  # ascending positions of the absent keys
    hit = torch.tensor([1, 2, 3, 5, 6], device=dev)
    assert torch.equal(out[hit], rows_for(query[hit]))
    assert torch.equal(meta[hit], meta_for(query[hit], 10))
    assert (out[missed] == -1.5).all() and (meta[missed] == -9).all()  # untouched
    assert tier.find(keys_t([5, 6], dev), torch.zeros(2, W, device=dev)).tolist() == [0, 1]
    st = tier.stats()
    assert st["hits"] == 5 and st["misses"] == 4


def test_insert_overwrites(case) -> None:
    tier, dev, _ = case
    keys = keys_t(list(range(-10, 10)), dev)
    tier.insert(keys, rows_for(keys))
    some = keys[::3].contiguous()
    tier.insert(some, rows_for(some, salt=0.25), meta_for(some, 3))
    assert len(tier) == 20 and tier.stats()["inserts"] == 20  # overwrites are not new
    out = torch.zeros(20, W, device=dev)
    meta = torch.zeros(20, 2, dtype=torch.int64, device=dev)
    assert tier.find(keys, out, meta).numel() == 0
    want = rows_for(keys)
    want[::3] = rows_for(some, salt=0.25)
    want_meta = torch.zeros(20, 2, dtype=torch.int64, device=dev)  # no meta given: zeros
    want_meta[::3] = meta_for(some, 3)
    assert torch.equal(out, want) and torch.equal(meta, want_meta)


def test_evict_removes_and_counts(case) -> None:
    tier, dev, _ = case
    keys = keys_t(list(range(30)), dev)
    tier.insert(keys, rows_for(keys))
    assert tier.evict(keys_t([3, 4, 4, 999, 29], dev)) == 3  # duplicates and absent keys
    assert len(tier) == 27 and tier.stats()["deletes"] == 3
    assert tier.find(keys_t([2, 3, 4, 29], dev), torch.zeros(4, W, device=dev)).tolist() == [
        1,
        2,
        3,
    ]
    assert tier.evict(keys_t([3, 4], dev)) == 0
    again = keys_t([4], dev)
    tier.insert(again, rows_for(again, salt=1.0))  # comes back with the new row
    out = torch.zeros(1, W, device=dev)
    assert tier.find(again, out).numel() == 0 and torch.equal(out, rows_for(again, salt=1.0))
    assert len(tier) == 28
    got, _ = tier.export()[:2]
    assert sorted(got.tolist()) == sorted(set(range(30)) - {3, 29})


def test_export_and_metadata_round_trip(case) -> None:
    tier, dev, _ = case
    g = torch.Generator().manual_seed(3)
    keys = torch.randperm(10_000, generator=g)[:50].to(dev) * 977 - 4_000_000
    rows = torch.randn(50, W, generator=g).to(dev)
    meta = meta_for(keys, 1_000_000_000_000)  # large steps survive (int64, not float)
    tier.insert(keys, rows, meta)
    k, r, m = tier.export(with_meta=True)
    order = torch.argsort(k)
    ref = torch.argsort(keys)
    assert torch.equal(k[order].to(dev), keys[ref])
    assert torch.equal(r[order].to(dev), rows[ref])  # bit for bit
    assert m.dtype == torch.int64 and torch.equal(m[order].to(dev), meta[ref])
    k2, r2 = tier.export()
    assert torch.equal(k2, k) and torch.equal(r2, r)


def test_no_duplicates_under_overlapping_inserts(case) -> None:
    tier, dev, _ = case
    g = torch.Generator().manual_seed(1)
    ref: dict[int, torch.Tensor] = {}
    for step in range(6):
        keys = torch.unique(torch.randint(0, 40, (25,), generator=g)).to(dev)
        rows = rows_for(keys, salt=float(step))
        tier.insert(keys, rows, meta_for(keys, step))
        for k, r in zip(keys.tolist(), rows):
            ref[k] = r
    keys, rows = tier.export()[:2]
    assert keys.numel() == torch.unique(keys).numel() == len(ref) == len(tier)
    for k, r in zip(keys.tolist(), rows):
        assert torch.equal(r.to(dev), ref[k])


def test_expire_removes_stale_rows_except_spared(case) -> None:
    tier, dev, _ = case
    keys = keys_t(list(range(20)), dev)
    meta = torch.stack([keys, torch.ones_like(keys)], dim=1)  # key k last used at step k
    tier.insert(keys, rows_for(keys), meta)

    def spare(k: torch.Tensor) -> torch.Tensor:
        return k.remainder(5) == 0  # e.g. held by a tier above

    gone = tier.expire(10, spare)
    assert sorted(gone.tolist()) == [k for k in range(10) if k % 5]
    assert len(tier) == 12 and tier.stats()["expired"] == 8
    held = sorted(tier.export()[0].tolist())
    assert held == [0, 5] + list(range(10, 20))
    assert tier.expire(10).numel() == 2 and tier.expire(10).numel() == 0


def test_flush_keeps_everything(case) -> None:
    tier, dev, _ = case
    keys = keys_t([1, 2, 3], dev)
    tier.insert(keys, rows_for(keys))
    tier.flush()
    out = torch.zeros(3, W, device=dev)
    assert tier.find(keys, out).numel() == 0 and torch.equal(out, rows_for(keys))


def test_stats_count_rows_and_bytes(case) -> None:
    tier, dev, _ = case
    keys = keys_t(list(range(10)), dev)
    tier.insert(keys, rows_for(keys))
    st = tier.stats()
    assert st["rows"] == 10 and st["inserts"] == 10
    assert st["bytes"] >= 10 * W * 4  # rows (and their metadata)
    tier.evict(keys[:4])
    assert tier.stats()["rows"] == 6 and tier.stats()["bytes"] == st["bytes"] * 6 / 10


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"keys": torch.tensor([1, 2], dtype=torch.int32)}, "keys must be int64"),
        ({"keys": torch.tensor([[1, 2]])}, "keys must be int64"),
        ({"rows": torch.zeros(2, W + 1)}, "rows must be float"),
        ({"rows": torch.zeros(3, W)}, "rows must be float"),
        ({"meta": torch.zeros(2, 2)}, "meta must be int64"),
        ({"meta": torch.zeros(2, 3, dtype=torch.int64)}, "meta must be int64"),
    ],
)
def test_bad_inputs_are_clear_errors(case, bad: dict[str, torch.Tensor], match: str) -> None:
    tier, dev, name = case
    args = {"keys": torch.tensor([1, 2]), "rows": torch.zeros(2, W), "meta": None}
    args.update(bad)
    args = {k: None if v is None else v.to(dev) for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        tier.insert(args["keys"], args["rows"], args["meta"])
    if "rows" in bad or "meta" in bad:
        out, meta = args["rows"], args["meta"]
        with pytest.raises(ValueError, match="out must be float|meta must be int64"):
            tier.find(torch.tensor([1, 2], device=dev), out, meta)
    else:
        with pytest.raises(ValueError, match=match):
            tier.find(args["keys"], torch.zeros(2, W, device=dev))
        with pytest.raises(ValueError, match=match):
            tier.evict(args["keys"])
    assert len(tier) == 0


def test_bounded_tiers_hand_back_what_they_displace(case) -> None:
    """Inserting more rows than a cache holds: every row is either held or handed back
    (with its metadata), exactly once. Unbounded tiers hand back nothing."""
    tier, dev, name = case
    g = torch.Generator().manual_seed(5)
    held_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    ref: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(5):
        keys = torch.unique(torch.randint(0, 3 * CAP, (CAP // 2,), generator=g)).to(dev)
        rows, meta = rows_for(keys, salt=float(step)), meta_for(keys, step)
        back = tier.insert(keys, rows, meta)
        if name not in BOUNDED:
            assert back.keys.numel() == 0
        for k, r, m in zip(back.keys.tolist(), back.rows, back.meta):
            held_out[k] = (r, m)
        for k, r, m in zip(keys.tolist(), rows, meta):
            ref[k] = (r, m)
            held_out.pop(k, None)
    keys, rows, meta = tier.export(with_meta=True)
    assert not set(keys.tolist()) & set(held_out)
    assert set(keys.tolist()) | set(held_out) == set(ref)
    for k, r, m in zip(keys.tolist(), rows, meta):
        held_out[k] = (r, m)
    for k, (r, m) in ref.items():
        assert torch.equal(held_out[k][0].to(dev), r) and torch.equal(held_out[k][1].to(dev), m)
    if name in BOUNDED:
        assert len(tier) == CAP


# -- tier-specific behaviour behind the contract ------------------------------------


def test_host_tier_compaction_keeps_rows_and_unindexed_slots(monkeypatch) -> None:
    tier = HostTier(W)
    keys = torch.arange(100, dtype=torch.int64)
    tier.insert(keys, rows_for(keys), meta_for(keys, 0))
    side = tier.append_unindexed(torch.tensor([4]))  # a key the index must not map
    tier.row_block(side, 1).copy_(torch.full((1, W), 42.0))
    tier.evict(torch.cat([keys[::2], keys[1:2]]))  # 51 dead, 49 + 1 live
    assert tier.maybe_compact() is None  # few dead slots: not worth a pass
    monkeypatch.setattr(host_tier_mod, "_MIN_COMPACT", 0)
    perm = tier.maybe_compact()
    assert perm is not None and tier.num_slots == 50 == len(tier)
    assert perm[:49].tolist() == list(range(3, 100, 2)) and perm[49].item() == side
    live = keys[3::2].contiguous()
    out, meta = torch.zeros(49, W), torch.zeros(49, 2, dtype=torch.int64)
    assert tier.find(live, out, meta).numel() == 0
    assert torch.equal(out, rows_for(live)) and torch.equal(meta, meta_for(live, 0))
    assert torch.equal(tier.read(torch.tensor([49])), torch.full((1, W), 42.0))
    assert tier.lookup_slots(torch.tensor([4, 1])).tolist() == [-1, -1]
    new = torch.tensor([4, 1000])
    tier.insert(new, rows_for(new))
    assert tier.lookup_slots(new).tolist() == [50, 51] and len(tier) == 52
    assert tier.index.keys()[49].item() == 4  # the unindexed slot kept its key


def test_host_tier_slots_for_recreates_dead_and_stale_rows() -> None:
    tier = HostTier(W)

    def create(pos: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(torch.full((pos.numel(), W), -1.0))

    keys = torch.tensor([10, 20, 30])
    slots = tier.slots_for(keys, create)
    tier.write(slots, rows_for(keys))
    tier.touch(slots, 5)
    tier.touch(slots[:1], 9)
    tier.evict(torch.tensor([20]))
    fresh = torch.zeros(4, dtype=torch.bool)
    again = tier.slots_for(torch.tensor([10, 20, 30, 40]), create, expire_before=7, fresh=fresh)
    assert again[:3].tolist() == slots.tolist()  # a dead key gets its old slot back
    assert fresh.tolist() == [False, True, True, True]  # 20 dead, 30 stale, 40 new
    assert torch.equal(tier.read(again[:1]), rows_for(keys[:1]))
    assert (tier.read(again[1:]) == -1.0).all()
    assert tier.read_meta(again).tolist() == [[9, 2], [0, 0], [0, 0], [0, 0]]
    st = tier.stats()
    assert st["expired"] == 1 and len(tier) == 4


def test_cache_tier_expire_never_takes_locked_rows() -> None:
    c = CacheTier(W, 8)
    keys = torch.tensor([1, 2, 3])
    slots, _ = c.admit(keys, rows_for(keys), step=1, lock_until=1)
    c.lock(slots[:1], 20)  # e.g. prefetched for a later step
    assert c.expire(15).tolist() == [2, 3] and len(c) == 1
    assert c.contains(torch.tensor([1, 2])).tolist() == [True, False]


def test_ssd_tier_reads_values_written_without_metadata(tmp_path: Path) -> None:
    """A table written before rows carried metadata (values of row_width floats, no
    b"m" flag) still reads, with metadata (0, 0), and keeps that layout on writes."""
    from terarec.ps.tiers.ssd_format import meta_key

    cfg = SSDTierConfig(path=str(tmp_path))
    with SSDStore(tmp_path / "db", cfg) as store:
        tier = SSDTier(store, W, table_id=3)
        store._db.delete(meta_key(3, b"m"))  # what an old DB looks like
    with SSDStore(tmp_path / "db", cfg) as store:
        old = SSDTier(store, W, table_id=3)
        assert not old.has_meta and tier.has_meta
        keys = torch.tensor([1, 2])
        old.insert(keys, rows_for(keys), meta_for(keys, 4))  # the metadata is dropped
        out, meta = torch.zeros(2, W), torch.full((2, 2), 7, dtype=torch.int64)
        assert old.find(keys, out, meta).numel() == 0
        assert torch.equal(out, rows_for(keys)) and meta.tolist() == [[0, 0], [0, 0]]
        assert old.stats()["bytes"] == 2 * W * 4

"""SSD tier (RocksDB via rocksdict): the Tier contract against a dict reference,
durability across processes, checkpoints, several tables per store, and faults
(unwritable path, locked DB, full disk, corrupted rows)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from terarec.ps.tiers.protocol import Tier
from terarec.ps.tiers.ssd import (
    SSDStore,
    SSDTier,
    SSDTierConfig,
    SSDTierError,
    decode_keys,
    encode_keys,
    rank_dir,
)
from terarec.ps.tiers.ssd_format import WrittenKeys

W = 6  # row width of most tests: small rows, many keys
SENTINEL = 7.25


def _cfg(path: Path, **kw: object) -> SSDTierConfig:
    return SSDTierConfig(**{"path": str(path), "block_cache_mb": 8, "write_buffer_mb": 4, **kw})


def _bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = x.numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


def _random_rows(rng: np.random.Generator, n: int, w: int = W) -> torch.Tensor:
    # Arbitrary bit patterns: NaN payloads, -0.0, infinities, denormals all round-trip.
    bits = rng.integers(-(2**31), 2**31, size=(n, w), dtype=np.int64).astype(np.int32)
    return torch.from_numpy(bits.view(np.float32).copy())


class DictTier:
    """The reference: a dict of key -> row bits."""

    def __init__(self) -> None:
        self.rows: dict[int, np.ndarray] = {}

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        for k, r in zip(keys.tolist(), _bits(rows)):
            self.rows[k] = r.copy()

    def delete(self, keys: torch.Tensor) -> int:
        present = {k for k in keys.tolist() if k in self.rows}
        for k in present:
            del self.rows[k]
        return len(present)


@pytest.fixture
def tier(tmp_path: Path):
    t = SSDTier.open(_cfg(tmp_path), row_width=W)
    yield t
    t.close()


def test_satisfies_tier_protocol(tier: SSDTier) -> None:
    assert isinstance(tier, Tier)
    assert tier.name == "ssd" and tier.row_width == W and len(tier) == 0


def test_key_encoding_is_fixed_width_and_ordered() -> None:
    keys = np.array([np.iinfo(np.int64).min, -(2**40), -1, 0, 1, 2**40, np.iinfo(np.int64).max])
    enc = encode_keys(3, keys)
    assert {len(k) for k in enc} == {13}
    assert enc == sorted(enc)  # byte order is numeric order
    assert np.array_equal(decode_keys(b"".join(enc)), keys)
    assert encode_keys(4, keys[:1])[0] > encode_keys(3, keys[-1:])[0]  # tables are ranges


@pytest.mark.parametrize(
    "threads,known_keys", [(1, 0), (2, 1 << 22), (2, 64)], ids=["1thr-nostate", "2thr", "tiny"]
)
def test_contract_against_dict_reference(tmp_path: Path, threads: int, known_keys: int) -> None:
    rng = np.random.default_rng(threads * 100 + known_keys)
    tier = SSDTier.open(_cfg(tmp_path, num_threads=threads, known_keys=known_keys), row_width=W)
    ref = DictTier()
    universe = np.concatenate(
        [rng.integers(-(2**63), 2**63 - 1, 6000, dtype=np.int64), [-(2**63), 2**63 - 1, 0, -1]]
    )
    n_hits = n_misses = 0
    for step in range(8):
        n = 5000 if step == 3 else int(rng.integers(1, 600))  # one batch splits over threads
        keys = torch.from_numpy(rng.choice(universe, n, replace=False))
        if step % 2 == 0:  # lookup first, like a first touch
            out = torch.full((n, W), SENTINEL)
            missed = tier.find(keys, out)
            want_missed = [i for i, k in enumerate(keys.tolist()) if k not in ref.rows]
            assert missed.tolist() == want_missed
            assert missed.dtype == torch.int64
            assert (out[missed] == SENTINEL).all()  # absent rows untouched
            hit = np.setdiff1d(np.arange(n), want_missed)
            want = np.stack([ref.rows[k] for k in keys[hit].tolist()]) if hit.size else None
            if want is not None:
                assert np.array_equal(_bits(out[hit]), want)
            n_hits, n_misses = n_hits + hit.size, n_misses + len(want_missed)
        rows = _random_rows(rng, n)
        before = len(ref.rows)
        tier.insert(keys, rows)
        ref.insert(keys, rows)
        assert len(tier) == len(ref.rows), step
        assert tier.stats()["rows"] == len(ref.rows)
        assert len(ref.rows) >= before

    keys, rows = tier.export()
    assert keys.tolist() == sorted(ref.rows)
    assert np.array_equal(_bits(rows), np.stack([ref.rows[k] for k in keys.tolist()]))
    st = tier.stats()
    assert (st["hits"], st["misses"]) == (n_hits, n_misses)
    assert st["inserts"] == len(ref.rows) and st["bytes"] == len(ref.rows) * (W * 4 + 16)  # + meta
    chunks = list(tier.export_chunks(chunk_rows=1000))
    assert len(chunks) == -(-len(ref.rows) // 1000)
    assert torch.equal(torch.cat([k for k, _ in chunks]), keys)
    tier.close()


def test_duplicate_keys_in_one_insert_last_row_wins(tier: SSDTier) -> None:
    keys = torch.tensor([5, 9, 5, -2, 5])
    rows = torch.arange(5 * W, dtype=torch.float32).view(5, W)
    tier.insert(keys, rows)
    assert len(tier) == 3
    out = torch.zeros(2, W)
    assert tier.find(torch.tensor([5, -2]), out).numel() == 0
    assert torch.equal(out, rows[[4, 3]])


def test_read_contains_delete(tier: SSDTier) -> None:
    tier.insert(torch.arange(10), torch.ones(10, W))
    rows, found = tier.read(torch.tensor([3, 42, 9]))
    assert found.tolist() == [True, False, True]
    assert torch.equal(rows[1], torch.zeros(W)) and torch.equal(rows[0], torch.ones(W))
    assert tier.contains(torch.tensor([0, 10, -1, 9])).tolist() == [True, False, False, True]
    assert tier.delete(torch.tensor([1, 2, 2, 77])) == 2
    assert len(tier) == 8
    assert tier.find(torch.tensor([1, 2, 3]), torch.zeros(3, W)).tolist() == [0, 1]
    assert tier.contains(torch.tensor([1, 3])).tolist() == [False, True]
    assert tier.delete(torch.tensor([1, 2])) == 0
    tier.insert(torch.tensor([1, 3]), torch.zeros(2, W))  # 1 is new again, 3 overwritten
    assert len(tier) == 9
    tier.store.forget_key_states()  # the same answers from the DB alone
    assert tier.contains(torch.tensor([1, 2, 3])).tolist() == [True, False, True]
    tier.insert(torch.tensor([2, 3]), torch.zeros(2, W))
    assert len(tier) == 10 and tier.stats()["deletes"] == 2


def test_read_racing_a_write_records_nothing_stale(
    tier: SSDTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lookup that misses while another thread's write of the same key lands must not
    # leave "absent" behind in the key states: the next insert would count the key twice.
    store, lookup = tier.store, tier.store._multi_get
    raced = []

    def lookup_then_write(keys: list[bytes], op: str) -> list[object]:
        vals = lookup(keys, op)
        if op == "read" and not raced:
            raced.append(True)
            tier.insert(torch.tensor([5]), torch.ones(1, W))  # lands mid-read
        return vals

    monkeypatch.setattr(store, "_multi_get", lookup_then_write)
    assert tier.find(torch.tensor([5]), torch.zeros(1, W)).tolist() == [0]  # saw it absent
    tier.insert(torch.tensor([5]), torch.zeros(1, W))
    assert len(tier) == 1


def test_key_states_forget_what_they_cannot_record(tmp_path: Path) -> None:
    tier = SSDTier.open(_cfg(tmp_path, known_keys=64), row_width=W)
    assert tier.find(torch.arange(10), torch.zeros(10, W)).numel() == 10  # known absent
    tier.insert(torch.arange(100), torch.zeros(100, W))  # more keys than the states hold
    tier.insert(torch.arange(10), torch.ones(10, W))  # overwrites, not new rows
    assert len(tier) == 100
    tier.close()


def test_tables_share_a_store_and_reopen(tmp_path: Path) -> None:
    with SSDStore.for_rank(_cfg(tmp_path), rank=3) as store:
        a, b = SSDTier(store, row_width=W, table_id=0), SSDTier(store, row_width=2, table_id=1)
        a.insert(torch.tensor([1, 2, 3]), torch.ones(3, W))
        b.insert(torch.tensor([2, 3]), torch.full((2, 2), 2.0))
        assert (len(a), len(b)) == (3, 2)
        b_keys, b_rows = b.export()
        assert b_keys.tolist() == [2, 3] and torch.equal(b_rows, torch.full((2, 2), 2.0))
        assert a.find(torch.tensor([4]), torch.zeros(1, W)).tolist() == [0]
    assert (tmp_path / "rank3").is_dir() and rank_dir(tmp_path, 3) == tmp_path / "rank3"
    with SSDStore.for_rank(_cfg(tmp_path), rank=3) as store:
        assert (len(SSDTier(store, W, 0)), len(SSDTier(store, 2, 1))) == (3, 2)
        with pytest.raises(SSDTierError, match="width 6, opened with 8"):
            SSDTier(store, row_width=8, table_id=0)


def test_checkpoint_is_a_consistent_copy(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with SSDTier.open(cfg, row_width=W) as tier:
        tier.insert(torch.arange(100), torch.ones(100, W))
        tier.store.checkpoint(tmp_path / "ckpt")
        tier.insert(torch.arange(100, 150), torch.zeros(50, W))
        assert len(tier) == 150
    with SSDStore(tmp_path / "ckpt", cfg) as store:
        restored = SSDTier(store, row_width=W)
        keys, rows = restored.export()
        assert len(restored) == 100 and keys.tolist() == list(range(100))
        assert torch.equal(rows, torch.ones(100, W))


_WRITER = textwrap.dedent(
    """
    import os, sys
    import numpy as np, torch
    from terarec.ps.tiers.ssd import SSDTier, SSDTierConfig
    path, mode = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(7)
    keys = torch.from_numpy(rng.integers(-2**63, 2**63 - 1, 30_000, dtype=np.int64))
    bits = rng.integers(-2**31, 2**31, size=(30_000, 16), dtype=np.int64).astype(np.int32)
    rows = torch.from_numpy(bits.view(np.float32).copy())
    np.save(os.path.join(path, "want_keys.npy"), keys.numpy())
    np.save(os.path.join(path, "want_bits.npy"), bits)
    tier = SSDTier.open(SSDTierConfig(path=path, write_buffer_mb=1), row_width=16)
    for s in range(0, 30_000, 4096):
        tier.insert(keys[s : s + 4096], rows[s : s + 4096])
    tier.flush()
    if mode == "hard_exit":
        os._exit(0)  # no close, no destructors: flush alone must have made it durable
    tier.close()
    """
)


@pytest.mark.parametrize("mode", ["close", "hard_exit"])
def test_flushed_rows_survive_in_a_new_process(tmp_path: Path, mode: str) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    res = subprocess.run(
        [sys.executable, "-c", _WRITER, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    want_keys = np.load(tmp_path / "want_keys.npy")
    want_bits = np.load(tmp_path / "want_bits.npy")
    with SSDTier.open(SSDTierConfig(path=str(tmp_path)), row_width=16) as tier:
        assert len(tier) == want_keys.size
        out = torch.zeros(want_keys.size, 16)
        assert tier.find(torch.from_numpy(want_keys), out).numel() == 0
        assert np.array_equal(_bits(out), want_bits)
        keys, rows = tier.export()
        order = np.argsort(want_keys)
        assert np.array_equal(keys.numpy(), want_keys[order])
        assert np.array_equal(_bits(rows), want_bits[order])


# ----------------------------------------------------------------------------- faults


def test_unwritable_path_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a regular file")
    with pytest.raises(SSDTierError) as e:
        SSDTier.open(_cfg(blocker / "ssd"), row_width=W)
    assert str(blocker / "ssd" / "rank0") in str(e.value)
    assert "writable directory" in str(e.value)


def test_db_held_by_another_store(tier: SSDTier, tmp_path: Path) -> None:
    with pytest.raises(SSDTierError, match="another process holds this DB") as e:
        SSDStore.for_rank(_cfg(tmp_path), rank=0)
    assert str(tmp_path / "rank0") in str(e.value)


class _FullDisk:
    """Stands in for the Rdict: every write fails as RocksDB does on ENOSPC."""

    def __init__(self, db: object, path: Path) -> None:
        self._db, self._path = db, path

    def write(self, *args: object, **kwargs: object) -> None:
        raise Exception(  # rocksdict raises bare Exception with RocksDB's status
            f"IO error: No space left on device: While appending to file: {self._path}/000009.log"
        )

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def test_disk_full_on_insert_loses_nothing(tier: SSDTier, monkeypatch: pytest.MonkeyPatch) -> None:
    tier.insert(torch.arange(10), torch.ones(10, W))
    stats = tier.stats()
    keys, rows = torch.arange(5, 20), _random_rows(np.random.default_rng(0), 15)
    keep = rows.clone()
    monkeypatch.setattr(tier.store, "_db", _FullDisk(tier.store._db, tier.store.path))
    with pytest.raises(SSDTierError) as e:
        tier.insert(keys, rows)
    msg = str(e.value)
    assert str(tier.store.path) in msg and "No space left" in msg
    assert "nothing of this call was stored" in msg
    monkeypatch.undo()
    assert torch.equal(rows, keep)  # the caller still holds its rows
    after = tier.stats()
    for k in ("rows", "inserts", "writes"):
        assert after[k] == stats[k], k
    assert tier.find(torch.arange(10, 20), torch.zeros(10, W)).numel() == 10  # none written
    tier.insert(keys, rows)  # the retry succeeds and counts exactly
    assert len(tier) == 20


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return res.returncode == 0


def test_real_disk_full_is_a_clear_error(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "4m"):
        pytest.skip("needs root and permission to mount a small tmpfs")
    try:
        tier = SSDTier.open(_cfg(mnt, write_buffer_mb=1), row_width=192)
        durable = 0
        with pytest.raises(SSDTierError) as e:
            for i in range(100):
                tier.insert(torch.arange(i * 1000, (i + 1) * 1000), torch.ones(1000, 192))
                tier.flush()
                durable = (i + 1) * 1000
        assert str(mnt / "rank0") in str(e.value) and "No space left" in str(e.value)
        assert durable > 0
        # rows written before the failure are still served; later writes fail loudly
        assert tier.find(torch.arange(durable), torch.zeros(durable, 192)).numel() == 0
        n = len(tier)
        with pytest.raises(SSDTierError, match="nothing of this call was stored"):
            tier.insert(torch.tensor([-1]), torch.ones(1, 192))
        assert len(tier) == n
        with pytest.raises(SSDTierError, match="NOT durable"):
            tier.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_corrupted_row_is_reported(tier: SSDTier) -> None:
    tier.insert(torch.tensor([1, 2]), torch.ones(2, W))
    tier.store._db[encode_keys(0, np.array([2]))[0]] = b"short"
    with pytest.raises(SSDTierError, match="key 2 of table 0 holds 5 bytes, expected 40"):
        tier.find(torch.tensor([1, 2]), torch.zeros(2, W))


def test_chunked_reads_and_held_views(tmp_path: Path) -> None:
    """Reads split into chunks over threads (misses between hits, a short value found in
    a later chunk), and a view of one read's rows kept alive across the next read."""
    store = SSDStore(tmp_path / "db", _cfg(tmp_path, num_threads=2))
    store.register(0, W)
    rng = np.random.default_rng(3)
    keys = rng.permutation(np.arange(-6000, 6000, dtype=np.int64))
    rows = _bits(_random_rows(rng, keys.size)).view(np.float32)
    held = keys[keys % 3 != 0]
    store.write(0, held, rows[keys % 3 != 0])
    want = dict(zip(held.tolist(), _bits(rows[keys % 3 != 0])))
    hit_pos, first, miss_pos = store.read(0, keys, W)
    assert miss_pos.tolist() == np.flatnonzero(keys % 3 == 0).tolist()
    assert np.array_equal(_bits(first), np.stack([want[k] for k in keys[hit_pos].tolist()]))
    kept = first.copy()
    hit2, second, _ = store.read(0, keys[::-1].copy(), W)  # `first` is still alive
    assert np.array_equal(_bits(first), _bits(kept))
    assert np.array_equal(_bits(second), np.stack([want[k] for k in keys[::-1][hit2].tolist()]))
    store._db[encode_keys(0, held[-1:])[0]] = b"short"
    with pytest.raises(SSDTierError, match=f"key {held[-1]} of table 0 holds 5 bytes"):
        store.read(0, keys, W)
    store.close()


def test_written_keys_filter_has_no_false_negatives() -> None:
    f = WrittenKeys(max_keys=1 << 30, first=1 << 12)
    rng = np.random.default_rng(5)
    added = rng.integers(-(2**63), 2**63 - 1, 50_000, dtype=np.int64)
    added[:3] = [-1, -(2**63), 2**63 - 1]
    for s in range(0, added.size, 7000):  # several layers
        f.add(np.sort(added[s : s + 7000]))
    assert f.may_hold(added).all()
    others = rng.integers(-(2**63), 2**63 - 1, 50_000, dtype=np.int64)
    assert f.may_hold(others).mean() < 0.03
    assert not WrittenKeys(max_keys=10).may_hold(added).any()


class _CountingGets:
    """Counts the keys the store asks RocksDB about (existence checks and reads)."""

    def __init__(self, store: SSDStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.asked = 0
        for name in ("_start_multi_get", "_multi_get"):
            orig = getattr(store, name)

            def counted(keys: list[bytes], op: str, orig=orig) -> object:  # type: ignore[no-untyped-def]
                self.asked += len(keys)
                return orig(keys, op)

            monkeypatch.setattr(store, name, counted)


@pytest.mark.parametrize("threads", [1, 2])
def test_new_keys_of_a_table_found_empty_need_no_check(
    tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From an empty table, inserts of never-seen keys ask RocksDB nothing (the filter of
    written keys proves them new) and counts stay exact; once the store forgets, or
    reopens a non-empty DB, unknown keys are checked again, still exactly."""
    rng = np.random.default_rng(11)
    cfg = _cfg(tmp_path, num_threads=threads, known_keys=4096)  # the states forget
    tier = SSDTier.open(cfg, row_width=W)
    gets = _CountingGets(tier.store, monkeypatch)
    ref = DictTier()
    universe = rng.integers(-(2**63), 2**63 - 1, 9000, dtype=np.int64)
    for step in range(6):
        keys = torch.from_numpy(rng.choice(universe, 5000 if step == 2 else 700, replace=False))
        rows = _random_rows(rng, keys.numel())
        tier.insert(keys, rows)
        ref.insert(keys, rows)
        assert len(tier) == len(ref.rows)
    # Keys held but unknown to the states may be in the filter: only those are checked.
    assert gets.asked < len(ref.rows)
    fresh = torch.from_numpy(np.setdiff1d(rng.integers(-(2**62), 2**62, 3000), universe))
    asked = gets.asked
    tier.insert(fresh, _random_rows(rng, fresh.numel()))
    assert gets.asked - asked < 0.05 * fresh.numel()  # false positives of the filter only
    assert len(tier) == len(ref.rows) + fresh.numel()
    assert tier.contains(fresh).all() and tier.delete(fresh) == fresh.numel()
    assert len(tier) == len(ref.rows)

    tier.store.forget_key_states()  # as after a restart: every unknown key is checked
    asked = gets.asked
    again = torch.from_numpy(universe[:1000])
    tier.insert(again, _random_rows(rng, 1000))
    ref.insert(again, torch.zeros(1000, W))
    assert gets.asked - asked == 1000 and len(tier) == len(ref.rows)
    tier.close()

    reopened = SSDTier.open(cfg, row_width=W)
    gets = _CountingGets(reopened.store, monkeypatch)
    more = torch.from_numpy(universe[:2000])
    reopened.insert(more, _random_rows(rng, 2000))
    ref.insert(more, torch.zeros(2000, W))
    assert gets.asked == 2000 and len(reopened) == len(ref.rows)
    reopened.close()


def test_closed_store_and_bad_inputs(tmp_path: Path) -> None:
    tier = SSDTier.open(_cfg(tmp_path), row_width=W)
    with pytest.raises(ValueError, match="rows must be"):
        tier.insert(torch.tensor([1]), torch.ones(1, W + 1))
    with pytest.raises(ValueError, match="int64"):
        tier.find(torch.tensor([1], dtype=torch.int32), torch.zeros(1, W))
    tier.close()
    tier.close()  # idempotent
    with pytest.raises(SSDTierError, match="closed"):
        tier.find(torch.tensor([1]), torch.zeros(1, W))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("path", "", "path"),
        ("num_threads", 0, "num_threads"),
        ("max_write_buffers", 1, "max_write_buffers"),
        ("compression", "brotli", "one of"),
    ],
)
def test_config_validation(field: str, value: object, match: str) -> None:
    kw = {"path": "/tmp/x", field: value}
    with pytest.raises(ValueError, match=match):
        SSDTierConfig(**kw)


def test_config_parses_compression() -> None:
    assert SSDTierConfig(path="/x", compression="LZ4").compression.value == "lz4"


def test_restore_replaces_the_db_and_leaves_the_snapshot_as_it_was(tmp_path: Path) -> None:
    """``SSDStore.restore``: the DB becomes the checkpoint (SST files hard-linked); writes
    and compactions after it never reach the checkpoint, which opens read-only."""
    store = SSDStore(tmp_path / "db", _cfg(tmp_path / "db"))
    tier = SSDTier(store, W, table_id=2)
    keys = torch.arange(5000, dtype=torch.int64)
    tier.insert(keys, torch.ones(5000, W))
    store.checkpoint(tmp_path / "snap")
    tier.insert(keys[:10], torch.full((10, W), 2.0))  # after the snapshot: not in it
    tier.evict(keys[4000:])
    store.restore(tmp_path / "snap")
    assert len(tier) == 5000
    rows, found = tier.read(keys)
    assert bool(found.all()) and bool((rows == 1).all())
    linked = [f for f in (tmp_path / "db").iterdir() if f.suffix == ".sst"]
    assert linked and all(f.stat().st_nlink >= 2 for f in linked)  # hard links
    tier.insert(keys, torch.full((5000, W), 3.0))
    store.compact()
    store.close()
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "snap").iterdir()}
    snap = SSDStore(tmp_path / "snap", read_only=True)
    # rocksdict rewrites its config file at every open: a reader opens a view of its own,
    # so the checkpoint's files stay as they are for other readers and checks
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "snap").iterdir()
            if f.is_file()} == before
    rows, found = SSDTier(snap, W, table_id=2).read(keys)
    assert bool(found.all()) and bool((rows == 1).all())
    with pytest.raises(SSDTierError):
        SSDTier(snap, W, table_id=2).insert(keys[:1], torch.zeros(1, W))
    snap.close()
    assert sorted(f.name for f in (tmp_path / "snap").iterdir()) == sorted(before)
    with pytest.raises(SSDTierError, match="no CURRENT"):
        SSDStore(tmp_path / "nothing-here", read_only=True)


def test_reset_empties_every_table_and_keeps_them_registered(tmp_path: Path) -> None:
    """``SSDStore.reset`` (a resharded resume): no rows, exact counts of 0, the tables'
    widths still checked and their rows' metadata still kept; new rows go in as new."""
    store = SSDStore(tmp_path / "db", _cfg(tmp_path / "db"))
    a, b = SSDTier(store, W, table_id=0), SSDTier(store, 2 * W, table_id=5)
    keys = torch.arange(3000, dtype=torch.int64)
    a.insert(keys, torch.ones(3000, W))
    b.insert(keys[:7], torch.ones(7, 2 * W))
    store.reset()
    assert len(a) == len(b) == 0 and not bool(a.contains(keys).any())
    assert a.insert(keys[:4], torch.full((4, W), 2.0)).keys.numel() == 0
    assert len(a) == 4 and bool((a.read(keys[:4])[0] == 2).all())
    with pytest.raises(SSDTierError, match="width"):
        SSDTier(store, W + 1, table_id=5)
    store.close()
    again = SSDStore(tmp_path / "db", _cfg(tmp_path / "db"))
    assert SSDTier(again, W, table_id=0).has_meta and len(SSDTier(again, W, table_id=0)) == 4
    again.close()

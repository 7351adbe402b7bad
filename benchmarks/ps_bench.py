"""Parameter-server tier micro-benchmarks, each against a baseline run in the same process.

``--ssd``: the SSD tier (``terarec.ps.tiers.ssd.SSDTier`` on RocksDB via rocksdict) vs a
per-key rocksdict loop (``db[key] = value`` / ``db[key]``) on a DB with the *same* tuned
options, ``--batch`` rows per tier call, every row with its metadata (last step,
frequency) as the tier chain sends it, in five phases:

* insert_unseen: fresh keys the tier never saw: ``insert`` must check which are new
  (a multi-get before the ``WriteBatch``; the keys are absent, so bloom filters answer).
* insert_missed: fresh keys whose lookup just missed (a first touch in training: find,
  miss, create, insert); the tier remembers the miss, so no check. Lookups untimed.
* overwrite: every key again, shuffled, new rows (write-back of rows the tier holds and
  remembers: no check).
* overwrite_cold: the same after the tier forgot what it knew of its keys (as after a
  restart, or keys beyond ``known_keys``): the check reads the held rows.
* read: every key once, shuffled, after both DBs were flushed and compacted: ``find``
  into float32 ``[batch, row_width]`` rows and int64 ``[batch, 2]`` metadata vs
  ``db[key]`` per key, then one ``join`` and ``frombuffer`` per batch. The block caches
  start cold (compaction output is not cached), as for rows long gone from the tiers
  above.
* read_warm: the same again in another order, the block caches now warm.

The target (0.5 M rows/s) applies to reads and to the write-backs of training
(insert_missed, overwrite); the two checked phases are reported beside them. The
baseline is favoured: its key and value bytes (the same bytes the tier stores: row, then
metadata) are encoded *before* timing and it keeps no row count, while the tier's time
includes encoding, packing, the existence check and the count. Both sides run in lockstep
(batch ``i`` of each back to back, alternating which goes first) on fresh DBs per repeat,
so load from other processes on a shared machine hits both alike; figures are medians
over the repeats, ratios medians of same-repeat ratios. Rows and metadata are verified
bit-identical after the timed reads. DBs live in a temporary directory (``--dir``,
default under /tmp) removed at the end.

    python benchmarks/ps_bench.py --ssd [--rows 200000] [--batch 16384] [--row-width 192]
                                        [--repeats 3] [--threads 2] [--json]

``--host``: the host tier's index, ``terarec.ps.index.hash_index.HashIndex.find_or_insert``,
on ``--threads`` torch threads, in lockstep with baselines fed the same calls. Each call
gets ``--host-keys`` unique keys, shuffled: ``--new-frac`` of them never seen (they get
slots), the rest drawn from the keys already held (one run per value given). The table
starts with ``--host-start`` keys (untimed prefill) and takes ``--host-calls`` timed calls
per repeat; it is pre-sized for them (no rehash while timing). Sides:

* fbgemm: the CPU default (FBGEMM's hash-map kernels, lookups split over the threads);
* fbgemm_full: the same with its buckets filled (by keys never asked for) to load 0.5 at
  the last call: a table about to double, the slow end of a growth cycle;
* fbgemm_1thread: the same on one torch thread (the split's gain);
* torch: the torch-op backend (the reference, and the CUDA fallback);
* sorted: a sorted key array with its slot ids, probed by ``torch.searchsorted``; new keys
  are sorted and merged in (O(rows) per call, no full re-sort);
* dict: a Python dict probed (and filled) one key at a time, on the first
  ``1/--dict-sample`` of each call's keys (their ``tolist()`` untimed); the rest of the
  new keys are added untimed, so the dict holds every key too.

The order rotates every call; figures are medians over ``--repeats``. Every side's
inserted count is checked against the new keys, and the indexes' slots against
``keys()``. Growth is reported apart: one rehash into twice the buckets is timed at the
end, and amortized over a table that doubles (~2 re-inserts per new key). Then
``--host-profile`` more calls profile the fbgemm backend step by step (the split lookup,
bookkeeping in torch, the insert of the new keys), beside whole calls, and time the
lookup of present keys on 1 thread and split. The target is 20 M keys/s.

``--cache``: ``terarec.ps.tiers.cache.CacheTier`` (LRU, ``--cache-capacity`` rows of
``--cache-row-width`` floats) making batches resident as the tier chain does (lookup;
hits touched and locked for the step; misses admitted with their rows, evicting), vs an
exact LRU in a Python ``OrderedDict`` with the rows moved by numpy. Each call draws
``--keys`` ids (deduplicated) from a Zipf(``--zipf``) popularity over
``--cache-universe`` ids; timing starts once the cache is full (so every call evicts) and
runs for ``--cache-keys-timed`` keys per repeat. Hit rates of both are reported (they
differ slightly: the tier's LRU is per step, the dict's per key).

    python benchmarks/ps_bench.py --host [--host-keys 262144] [--new-frac 0.05 0.1 0.2]
        [--host-start 5000000] [--host-calls 24] [--dict-sample 16] [--host-profile 20]
    python benchmarks/ps_bench.py --cache [--keys 131072] [--cache-capacity 1000000]
        [--cache-row-width 32] [--cache-universe 20000000] [--zipf 1.05]

``--json`` prints one object with a key per section run (all sections when none is named).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rocksdict
import torch

from terarec.ps.index.hash_index import HashIndex
from terarec.ps.tiers.cache import CacheTier
from terarec.ps.tiers.protocol import META_WIDTH
from terarec.ps.tiers.ssd import (
    SSDStore,
    SSDTier,
    SSDTierConfig,
    encode_keys,
    pack_rows,
)
from terarec.ps.tiers.ssd_format import rocksdb_options

_PHASES = ("insert_unseen", "insert_missed", "overwrite", "overwrite_cold", "read", "read_warm")


def _lockstep(i: int, ours: Callable[[], None], base: Callable[[], None]) -> tuple[float, float]:
    """Runs both sides of step ``i`` back to back (alternating order); their seconds."""
    t = [0.0, 0.0]
    order = ((0, ours), (1, base)) if i % 2 == 0 else ((1, base), (0, ours))
    for side, fn in order:
        t0 = time.perf_counter()
        fn()
        t[side] = time.perf_counter() - t0
    return t[0], t[1]


def _ssd_repeat(root: Path, args: argparse.Namespace, seed: int) -> dict[str, list[float]]:
    """One repeat on fresh DBs: ``{phase: [tier seconds, per-key seconds, rows]}``."""
    rng = np.random.default_rng(seed)
    b, w = args.batch, args.row_width
    keys = np.unique(rng.integers(-(2**62), 2**62, args.rows, dtype=np.int64))
    keys = keys[rng.permutation(keys.size)]  # distinct, shuffled
    n, half = keys.size, keys.size // 2
    rows = [rng.standard_normal((n, w), dtype=np.float32) for _ in range(3)]
    # Row metadata (last step, frequency) goes with every row, as the tier chain sends it.
    meta = torch.from_numpy(rng.integers(0, 1 << 20, (n, META_WIDTH), dtype=np.int64))

    cfg = SSDTierConfig(path=str(root), num_threads=args.threads)
    tier = SSDTier(SSDStore(root / "tier", cfg), row_width=w)
    opts, _cache = rocksdb_options(cfg)
    base = rocksdict.Rdict(str(root / "per_key"), opts)
    wopts = rocksdict.WriteOptions()
    wopts.disable_wal = True
    base.set_write_options(wopts)

    # Warm-up (untimed): the first calls import fbgemm (the tier's key-state hash set);
    # a scratch table keeps the timed table's count exact.
    scratch = SSDTier(tier.store, row_width=w, table_id=1)
    scratch.insert(torch.tensor([1, 2]), torch.zeros(2, w))
    scratch.find(torch.tensor([1, 3]), torch.zeros(2, w))
    base[b"warm-up"] = b"x"
    base.get([b"warm-up"])

    # Baseline inputs prepared untimed (favours the baseline): the same value bytes as
    # the tier stores (the row, then its metadata).
    base_keys = encode_keys(0, keys)
    meta_f4 = meta.numpy().view(np.float32)
    base_rows = [pack_rows(np.concatenate([r, meta_f4], axis=1)) for r in rows]
    secs: dict[str, list[float]] = {}

    def put_all(kl: list[bytes], vl: list[bytes]) -> None:
        for k, v in zip(kl, vl):
            base[k] = v

    def write_phase(name: str, idx: np.ndarray, r: int, look_first: bool = False) -> None:
        t = secs.setdefault(name, [0.0, 0.0, float(idx.size)])
        for i, s in enumerate(range(0, idx.size, b)):
            j = idx[s : s + b]
            kt, rt = torch.from_numpy(keys[j]), torch.from_numpy(rows[r][j])
            if look_first:  # first touch: the lookup that missed precedes the insert
                tier.find(kt, torch.empty(j.size, w))
            ours = partial(tier.insert, kt, rt, meta[j])
            per_key = partial(put_all, [base_keys[x] for x in j], [base_rows[r][x] for x in j])
            a, c = _lockstep(i, ours, per_key)
            t[0] += a
            t[1] += c

    write_phase("insert_unseen", np.arange(half), 0)
    write_phase("insert_missed", np.arange(half, n), 0, look_first=True)
    write_phase("overwrite", rng.permutation(n), 1)
    tier.store.forget_key_states()
    write_phase("overwrite_cold", rng.permutation(n), 2)
    assert len(tier) == n, (len(tier), n)

    # Settle both LSM trees the same way before reading (untimed).
    tier.flush()
    tier.store.compact()
    base.flush()
    base.compact_range(None, None)

    order = rng.permutation(n)
    got = torch.zeros(n, w)
    got_meta = torch.zeros(n, META_WIDTH, dtype=torch.int64)
    got_base = np.zeros((n, w + 2 * META_WIDTH), np.float32)

    def find(kt: torch.Tensor, out: torch.Tensor, out_meta: torch.Tensor) -> None:
        if tier.find(kt, out, out_meta).numel():
            raise AssertionError("the tier missed keys it holds")

    def get_all(kl: list[bytes], out: np.ndarray) -> None:
        out[:] = np.frombuffer(b"".join([base[k] for k in kl]), "<f4").reshape(out.shape)

    for phase in ("read", "read_warm"):  # the second pass finds the block caches warm
        t = secs[phase] = [0.0, 0.0, float(n)]
        for i, s in enumerate(range(0, n, b)):
            j = order[s : s + b]
            e = s + j.size
            ours = partial(find, torch.from_numpy(keys[j]), got[s:e], got_meta[s:e])
            per_key = partial(get_all, [base_keys[x] for x in j], got_base[s:e])
            a, c = _lockstep(i, ours, per_key)
            t[0] += a
            t[1] += c
        want = rows[2][order].view(np.int32)
        if not (
            np.array_equal(got.numpy().view(np.int32), want)
            and np.array_equal(got_meta, meta[order])
            and np.array_equal(got_base[:, :w].view(np.int32), want)
        ):
            raise AssertionError("rows read back differ from the rows written")
        order = rng.permutation(n)
    tier.store.close()
    base.close()
    return secs


SSD_TARGET = 0.5e6  # rows/s, the tiers issue's target for batched SSD reads and writes
# The writes of training (rows evicted from the host tier): rows read from the SSD tier
# before, and new rows whose lookup just missed it. The other two phases insert keys the
# tier knows nothing of, so an exact row count needs an existence check first.
_SSD_TARGET_PHASES = ("insert_missed", "overwrite", "read", "read_warm")


def bench_ssd(args: argparse.Namespace) -> dict[str, Any]:
    parent = Path(args.dir) if args.dir else None
    tmp = Path(tempfile.mkdtemp(prefix="terarec_ssd_bench_", dir=parent))
    load = os.getloadavg()[0]
    try:
        reps = []
        for r in range(args.repeats):
            root = tmp / f"rep{r}"
            reps.append(_ssd_repeat(root, args, seed=r))
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res: dict[str, Any] = {
        "rows": args.rows,
        "value_bytes": 4 * args.row_width + 8 * META_WIDTH,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "target_rows_per_s": SSD_TARGET,
        "load_avg_1min": [load, os.getloadavg()[0]],
    }
    for p in _PHASES:  # medians over the repeats (rates and same-repeat ratios)
        res[p] = {
            "batched_rows_per_s": float(np.median([r[p][2] / r[p][0] for r in reps])),
            "per_key_rows_per_s": float(np.median([r[p][2] / r[p][1] for r in reps])),
            "ratio": float(np.median([r[p][1] / r[p][0] for r in reps])),
        }
        if p in _SSD_TARGET_PHASES:
            res[p]["vs_target"] = res[p]["batched_rows_per_s"] / SSD_TARGET
    return res


def _print_ssd(res: dict[str, Any]) -> None:
    la = res["load_avg_1min"]
    print(
        f"SSD tier: {res['rows']:,} rows, values of {res['value_bytes']} B (row + metadata), "
        f"batch {res['batch']:,}, {res['threads']} thread(s), median of {res['repeats']} "
        f"repeat(s); load average {la[0]:.2f} -> {la[1]:.2f}"
    )
    print(f"{'phase':<15} {'batched rows/s':>15} {'per-key rows/s':>15} {'ratio':>8} {'target':>8}")
    for p in _PHASES:
        r = res[p]
        tgt = f"{r['vs_target']:>7.2f}x" if "vs_target" in r else f"{'-':>8}"
        print(
            f"{p:<15} {r['batched_rows_per_s']:>15,.0f} {r['per_key_rows_per_s']:>15,.0f} "
            f"{r['ratio']:>7.2f}x {tgt}"
        )
    print(
        f"target {SSD_TARGET:,.0f} rows/s on the write-backs of training (insert_missed, "
        "overwrite) and on reads; insert_unseen / overwrite_cold pay an existence check"
    )


# -- host tier: HashIndex find-or-insert ----------------------------------------------
HOST_TARGET = 20e6  # keys/s, the tiers issue's target for the host tier's index
_HOST_SIDES = ("fbgemm", "fbgemm_full", "fbgemm_1thread", "torch", "sorted", "dict")
_PROFILE_STAGES = ("lookup", "bookkeeping", "insert")
_PROFILE_FIELDS = (
    *(s + "_s" for s in _PROFILE_STAGES),
    *("whole_s", "whole_keys", "hits_1_thread_s", "hits_split_s", "keys", "new_keys"),
)


def _rotate(i: int, fns: list[Callable[[], Any]]) -> tuple[list[float], list[Any]]:
    """Runs every side of step ``i`` back to back, starting with side ``i mod n`` (so
    load from other processes hits all sides alike); their seconds and results."""
    t: list[float] = [0.0] * len(fns)
    out: list[Any] = [None] * len(fns)
    for j in range(len(fns)):
        side = (i + j) % len(fns)
        t0 = time.perf_counter()
        out[side] = fns[side]()
        t[side] = time.perf_counter() - t0
    return t, out


class _SortedIndex:
    """Baseline: a sorted key array with slot ids, probed by ``searchsorted``; new keys
    are sorted and merged in (positions from a second ``searchsorted``: O(n) per call,
    no full re-sort)."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys, order = torch.sort(keys)
        self.slots = order
        self.n = keys.numel()

    def find_or_insert(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.searchsorted(self.keys, keys).clamp_(max=self.keys.numel() - 1)
        hit = self.keys[pos] == keys
        slots = torch.where(hit, self.slots[pos], -1)
        miss = (~hit).nonzero().squeeze(1)
        if miss.numel():
            ids = torch.arange(self.n, self.n + miss.numel())
            slots[miss] = ids
            new_keys, order = torch.sort(keys[miss])
            at = torch.searchsorted(self.keys, new_keys) + torch.arange(new_keys.numel())
            keep = torch.ones(self.keys.numel() + new_keys.numel(), dtype=torch.bool)
            keep[at] = False
            merged_k = torch.empty(keep.numel(), dtype=torch.int64)
            merged_s = torch.empty(keep.numel(), dtype=torch.int64)
            merged_k[at], merged_s[at] = new_keys, ids[order]
            merged_k[keep], merged_s[keep] = self.keys, self.slots
            self.keys, self.slots = merged_k, merged_s
            self.n += miss.numel()
        return slots, ~hit


def _dict_find_or_insert(d: dict[int, int], keys: list[int]) -> list[int]:
    """Baseline: one dict probe (and insert) per key in Python."""
    out = []
    n = len(d)
    for k in keys:
        s = d.get(k)
        if s is None:
            s = d[k] = n
            n += 1
        out.append(s)
    return out


def _one_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` with torch limited to one thread (the index's lookup is not split)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _host_batch(
    rng: np.random.Generator, pool: np.ndarray, n: int, size: int, new_frac: float
) -> tuple[np.ndarray, np.ndarray]:
    """``size`` unique keys, ``new_frac`` of them never seen, the rest drawn from
    ``pool[:n]`` (a few fewer after dedup); shuffled. Returns ``(keys, new)``."""
    m_new = int(size * new_frac)
    old = np.unique(pool[rng.integers(0, n, size - m_new)])
    new = np.unique(rng.integers(-(2**63), 2**63 - 1, m_new, dtype=np.int64))
    keys = np.concatenate([old, new])
    return keys[rng.permutation(keys.size)], new


def _host_repeat(args: argparse.Namespace, new_frac: float, seed: int) -> dict[str, Any]:
    """One repeat: ``{side: [seconds, keys]}``, ``rehash: [seconds, keys]`` (one forced
    rehash of the fbgemm index at its final size) and ``profile``
    (:func:`_fbgemm_profile`)."""
    rng = np.random.default_rng(seed)
    # Room for every key the repeat creates (the timed calls, then the profile's).
    new_per_call = int(args.host_keys * new_frac)
    calls = args.host_calls + args.host_profile + 1
    pool = np.empty(args.host_start + calls * new_per_call, np.int64)
    init = np.unique(rng.integers(-(2**63), 2**63 - 1, args.host_start, dtype=np.int64))
    n = init.size
    pool[:n] = init
    t_init = torch.from_numpy(init)
    # Pre-sized for every key the repeat creates: no rehash while timing (reported apart;
    # an index grows when its keys plus a whole call's would pass max_load = 0.5).
    cap = 2 * (pool.size + args.host_keys)
    indexes = {
        "fbgemm": HashIndex(capacity=cap, backend="fbgemm"),
        "fbgemm_full": HashIndex(capacity=cap, backend="fbgemm"),
        "fbgemm_1thread": HashIndex(capacity=cap, backend="fbgemm"),
        "torch": HashIndex(capacity=cap, backend="torch"),
    }
    for idx in indexes.values():  # untimed prefill
        idx.find_or_insert(t_init)
    # fbgemm_full: the same buckets filled to the end of a growth cycle (load 0.5 at the
    # last call: max_load, where a growing table doubles) by keys never asked for.
    full = indexes["fbgemm_full"]
    filler = int(full.max_load * full.capacity) - n - args.host_calls * new_per_call
    full.max_load = 0.9  # (no rehash: keep its load)
    full.find_or_insert(torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, max(filler, 0))))
    srt = _SortedIndex(t_init)
    d = dict(zip(init.tolist(), range(n)))
    acc: dict[str, Any] = {s: [0.0, 0.0] for s in _HOST_SIDES}
    fb = indexes["fbgemm"]
    load = [len(fb) / fb.capacity]  # buckets in use: longer probe chains as it rises
    for i in range(args.host_calls):
        keys, new = _host_batch(rng, pool, n, args.host_keys, new_frac)
        kt = torch.from_numpy(keys)
        sub = keys[: max(1, keys.size // args.dict_sample)].tolist()  # untimed
        fns = [
            partial(indexes["fbgemm"].find_or_insert, kt),
            partial(full.find_or_insert, kt),
            partial(_one_thread, partial(indexes["fbgemm_1thread"].find_or_insert, kt)),
            partial(indexes["torch"].find_or_insert, kt),
            partial(srt.find_or_insert, kt),
            partial(_dict_find_or_insert, d, sub),
        ]
        secs, outs = _rotate(i, fns)
        got = dict(zip(_HOST_SIDES, outs))
        for side, s in zip(_HOST_SIDES, secs):
            acc[side][0] += s
            acc[side][1] += len(sub) if side == "dict" else keys.size
        # Untimed checks: every side inserted exactly the new keys, slots map back.
        for side in ("fbgemm", "fbgemm_full", "fbgemm_1thread", "torch", "sorted"):
            slots, inserted = got[side]
            if int(inserted.sum()) != new.size:
                raise AssertionError(f"{side}: {int(inserted.sum())} inserted, {new.size} new")
            if side != "sorted" and not torch.equal(indexes[side].keys()[slots], kt):
                raise AssertionError(f"{side}: slots do not map back to their keys")
        missing = [k for k in new.tolist() if k not in d]  # the dict saw only `sub`
        d.update(zip(missing, range(len(d), len(d) + len(missing))))
        pool[n : n + new.size] = new
        n += new.size
    acc["table_load"] = load + [len(fb) / fb.capacity, len(full) / full.capacity]
    if args.host_profile:
        acc["profile"] = _fbgemm_profile(fb, rng, pool, n, new_frac, args)
    t0 = time.perf_counter()
    fb._grow(int(fb.max_load * fb.capacity) + 1)  # one rehash into twice the buckets
    acc["rehash"] = [time.perf_counter() - t0, float(len(fb))]
    return acc


def _fbgemm_profile(
    idx: HashIndex,
    rng: np.random.Generator,
    pool: np.ndarray,
    n: int,
    new_frac: float,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Where ``HashIndex.find_or_insert`` (fbgemm) spends its time: the steps of
    ``_fb_find_or_insert`` timed one by one on even batches, the whole call on odd ones,
    over ``host_profile`` batches (no rehash: the index is pre-sized). Then the batch,
    now all present, is looked up again on 1 thread and split over the torch threads.
    Uses HashIndex internals on purpose; returns seconds and counts.
    """
    acc = dict.fromkeys(_PROFILE_FIELDS, 0.0)
    for j in range(args.host_profile):
        keys, new = _host_batch(rng, pool, n, args.host_keys, new_frac)
        pool[n : n + new.size] = new
        n += new.size
        kt = torch.from_numpy(keys)
        if j % 2:
            t0 = time.perf_counter()
            idx.find_or_insert(kt)
            acc["whole_s"] += time.perf_counter() - t0
            acc["whole_keys"] += keys.size
            continue
        t0 = time.perf_counter()
        found, miss = idx._fb_lookup_split(kt, misses=True)
        miss = idx._fb_side(kt, found, miss)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        first = len(idx)
        ids = torch.arange(first, first + miss.numel(), dtype=torch.int64)
        found.index_copy_(0, miss, ids)
        inserted = torch.zeros(kt.numel(), dtype=torch.bool).index_fill_(0, miss, True)
        new_keys = kt.index_select(0, miss)
        idx._append_slot_keys(new_keys)
        t2 = time.perf_counter()
        idx._fb_insert(new_keys, ids)
        t3 = time.perf_counter()
        _one_thread(partial(idx._fb_find, kt))
        t4 = time.perf_counter()
        idx._fb_find(kt)
        t5 = time.perf_counter()
        if int(inserted.sum()) != new.size:
            raise AssertionError("profile: inserted count differs from the new keys")
        for name, s in zip(_PROFILE_STAGES, (t1 - t0, t2 - t1, t3 - t2)):
            acc[name + "_s"] += s
        acc["hits_1_thread_s"] += t4 - t3
        acc["hits_split_s"] += t5 - t4
        acc["keys"] += keys.size
        acc["new_keys"] += new.size
    return acc


def _host_mix(args: argparse.Namespace, new_frac: float) -> dict[str, Any]:
    """Every repeat of one mix; rates are medians over the repeats."""
    reps = [_host_repeat(args, new_frac, seed=r) for r in range(args.repeats)]

    def med(f: Callable[[dict[str, Any]], float]) -> float:
        return float(np.median([f(r) for r in reps]))

    def rate(side: str) -> Callable[[dict[str, Any]], float]:
        return lambda r: r[side][1] / r[side][0]

    res: dict[str, Any] = {"new_frac": new_frac, "table_load": reps[0]["table_load"]}
    for s in _HOST_SIDES:
        res[s] = {"keys_per_s": med(rate(s))}
    res["ratios"] = {  # medians of the per-repeat ratios
        f"fbgemm_vs_{s}": med(lambda r, s=s: rate("fbgemm")(r) / rate(s)(r))
        for s in _HOST_SIDES[1:]
    }
    res["ratios"]["fbgemm_vs_target"] = res["fbgemm"]["keys_per_s"] / HOST_TARGET
    # A table that grows by doubling rehashes its max_load * cap keys each time it has
    # gained max_load * cap / 2 new ones: ~2 re-inserts per new key, amortized.
    rehash_s_per_key = med(lambda r: r["rehash"][0] / r["rehash"][1])
    per_key_s = 1.0 / res["fbgemm"]["keys_per_s"]
    res["rehash"] = {
        "keys_per_s": 1.0 / rehash_s_per_key,
        "amortized_keys_per_s": 1.0 / (per_key_s + 2 * new_frac * rehash_s_per_key),
    }
    profs = [r["profile"] for r in reps if "profile" in r]
    if profs:
        p = {k: sum(x[k] for x in profs) for k in _PROFILE_FIELDS}
        stages = sum(p[s + "_s"] for s in _PROFILE_STAGES)
        res["fbgemm_profile"] = {
            "share": {s: p[s + "_s"] / stages for s in _PROFILE_STAGES},
            "lookup_keys_per_s": p["keys"] / p["lookup_s"],
            "insert_new_keys_per_s": p["new_keys"] / p["insert_s"],
            "whole_call_keys_per_s": p["whole_keys"] / p["whole_s"],
            "lookup_hits_1_thread_keys_per_s": p["keys"] / p["hits_1_thread_s"],
            "lookup_hits_split_keys_per_s": p["keys"] / p["hits_split_s"],
        }
    return res


def bench_host(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    mixes = [_host_mix(args, f) for f in args.new_frac]
    return {
        "threads": args.threads,
        "keys_per_call": args.host_keys,
        "rows_start": args.host_start,
        "calls_timed": args.host_calls,
        "dict_sample": f"1/{args.dict_sample}",
        "repeats": args.repeats,
        "target_keys_per_s": HOST_TARGET,
        "load_avg_1min": [load, os.getloadavg()[0]],
        "mixes": mixes,
    }


def _print_host(res: dict[str, Any]) -> None:
    print(
        f"host index find_or_insert: {res['keys_per_call']:,} unique keys per call into a "
        f"pre-sized table of {res['rows_start']:,} keys (+ the new ones), "
        f"{res['calls_timed']} calls per repeat, {res['threads']} thread(s), median of "
        f"{res['repeats']} repeat(s); dict on {res['dict_sample']} of each batch; load "
        f"average {res['load_avg_1min'][0]:.2f} -> {res['load_avg_1min'][1]:.2f}"
    )
    for m in res["mixes"]:
        lo, hi, full = m["table_load"]
        print(
            f"mix: {m['new_frac']:.0%} new keys, {1 - m['new_frac']:.0%} present; table load "
            f"{lo:.2f} -> {hi:.2f} of its buckets (fbgemm_full: -> {full:.2f})"
        )
        print(f"  {'side':<15} {'keys/s':>14} {'fbgemm ratio':>13}")
        for s in _HOST_SIDES:
            ratio = m["ratios"].get(f"fbgemm_vs_{s}")
            r = f"{ratio:>12.2f}x" if ratio else f"{'-':>13}"
            print(f"  {s:<15} {m[s]['keys_per_s']:>14,.0f} {r}")
        t = m["ratios"]["fbgemm_vs_target"]
        met = "met" if t >= 1 else "NOT met"
        print(f"  target {HOST_TARGET:,.0f} keys/s: {t:.2f}x ({met})")
        rh = m["rehash"]
        print(
            f"  growth: a rehash re-inserts {rh['keys_per_s']:,.0f} keys/s; amortized over "
            f"a table that doubles, find_or_insert {rh['amortized_keys_per_s']:,.0f} keys/s"
        )
        p = m.get("fbgemm_profile")
        if p:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in p["share"].items())
            print(f"  fbgemm find_or_insert time by step: {shares}")
            print(
                f"    whole call {p['whole_call_keys_per_s']:,.0f} keys/s; lookup "
                f"{p['lookup_keys_per_s']:,.0f}, insert {p['insert_new_keys_per_s']:,.0f} new "
                f"keys/s; lookup of present keys {p['lookup_hits_1_thread_keys_per_s']:,.0f} on "
                f"1 thread, {p['lookup_hits_split_keys_per_s']:,.0f} split over the threads"
            )


# -- cache tier: lookup + admit with evictions ----------------------------------------
def _lru_step(
    od: OrderedDict[int, int], keys: list[int], cap: int
) -> tuple[int, list[int], list[int]]:
    """Baseline: an exact LRU in an OrderedDict, one key at a time. Returns
    ``(hits, slots of the admitted keys, slots evicted to make room)``."""
    missed = []
    for k in keys:
        if k in od:
            od.move_to_end(k)
        else:
            missed.append(k)
    slots, evicted = [], []
    for k in missed:
        if len(od) >= cap:
            s = od.popitem(last=False)[1]
            evicted.append(s)
        else:
            s = len(od)
        od[k] = s
        slots.append(s)
    return len(keys) - len(missed), slots, evicted


def _zipf_sampler(
    rng: np.random.Generator, universe: int, alpha: float
) -> Callable[[int], np.ndarray]:
    """``draw(n)``: ``n`` int64 ids, the id of popularity rank ``r`` drawn ``∝ r^-alpha``."""
    cdf = np.cumsum(1.0 / np.arange(1, universe + 1) ** alpha)
    cdf /= cdf[-1]
    ids = rng.integers(-(2**63), 2**63 - 1, universe, dtype=np.int64)  # rank -> int64 id

    def draw(n: int) -> np.ndarray:
        return ids[np.minimum(np.searchsorted(cdf, rng.random(n)), universe - 1)]

    return draw


def _cache_tier_step(
    tier: CacheTier, keys: torch.Tensor, src: torch.Tensor, step: int
) -> tuple[int, int]:
    """A batch made resident as the tier chain does it: hits touched and locked for the
    step, misses admitted (evicting the least recently used unlocked rows). Returns
    ``(hits, evictions)``."""
    slots = tier.lookup(keys)
    hit = slots >= 0
    hs = slots[hit]
    tier.touch(hs, step)
    tier.lock(hs, step)
    miss = (~hit).nonzero().squeeze(1)
    _, evicted = tier.admit(keys[miss], src[: miss.numel()], step, lock_until=step)
    return int(hit.sum()), evicted.keys.numel()


def _lru_dict_step(
    od: OrderedDict[int, int], keys: list[int], cap: int, store: np.ndarray, src: np.ndarray
) -> int:
    """The baseline's batch: the LRU dict per key, then the rows moved with numpy."""
    hits, slots, evicted = _lru_step(od, keys, cap)
    _ = store[evicted]  # rows handed down, as the tier returns them
    store[slots] = src[: len(slots)]
    return hits


def _cache_repeat(args: argparse.Namespace, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    cap, w = args.cache_capacity, args.cache_row_width
    draw = _zipf_sampler(rng, args.cache_universe, args.zipf)
    tier = CacheTier(w, cap, policy="lru", name="host")
    od: OrderedDict[int, int] = OrderedDict()
    store = np.zeros((cap, w), np.float32)  # the baseline's row array
    src = torch.randn(args.keys, w)  # rows that would come from the tier below
    src_np = src.numpy()
    acc = dict.fromkeys(("tier_s", "base_s", "keys", "tier_hits", "base_hits", "evictions"), 0.0)
    step = 0
    while True:
        keys = np.unique(draw(args.keys))
        kt = torch.from_numpy(keys)
        kl = keys.tolist()  # untimed (favours the baseline)
        warm = len(tier) < cap  # fill untimed: time the steady state with evictions
        secs, out = _rotate(
            step,
            [
                partial(_cache_tier_step, tier, kt, src, step),
                partial(_lru_dict_step, od, kl, cap, store, src_np),
            ],
        )
        if not warm:
            acc["tier_s"] += secs[0]
            acc["base_s"] += secs[1]
            acc["keys"] += keys.size
            acc["tier_hits"] += out[0][0]
            acc["base_hits"] += out[1]
            acc["evictions"] += out[0][1]
            if acc["keys"] >= args.cache_keys_timed:
                return acc
        step += 1


def bench_cache(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    total: dict[str, float] = {}
    for r in range(args.repeats):
        for k, v in _cache_repeat(args, seed=r).items():
            total[k] = total.get(k, 0.0) + v
    keys = total["keys"]
    return {
        "threads": args.threads,
        "capacity": args.cache_capacity,
        "row_width": args.cache_row_width,
        "universe": args.cache_universe,
        "zipf": args.zipf,
        "keys_per_call": args.keys,
        "repeats": args.repeats,
        "tier_keys_per_s": keys / total["tier_s"],
        "lru_dict_keys_per_s": keys / total["base_s"],
        "ratio": total["base_s"] / total["tier_s"],
        "tier_hit_rate": total["tier_hits"] / keys,
        "lru_dict_hit_rate": total["base_hits"] / keys,
        "evictions_per_key": total["evictions"] / keys,
    }


def _print_cache(res: dict[str, Any]) -> None:
    print(
        f"cache tier lookup + admit (LRU): capacity {res['capacity']:,} rows x "
        f"{res['row_width']} floats, Zipf({res['zipf']}) over {res['universe']:,} ids, "
        f"~{res['keys_per_call']:,} draws per call, {res['threads']} thread(s), "
        f"{res['repeats']} repeat(s)"
    )
    print(f"{'side':<10} {'keys/s':>14} {'hit rate':>9}")
    print(f"{'CacheTier':<10} {res['tier_keys_per_s']:>14,.0f} {res['tier_hit_rate']:>9.1%}")
    print(f"{'LRU dict':<10} {res['lru_dict_keys_per_s']:>14,.0f} {res['lru_dict_hit_rate']:>9.1%}")
    print(f"ratio {res['ratio']:.2f}x; {res['evictions_per_key']:.2f} evictions per key")


SECTIONS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], Callable]] = {
    "ssd": (bench_ssd, _print_ssd),
    "host": (bench_host, _print_host),
    "cache": (bench_cache, _print_cache),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ssd", action="store_true", help="SSD tier vs per-key rocksdict")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=16_384)
    p.add_argument("--row-width", type=int, default=192, help="float32 per row (192: 768 B)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="SSDTierConfig.num_threads (--ssd); torch intra-op threads (--host, --cache)",
    )
    p.add_argument("--dir", default=None, help="parent of the temporary DB directory")
    p.add_argument("--host", action="store_true", help="HashIndex find_or_insert vs baselines")
    p.add_argument("--cache", action="store_true", help="CacheTier lookup + admit vs LRU dict")
    p.add_argument("--keys", type=int, default=131_072, help="keys per call (--cache)")
    p.add_argument("--host-keys", type=int, default=262_144, help="keys per call (--host)")
    p.add_argument(
        "--new-frac", type=float, nargs="+", default=[0.1], help="shares of new keys (--host)"
    )
    p.add_argument("--host-start", type=int, default=5_000_000, help="keys before timing")
    p.add_argument("--host-calls", type=int, default=24, help="timed calls per repeat")
    p.add_argument("--dict-sample", type=int, default=16, help="dict runs 1/N of each batch")
    p.add_argument("--host-profile", type=int, default=20, help="batches profiled (0: none)")
    p.add_argument("--cache-capacity", type=int, default=1_000_000)
    p.add_argument("--cache-row-width", type=int, default=32)
    p.add_argument("--cache-universe", type=int, default=20_000_000, help="distinct ids")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of id popularity")
    p.add_argument("--cache-keys-timed", type=int, default=2_000_000, help="per repeat")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    chosen = [s for s in SECTIONS if getattr(args, s)] or list(SECTIONS)
    results = {}
    for name in chosen:
        run, show = SECTIONS[name]
        results[name] = run(args)
        if not args.json:
            show(results[name])
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

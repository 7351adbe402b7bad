"""Parameter-server tier micro-benchmarks, each against a baseline run in the same process.

``--ssd``: the SSD tier (``terarec.ps.ssd_tier.SSDTier`` on RocksDB via rocksdict) vs a
per-key rocksdict loop (``db[key] = row_bytes`` / ``db[key]``) on a DB with the *same*
tuned options, ``--batch`` rows per tier call, in five phases:

* insert_unseen: fresh keys the tier never saw: ``insert`` must check which are new
  (a multi-get before the ``WriteBatch``; the keys are absent, so bloom filters answer).
* insert_missed: fresh keys whose lookup just missed (a first touch in training: find,
  miss, create, insert); the tier remembers the miss, so no check. Lookups untimed.
* overwrite: every key again, shuffled, new rows (write-back of rows the tier holds and
  remembers: no check).
* overwrite_cold: the same after the tier forgot what it knew of its keys (as after a
  restart, or keys beyond ``known_keys``): the check reads the held rows.
* read: every key once, shuffled, after both DBs were flushed and compacted: ``find``
  into a float32 ``[batch, row_width]`` tensor vs ``db[key]`` per key, then one ``join``
  and ``frombuffer`` per batch.

The baseline is favoured: its key and row bytes are encoded *before* timing and it keeps
no row count, while the tier's time includes encoding, packing, the existence check and
the count. Both sides run in lockstep (batch ``i`` of each back to back, alternating which
goes first) on fresh DBs per repeat, so load from other processes on a shared machine
hits both alike. Rows are verified bit-identical after the timed reads. DBs live in a
temporary directory (``--dir``, default under /tmp) removed at the end.

    python benchmarks/ps_bench.py --ssd [--rows 200000] [--batch 16384] [--row-width 192]
                                        [--repeats 3] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rocksdict
import torch

from terarec.ps.ssd_tier import (
    SSDStore,
    SSDTier,
    SSDTierConfig,
    encode_keys,
    pack_rows,
    rocksdb_options,
)

_PHASES = ("insert_unseen", "insert_missed", "overwrite", "overwrite_cold", "read")


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

    # Baseline inputs prepared untimed (favours the baseline).
    base_keys = encode_keys(0, keys)
    base_rows = [pack_rows(r) for r in rows]
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
            ours = partial(tier.insert, kt, rt)
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
    got_base = np.zeros((n, w), np.float32)

    def find(kt: torch.Tensor, out: torch.Tensor) -> None:
        if tier.find(kt, out).numel():
            raise AssertionError("the tier missed keys it holds")

    def get_all(kl: list[bytes], out: np.ndarray) -> None:
        out[:] = np.frombuffer(b"".join([base[k] for k in kl]), "<f4").reshape(-1, w)

    t = secs["read"] = [0.0, 0.0, float(n)]
    for i, s in enumerate(range(0, n, b)):
        j = order[s : s + b]
        ours = partial(find, torch.from_numpy(keys[j]), got[s : s + j.size])
        per_key = partial(get_all, [base_keys[x] for x in j], got_base[s : s + j.size])
        a, c = _lockstep(i, ours, per_key)
        t[0] += a
        t[1] += c

    want = rows[2][order].view(np.int32)
    if not (
        np.array_equal(got.numpy().view(np.int32), want)
        and np.array_equal(got_base.view(np.int32), want)
    ):
        raise AssertionError("rows read back differ from the rows written")
    tier.store.close()
    base.close()
    return secs


def bench_ssd(args: argparse.Namespace) -> dict[str, Any]:
    parent = Path(args.dir) if args.dir else None
    tmp = Path(tempfile.mkdtemp(prefix="terarec_ssd_bench_", dir=parent))
    try:
        total = {p: [0.0, 0.0, 0.0] for p in _PHASES}
        for r in range(args.repeats):
            root = tmp / f"rep{r}"
            got = _ssd_repeat(root, args, seed=r)
            for p in _PHASES:
                total[p] = [x + y for x, y in zip(total[p], got[p])]
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res: dict[str, Any] = {
        "rows": args.rows,
        "row_bytes": 4 * args.row_width,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    for p in _PHASES:
        ours_s, base_s, n = total[p]
        res[p] = {
            "batched_rows_per_s": n / ours_s,
            "per_key_rows_per_s": n / base_s,
            "ratio": base_s / ours_s,
        }
    return res


def _print_ssd(res: dict[str, Any]) -> None:
    print(
        f"SSD tier: {res['rows']:,} rows x {res['row_bytes']} B, batch {res['batch']:,}, "
        f"{res['threads']} thread(s), {res['repeats']} repeat(s)"
    )
    print(f"{'phase':<15} {'batched rows/s':>15} {'per-key rows/s':>15} {'ratio':>8}")
    for p in _PHASES:
        r = res[p]
        print(
            f"{p:<15} {r['batched_rows_per_s']:>15,.0f} {r['per_key_rows_per_s']:>15,.0f} "
            f"{r['ratio']:>7.2f}x"
        )


SECTIONS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], Callable]] = {
    "ssd": (bench_ssd, _print_ssd),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ssd", action="store_true", help="SSD tier vs per-key rocksdict")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=16_384)
    p.add_argument("--row-width", type=int, default=192, help="float32 per row (192: 768 B)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="SSDTierConfig.num_threads")
    p.add_argument("--dir", default=None, help="parent of the temporary DB directory")
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

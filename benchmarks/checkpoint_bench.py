"""Checkpoint of a table with an SSD tier: RocksDB snapshot vs exporting every row.

One tiered table (dim ``--dim``, row-wise Adagrad state, a ``--device-rows`` device tier
over a ``--host-rows`` host tier over the SSD tier) holding ``--rows`` rows, its caches
filled by ``--steps`` training steps, saved and restored two ways in one process:

* ``export`` (the baseline, every row through memory): flush, ``tables_state_dict()``
  with every row, ``torch.save`` to ``tables.pt``; restore = ``torch.load`` and write
  every row back into the SSD tier;
* ``snapshot``: a RocksDB checkpoint beside the DB (hard links), the rows the caches
  hold copied into ``ssd_cached.safetensors`` and a ``tables.pt`` without rows;
  restore = hard-link the snapshot into a fresh DB, write the cached copies into it and
  take the rows from there.
* ``snapshot-ahead``: the same, on a table whose SSD store was asked to flush its
  memtables (in RocksDB's background) before the last training step, as the training
  loop does one step before a full checkpoint.

For each: the save's wall time (the training pause: saves are synchronous), the restore's,
the bytes written (new files; hard links to existing SST files do not count) and the
peak resident memory the save added (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS`` before). Ratios are snapshot / export.

Then a **delta** after ``--changed`` (default 1%) of the rows changed, of the same SSD
table and of the same rows held in memory (an untiered table, whose full checkpoint is
the export): the changed rows read through the tiers and written to
``rows.safetensors``, against the bytes of the table's rows (keys + rows) and the time
of the full save of the same run; and the in-memory table's restore from the full
checkpoint alone and from the full checkpoint + the delta (the chain). The in-memory
table's full save is measured two ways: every row exported into ``tables.pt`` (the
baseline) and streamed into ``rows.<i>.safetensors`` chunks of ``--chunk-mb`` (what a
checkpoint does now).

    python benchmarks/checkpoint_bench.py [--rows 1000000] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.ssd import SSDStore, SSDTierConfig
from terarec.trainer.checkpoint import rows, ssd_snapshot
from terarec.trainer.checkpoint.delta import merge, read_changes


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measured(fn: Callable[[], Any]) -> tuple[float, int]:
    """``fn()``'s wall seconds and the peak resident memory it added (bytes)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back: reuse would hide growth
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, max(_status("VmHWM") - before, 0)


def new_bytes(root: Path, before: set[tuple[int, int]]) -> int:
    """Bytes of the files under ``root`` written since ``before`` (the ``(device,
    inode)`` pairs that existed then): a file and its hard links count once, links to
    files that existed not at all."""
    sizes = {}
    for f in root.rglob("*"):
        if f.is_file():
            st = f.stat()
            if (st.st_dev, st.st_ino) not in before:
                sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())


def inodes(root: Path) -> set[tuple[int, int]]:
    return {(f.stat().st_dev, f.stat().st_ino) for f in root.rglob("*") if f.is_file()}


def build(
    args: argparse.Namespace, db: Optional[Path]
) -> tuple[HierarchicalEmbeddingBagCollection, Optional[SSDStore]]:
    """The SSD-tiered table on a DB at ``db``; ``db=None``: the table in memory."""
    store = None if db is None else SSDStore(db, SSDTierConfig(path=str(db)))
    tiers = {} if db is None else {"device_rows": args.device_rows, "host_rows": args.host_rows}
    table = TableConfig(name="t", dim=args.dim, **tiers)
    ebc = HierarchicalEmbeddingBagCollection(
        [table], ["f"], SparseOptimConfig(kind="rowwise_adagrad", lr=0.01), seed=0,
        ssd_store=store)
    return ebc, store


def delta(ebc: HierarchicalEmbeddingBagCollection, args: argparse.Namespace, out: Path
          ) -> dict[str, Any]:
    """Changes ``--changed`` of the rows (steps over exactly those keys, each once), then
    writes a delta's rows file; its bytes against the table's row bytes."""
    keys, _ = ebc.tables[0].export() if ebc.ssd_store is None else (None, None)
    if keys is None:  # the SSD table: its keys from the store (untimed)
        keys = ebc.tables[0].group.export_table(0)[0]
    n = max(1, int(keys.numel() * args.changed))
    changed = keys[torch.randperm(keys.numel(), generator=torch.Generator().manual_seed(5))[:n]]
    ebc.track_changes(True)
    for batch in changed.split(args.batch):  # every changed key trained once
        kjt = KeyedJaggedTensor.from_lengths_sync(["f"], batch, torch.ones(batch.numel(),
                                                                          dtype=torch.int64))
        ebc(kjt).values().sum().backward()
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        state = ebc.changed_state()
        save_file({f"t/{k}": v.contiguous() for k, v in state["t"].items()},
                  out / "rows.safetensors")

    seconds, peak = measured(save)
    width = ebc.groups[0].row_width
    table_bytes = ebc.num_rows()["t"] * (8 + 4 * width)
    written = (out / "rows.safetensors").stat().st_size
    return {"changed_rows": n, "save_s": seconds, "save_peak_rss_bytes": peak,
            "bytes_written": written, "table_row_bytes": table_bytes,
            "bytes_vs_table": written / table_bytes}


def fill(ebc: HierarchicalEmbeddingBagCollection, args: argparse.Namespace,
         ahead: bool = False) -> None:
    """``--rows`` rows into the SSD tier (flushed to its SST files, as the rows of a run
    that has trained a while are), then ``--steps`` training steps over them; with
    ``ahead`` the SSD store starts flushing its memtables before the last step, as the
    training loop does one step before a full checkpoint."""
    group = ebc.groups[0]
    width = group.row_width
    keys = torch.randperm(args.rows * 4)[: args.rows].to(torch.int64) - args.rows
    rows = torch.randn(args.rows, width) * 0.01
    rows[:, args.dim:] = 0.0
    group.load_tables([(keys, rows)])
    if ebc.ssd_store is not None:  # as in a long run: older writes are in SST files
        ebc.ssd_store.flush()
    g = torch.Generator().manual_seed(0)
    for i in range(args.steps):
        if ahead and i == args.steps - 1 and ebc.ssd_store is not None:
            ebc.ssd_store.flush_soon()
        batch = keys[torch.randint(0, args.rows, (args.batch,), generator=g)]
        kjt = KeyedJaggedTensor.from_lengths_sync(["f"], batch, torch.ones(args.batch,
                                                                          dtype=torch.int64))
        ebc(kjt).values().sum().backward()


def one_way(way: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Save and restore the filled table the ``export`` or the ``snapshot`` way
    (``snapshot-ahead``: the memtables' flush started a step before the save)."""
    db = root / way / "rank0"
    ebc, store = build(args, db)
    fill(ebc, args, ahead=way == "snapshot-ahead")
    ck = root / way / "checkpoint"
    ck.mkdir(parents=True)
    before = inodes(db)
    rec: dict[str, Any] = {}

    def save() -> None:
        if way == "export":
            ebc.flush()
            torch.save(ebc.tables_state_dict(), ck / "tables.pt")
        else:
            rec["snap"], cached = ssd_snapshot.take(ebc, step=1)
            ssd_snapshot.write_cached(ck, cached)  # the caches' copies beside it
            torch.save(ebc.tables_state_dict(ssd_rows=False), ck / "tables.pt")

    seconds, peak = measured(save)
    written = new_bytes(root / way, before)  # the checkpoint, the snapshot, new SSTs
    ebc2, store2 = build(args, root / way / "restored")  # a fresh collection and DB

    def load() -> None:
        if way != "export":
            ssd_snapshot.restore(ebc2, rec["snap"])
            assert store2 is not None
            ssd_snapshot.apply_cached(store2, rec["snap"],
                                      ssd_snapshot.read_cached(ck / ssd_snapshot.CACHED))
        ebc2.load_tables_state_dict(torch.load(ck / "tables.pt", weights_only=True))

    restore_s, restore_peak = measured(load)
    assert ebc2.num_rows() == ebc.num_rows(), (ebc2.num_rows(), ebc.num_rows())
    result = {"save_s": seconds, "save_peak_rss_bytes": peak, "bytes_written": written,
              "restore_s": restore_s, "restore_peak_rss_bytes": restore_peak}
    if way == "snapshot":
        result["delta"] = delta(ebc, args, root / way / "delta")
    store.close()
    store2.close()
    shutil.rmtree(root / way, ignore_errors=True)
    return result


def in_memory(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The same rows in an untiered table: the full save (every row into ``tables.pt``)
    and a delta after ``--changed`` of them changed."""
    ebc, _ = build(args, None)
    fill(ebc, args)
    out = root / "memory"
    out.mkdir(parents=True)
    seconds, peak = measured(lambda: torch.save(ebc.tables_state_dict(), out / "tables.pt"))
    full = {"save_s": seconds, "save_peak_rss_bytes": peak,
            "bytes_written": (out / "tables.pt").stat().st_size}
    # the checkpoint's way: the rows streamed into chunk files as they are read
    stage = out / "chunks"
    stage.mkdir()
    chunk_mb = args.chunk_mb
    rows.CHUNK_BYTES = chunk_mb << 20
    seconds, peak = measured(lambda: rows.write_chunks(ebc, stage, ["t"]))
    full["streamed"] = {"save_s": seconds, "save_peak_rss_bytes": peak, "chunk_mb": chunk_mb,
                        "bytes_written": sum(f.stat().st_size for f in stage.iterdir())}
    shutil.rmtree(stage)
    result = {"full": full, "delta": delta(ebc, args, out / "delta")}

    def restore(with_delta: bool) -> None:
        state = torch.load(out / "tables.pt", weights_only=True)
        if with_delta:  # the chain: the full checkpoint, then the delta applied
            change = read_changes(out / "delta")["t"]
            t = state["t"]
            t["keys"], t["rows"] = merge(t["keys"], t["rows"], change)
        fresh, _ = build(args, None)
        fresh.load_tables_state_dict(state)

    result["full"]["restore_s"] = measured(lambda: restore(False))[0]
    result["delta"]["chain_restore_s"] = measured(lambda: restore(True))[0]
    shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--device-rows", type=int, default=65_536)
    p.add_argument("--host-rows", type=int, default=131_072)
    p.add_argument("--batch", type=int, default=32_768)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--changed", type=float, default=0.01, help="rows changed before a delta")
    p.add_argument("--chunk-mb", type=int, default=64,
                   help="chunk size of the in-memory table's streamed save")
    p.add_argument("--dir", default=None, help="where the DBs go (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    out: dict[str, Any] = {"rows": args.rows, "dim": args.dim,
                           "device_rows": args.device_rows, "host_rows": args.host_rows}
    try:
        for way in ("export", "snapshot", "snapshot-ahead"):
            out[way] = one_way(way, args, root)
        out["memory"] = in_memory(args, root)
        e, s, m = out["export"], out["snapshot"], out["memory"]
        out["ratios"] = {
            "save_s": s["save_s"] / e["save_s"],
            "save_s_flushed_ahead": out["snapshot-ahead"]["save_s"] / e["save_s"],
            "save_peak_rss": s["save_peak_rss_bytes"] / max(e["save_peak_rss_bytes"], 1),
            "bytes_written": s["bytes_written"] / max(e["bytes_written"], 1),
            "restore_s": s["restore_s"] / e["restore_s"],
            "ssd_delta_bytes_vs_table": s["delta"]["bytes_vs_table"],
            "memory_delta_bytes_vs_table": m["delta"]["bytes_vs_table"],
            "memory_delta_s_vs_full_save": m["delta"]["save_s"] / m["full"]["save_s"],
            "memory_chain_restore_vs_full_restore": (m["delta"]["chain_restore_s"]
                                                     / m["full"]["restore_s"]),
            "memory_streamed_save_peak_vs_tables_pt": (
                m["full"]["streamed"]["save_peak_rss_bytes"]
                / max(m["full"]["save_peak_rss_bytes"], 1)),
            "memory_streamed_save_s_vs_tables_pt": (m["full"]["streamed"]["save_s"]
                                                    / m["full"]["save_s"]),
        }
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(out))
    else:
        for way in ("export", "snapshot", "snapshot-ahead"):
            r = out[way]
            print(f"{way:9s} save {r['save_s']:.3f}s (peak +{r['save_peak_rss_bytes'] / 2**20:.0f}"
                  f" MiB, {r['bytes_written'] / 2**20:.1f} MiB written) | restore "
                  f"{r['restore_s']:.3f}s (peak +{r['restore_peak_rss_bytes'] / 2**20:.0f} MiB)")
        for name, d in (("ssd", out["snapshot"]["delta"]), ("memory", out["memory"]["delta"])):
            print(f"{name:6s} delta ({d['changed_rows']} rows changed): save "
                  f"{d['save_s']:.3f}s, {d['bytes_written'] / 2**20:.1f} MiB = "
                  f"{d['bytes_vs_table']:.4f} of the table's rows")
        mem = out["memory"]
        st = mem["full"]["streamed"]
        whole = mem["full"]
        print(f"memory full save streamed in {st['chunk_mb']} MiB chunks {st['save_s']:.3f}s "
              f"(peak +{st['save_peak_rss_bytes'] / 2**20:.0f} MiB) vs tables.pt "
              f"{whole['save_s']:.3f}s (peak +{whole['save_peak_rss_bytes'] / 2**20:.0f} MiB)")
        print(f"memory full save {mem['full']['save_s']:.3f}s, restore "
              f"{mem['full']['restore_s']:.3f}s; full + delta restore "
              f"{mem['delta']['chain_restore_s']:.3f}s")
        print("ratios:", {k: round(v, 4) for k, v in out["ratios"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

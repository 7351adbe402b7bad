"""Checkpoints of the SSD tier as RocksDB snapshots: no row passes through memory.

A checkpoint of a run whose tables keep rows in the SSD tier (tables with ``host_rows``)
does not export those rows. Each rank copies the rows its caches hold above the SSD tier
(``HierarchicalEmbeddingBagCollection.ssd_cached_rows``: host memory bounded by the
cache budgets; the checkpoint keeps them as ``ssd_cached.safetensors``) and takes a
RocksDB checkpoint of its store (the memtables flushed, SST files hard-linked, copied
only across file systems), so a save costs what the caches hold, not what the table
holds, and writes nothing through the tiers. A restore writes the cached copies into the
restored DB, in order: the state the caches written through would have left. The
snapshot lives beside the rank's DB::

    <ssd root>/rank<r>/                      the live DB
    <ssd root>/rank<r>.checkpoints/step<N>-<t>/   a snapshot (RocksDB checkpoint)

and the run's checkpoint directory holds ``ssd.json`` (per rank) pointing at it: its
absolute path, every file's size (and sha256 for the small non-SST files; RocksDB checks
its SST blocks itself when it reads them), and each table's id, row width and row count.
A resume copies the snapshot's small files and hard-links its SST files into a fresh DB
directory (``SSDStore.restore``); the snapshot itself is never opened for writing.
A rank keeps the snapshot its latest checkpoint points at and deletes older ones once a
newer checkpoint is in place.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.protocol import LAST
from terarec.ps.tiers.ssd import SSDStore, SSDTier
from terarec.trainer.checkpoint.files import CheckpointError, all_finite, sha256, verify_files

FILE = "ssd.json"
CACHED = "ssd_cached.safetensors"  # the caches' copies at the save (beside ssd.json)


class SnapshotError(RuntimeError):
    """A snapshot is missing or does not match its record (names the file)."""


class NonFiniteRows(ValueError):
    """A table's cached rows hold NaN/Inf: its snapshot would not be one to resume from."""


def snapshots_dir(store: SSDStore) -> Path:
    """Where a rank's snapshots live: ``<db>.checkpoints`` beside its DB."""
    return store.path.with_name(store.path.name + ".checkpoints")


Cached = dict[str, dict[str, torch.Tensor]]  # per table: keys [C], rows [C, W], meta [C, 2]


def take(embedding: HierarchicalEmbeddingBagCollection, step: int
         ) -> tuple[Optional[dict[str, Any]], Cached]:
    """Snapshots the rank's SSD store and copies what its caches hold above it; returns
    the record for ``ssd.json`` (None when no table keeps rows in the SSD tier) and the
    cached rows, which the checkpoint keeps beside it (:data:`CACHED`): the snapshot
    plus these, written into it in order, is the tables' state. Nothing is written
    through the tiers, so the pause is the memtables' flush and a copy of the caches.

    Raises:
        NonFiniteRows: a cached row (a recently trained one) holds NaN/Inf; no snapshot
            was taken.
    """
    store = embedding.ssd_store
    tables = [t for t in embedding.tables if t.in_ssd]
    if store is None or not tables:
        return None, {}
    cached = {name: dict(zip(("keys", "rows", "meta"), parts))
              for name, parts in embedding.ssd_cached_rows().items()}
    bad = [name for name, c in cached.items() if not all_finite(c["rows"])]
    if bad:
        raise NonFiniteRows(f"table {bad[0]!r} has NaN/Inf rows")
    dest = snapshots_dir(store) / f"step{step:012d}-{time.time_ns()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    store.checkpoint(dest)
    files = {}
    for f in sorted(dest.iterdir()):
        rec: dict[str, Any] = {"bytes": f.stat().st_size}
        if f.suffix != ".sst":
            rec["sha256"] = sha256(f)
        files[f.name] = rec
    index = {t.name: i for i, t in enumerate(embedding.tables)}
    record = {
        "dir": str(dest.resolve()),
        "files": files,
        "tables": {t.name: {"table_id": index[t.name], "row_width": t.row_width,
                            "rows": len(t)} for t in tables},
        "cached": CACHED,
    }
    return record, cached


def write_cached(out: Path, cached: Cached) -> str:
    """The cached rows of :func:`take` into ``out/ssd_cached.safetensors``:
    ``<table>/keys``, ``/rows``, ``/meta`` (``(last_step, freq)`` int64)."""
    from terarec.trainer.checkpoint.rows import write_safetensors

    write_safetensors(out / CACHED, {f"{name}/{field}": t for name, c in cached.items()
                                     for field, t in c.items()})
    return CACHED


def read_cached(path: Path) -> Cached:
    from terarec.trainer.checkpoint.rows import read_by_table

    return read_by_table(path)


def apply_cached(store: SSDStore, record: dict[str, Any], cached: Cached,
                 keep: Optional[Any] = None) -> None:
    """Writes the cached rows of a checkpoint into ``store`` (its tables' ids and widths
    from ``record``), in order: after restoring the snapshot, the store then holds what
    it would have held had the caches been written through at the save. ``keep(name,
    keys)`` (bool ``[C]``) picks the rows to write (a resharded resume: the owned
    ones)."""
    for name, c in cached.items():
        t = record["tables"][name]
        tier = SSDTier(store, t["row_width"], table_id=t["table_id"])
        keys, rows, meta = c["keys"], c["rows"], c["meta"]
        if keep is not None:
            mine = keep(name, keys)
            keys, rows, meta = keys[mine], rows[mine], meta[mine]
        if keys.numel():
            tier.insert(keys, rows, meta)


def drop(record: Optional[dict[str, Any]]) -> None:
    """Deletes a snapshot (a save that failed after taking it)."""
    if record is not None:
        shutil.rmtree(record["dir"], ignore_errors=True)


def used_by(path: Path, record: Optional[dict[str, Any]]) -> bool:
    """Whether the checkpoint at ``path`` (any rank's ``ssd.json`` in it) points at
    snapshot ``record``: a commit that landed before a failure that followed it."""
    if record is None:
        return False
    for f in (Path(path) / FILE, *Path(path).glob(f"rank*/{FILE}")):
        try:
            if load_record(f)["dir"] == record["dir"]:
                return True
        except (OSError, ValueError, KeyError):
            continue
    return False


def keep_only(record: Optional[dict[str, Any]], also: Sequence[dict[str, Any]] = ()) -> None:
    """Deletes the rank's snapshots other than ``record``'s (the latest checkpoint's)
    and those of ``also`` (the older checkpoints kept)."""
    if record is None:
        return
    latest = Path(record["dir"])
    keep = {latest, *(Path(r["dir"]) for r in also)}
    for other in latest.parent.iterdir():
        if other not in keep and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def verify(record: dict[str, Any]) -> Path:
    """The snapshot's directory, after checking that every file is there with its size
    (and hash, for the small files). Raises :class:`SnapshotError` naming the file."""
    root = Path(record["dir"])
    if not root.is_dir():
        raise SnapshotError(f"the SSD tier snapshot {root} is missing")
    for name, rec in record["files"].items():
        f = root / name
        if not f.is_file():
            raise SnapshotError(f"{f}: missing from the SSD tier snapshot")
        if f.stat().st_size != rec["bytes"]:
            raise SnapshotError(f"{f}: {f.stat().st_size} bytes, the checkpoint says "
                                f"{rec['bytes']}")
        if "sha256" in rec and sha256(f) != rec["sha256"]:
            raise SnapshotError(f"{f}: content does not match its sha256")
    return root


def open_read_only(record: dict[str, Any]) -> SSDStore:
    """The snapshot opened read-only after :func:`verify`; a missing or damaged file
    raises :class:`~terarec.trainer.checkpoint.files.CheckpointError` naming it."""
    try:
        return SSDStore(verify(record), read_only=True)
    except SnapshotError as e:
        raise CheckpointError(str(e)) from e


def restore(embedding: HierarchicalEmbeddingBagCollection, record: dict[str, Any]) -> None:
    """Replaces the rank's SSD store with the snapshot (the tables then load from it)."""
    if embedding.ssd_store is None:
        raise SnapshotError(
            f"the checkpoint keeps tables {sorted(record['tables'])} in an SSD tier "
            "snapshot, but this run has no SSD tier (ssd.path, host_rows)"
        )
    embedding.ssd_store.restore(verify(record))


def read_rows(record: dict[str, Any], fresh_from: Optional[dict[str, int]] = None,
              cached: Optional[Cached] = None) -> dict[str, dict[str, torch.Tensor]]:
    """Every row of the snapshot's tables, ``{name: {"keys": [R], "rows": [R, W]}}``
    (in memory: for tools, tests and small tables), with the checkpoint's ``cached``
    rows over them. Opens the snapshot read-only.

    Args:
        fresh_from: per table with TTL, the step from which a row counts as alive: a
            snapshot keeps the rows that expired since the last sweep (their metadata
            says so, and a restore treats them as expired); they are left out here.
    """
    store = SSDStore(verify(record), read_only=True)
    try:
        out = {}
        for name, t in record["tables"].items():
            tier = SSDTier(store, t["row_width"], table_id=t["table_id"])
            keys, rows, meta = tier.export(with_meta=True)
            if cached and name in cached:  # the caches' copies win: the last copy
                c = cached[name]
                keys, rows, meta = last_copies(torch.cat([keys, c["keys"]]),
                                                torch.cat([rows, c["rows"]]),
                                                torch.cat([meta, c["meta"]]))
            if fresh_from is not None and name in fresh_from:
                alive = meta[:, LAST] >= fresh_from[name]
                keys, rows = keys[alive], rows[alive]
            out[name] = {"keys": keys, "rows": rows}
        return out
    finally:
        store.close()


def last_copies(keys: torch.Tensor, rows: torch.Tensor, meta: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each key once, its last copy (keys ascending)."""
    uniq, inv = torch.unique(keys, return_inverse=True)
    last = torch.full((uniq.numel(),), -1, dtype=torch.int64).scatter_reduce(
        0, inv, torch.arange(keys.numel()), "amax")
    return keys[last], rows[last], meta[last]


def cached_in(path: Path, rank_dir: str, record: Optional[dict[str, Any]]
              ) -> Optional[Cached]:
    """The cached rows a checkpoint keeps beside its snapshot record (verified with
    the rank's files: ``files.rank_files``); None for a record without them (a
    checkpoint of an older terarec, whose save wrote the caches through)."""
    if record is None or not record.get("cached"):
        return None
    return read_cached(path / f"{rank_dir}{record['cached']}")


def load_record(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def record_in(path: Path, manifest: dict[str, Any], rank_dir: str
              ) -> Optional[dict[str, Any]]:
    """The snapshot record (``ssd.json``) of ``rank_dir`` in the checkpoint ``path``,
    verified against its manifest; None when the checkpoint has none there."""
    name = f"{rank_dir}{FILE}"
    if name not in manifest["files"]:
        return None
    verify_files(path, manifest, [name])
    return load_record(path / name)

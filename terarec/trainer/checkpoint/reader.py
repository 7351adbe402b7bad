"""Every trained row of a checkpoint, streamed in chunks: what an export reads.

:func:`stream_rows` yields ``(table, keys [C], weights [C, dim])`` chunks of the rows a
checkpoint holds: a full checkpoint's row files and SSD tier snapshots, with the copies
its caches held over the snapshot and the delta chain up to it applied, expired rows
(TTL) left out. Host memory holds one chunk, the cached copies of one rank and the
rows its deltas changed, never a table:

* rows a later layer replaced (a cached copy over the snapshot, a delta's changed or
  deleted keys) are dropped from the chunks as they stream by; the replacing rows come
  after the base's chunks of that rank;
* a multi-rank checkpoint is read from its first fast group, whose ranks hold every row
  once (sharded by key owner; the other fast groups hold replicas);
* only the weights leave: the optimizer state stored with a row is cut off.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from terarec.ps.tiers.protocol import LAST
from terarec.ps.tiers.ssd import SSDTier
from terarec.trainer.checkpoint import delta, rows, ssd_snapshot
from terarec.trainer.checkpoint.files import (
    rank_files,
    read_manifest,
    row_chunks,
    verify_files,
)

CHUNK_ROWS = 65536  # rows per chunk read from an SSD snapshot
Chunk = tuple[str, torch.Tensor, torch.Tensor]  # (table, keys [C], weights [C, dim])


def stream_rows(path: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[Chunk]:
    """The rows of checkpoint ``path`` (full or delta) as ``(table, keys, weights)``.

    Each key appears once over the whole stream. Files are verified against their
    manifests as they are read (:class:`CheckpointError` names a bad one).
    """
    path = Path(path)
    manifest = read_manifest(path, verify=False)
    links = delta.chain(path, manifest)
    base, base_m = links[0]
    dims = {t["name"]: int(t["dim"]) for t in base_m["config"]["tables"]}
    world = base_m.get("world")
    shards = [""] if not world else [f"rank{r}/" for r in world["fast_groups"][0]]
    for shard in shards:
        for p, m in links:
            verify_files(p, m, [f"{shard}{n}" for n in rank_files(m, shard)])
        changed = _delta_changes(links[1:], shard)
        record = ssd_snapshot.record_in(base, base_m, shard)
        cached = ssd_snapshot.cached_in(base, shard, record) or {}
        fresh = _fresh_from(base_m)
        # in-memory tables: the row files (format 4) or tables.pt (older formats)
        for name, keys, vals in _memory_rows(base, base_m, shard):
            yield from _kept(name, keys, vals[:, : dims[name]], changed.get(name))
        if record is not None:
            yield from _snapshot_rows(record, cached, changed, fresh, dims, chunk_rows)
        for name, (keys, vals, _) in changed.items():
            if keys.numel():
                yield name, keys, vals[:, : dims[name]].contiguous()


def _fresh_from(manifest: dict[str, Any]) -> dict[str, int]:
    """Per table with TTL: the first step a row must have been used at to be alive."""
    step = int(manifest["step"])
    return {t["name"]: step + 1 - int(t["ttl_steps"]) for t in manifest["config"]["tables"]
            if t.get("ttl_steps") is not None}


def _delta_changes(deltas: list[delta.Link], shard: str
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per table: the rows the deltas left (``keys``, ``rows``) and every key they
    touched (changed or deleted: the base's copy of those is stale)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for p, _ in deltas:
        for name, change in delta.read_changes(p, shard).items():
            keys, vals, gone = out.get(name, (torch.empty(0, dtype=torch.int64),
                                              torch.empty(0, change["rows"].shape[1]),
                                              torch.empty(0, dtype=torch.int64)))
            keys, vals = delta.merge(keys, vals, change)
            out[name] = (keys, vals, torch.cat([gone, change["keys"], change["deleted"]]))
    return out


def _kept(name: str, keys: torch.Tensor, vals: torch.Tensor,
          changed: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
          ) -> Iterator[Chunk]:
    """The chunk without the keys a delta replaced or deleted."""
    if changed is not None and changed[2].numel():
        keep = ~torch.isin(keys, changed[2])
        keys, vals = keys[keep], vals[keep]
    if keys.numel():
        yield name, keys, vals.contiguous()


def _memory_rows(base: Path, manifest: dict[str, Any], shard: str
                 ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """The in-memory tables' rows of one rank: chunk by chunk (format 4), or from
    ``tables.pt`` (formats 1-3)."""
    chunks = row_chunks(manifest, shard)
    if chunks:
        for name in chunks:
            for table, t in rows.read_by_table(base / shard / name).items():
                yield table, t["keys"], t["rows"]
        return
    states = torch.load(base / f"{shard}tables.pt", map_location="cpu", weights_only=True)
    for table, state in states.items():
        if "rows" in state and state["keys"].numel():
            yield table, state["keys"], state["rows"]


def _snapshot_rows(record: dict[str, Any], cached: dict[str, dict[str, torch.Tensor]],
                   changed: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   fresh: dict[str, int], dims: dict[str, int], chunk_rows: int
                   ) -> Iterator[Chunk]:
    """One rank's SSD snapshot, streamed read-only in key order, then its caches'
    copies (which replace the snapshot's rows of the same keys)."""
    saved = ssd_snapshot.open_read_only(record)
    try:
        for name, t in record["tables"].items():
            tier = SSDTier(saved, t["row_width"], table_id=t["table_id"])
            over = cached.get(name)
            for keys_np, vals_np in saved.scan(tier.table_id, tier.stored_width, chunk_rows):
                keys = torch.from_numpy(keys_np.copy())
                vals = torch.from_numpy(np.ascontiguousarray(vals_np))
                alive = torch.ones(keys.numel(), dtype=torch.bool)
                if tier.has_meta and name in fresh:
                    last = vals[:, t["row_width"]:].contiguous().view(torch.int64)[:, LAST]
                    alive &= last >= fresh[name]
                if over is not None:
                    alive &= ~torch.isin(keys, over["keys"])
                yield from _kept(name, keys[alive], vals[alive, : dims[name]],
                                 changed.get(name))
            if over is not None:
                keys, vals, meta = ssd_snapshot.last_copies(over["keys"], over["rows"],
                                                            over["meta"])
                if name in fresh:
                    alive = meta[:, LAST] >= fresh[name]
                    keys, vals = keys[alive], vals[alive]
                yield from _kept(name, keys, vals[:, : dims[name]], changed.get(name))
    finally:
        saved.close()

"""Resuming a checkpoint on another rank layout: saved by N ranks, resumed by M.

Rows are sharded by key owner within a fast group, so a checkpoint holds every row once
in the shards of its first fast group (the other fast groups hold replicas). A rank of
the new layout reads each of those shards in turn and keeps the rows it owns now
(:meth:`~terarec.ps.embedding.HierarchicalEmbeddingBagCollection.owned`):

* rows held in memory: one saved shard's rows at a time are loaded, filtered and kept;
* rows in an SSD tier snapshot: the rank empties its SSD store and streams each saved
  shard's snapshot (opened read-only, in chunks of rows with their last-use metadata)
  into it, the rows it owns only: host memory holds one chunk, never a table;
* a delta chain: each saved rank's deltas are applied to its shard as it is read (the
  rows it changed that this rank owns, its deletions);
* the optimizer counters and the table groups' clocks are rank 0's (every rank's
  agree); with admission the count-min sketches of the saved shards are summed (each
  counted the keys it owned), so each new rank's sketch holds every key's count;
* dense weights and the dense optimizer state are rank 0's (``dense.pt``). With k-step
  merging the replicas' dense optimizer states differ between merges, and checkpoints
  are taken at merges only; a new replica starts from rank 0's (its bf16 merge
  residual, a rounding carry, starts at zero);
* the data position: ``terarec.data.reshard`` (its rule depends on the source);
* the torch RNG state: the saved rank's of the same number, else rank 0's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from terarec.ps.tiers.ssd import SSDTier
from terarec.trainer.checkpoint import delta, rows, ssd_snapshot
from terarec.trainer.checkpoint.delta import Link
from terarec.trainer.checkpoint.files import CheckpointError, rank_files, verify_files

if TYPE_CHECKING:
    from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
    from terarec.trainer.components import Components

CHUNK_ROWS = 65536  # rows per chunk streamed from a saved SSD snapshot


def saved_ranks(manifest: dict[str, Any]) -> list[int]:
    world = manifest.get("world")
    return [0] if world is None else list(range(int(world["size"])))


def load_tables(links: list[Link], parts: Components) -> dict[str, Any]:
    """The table states this rank loads (``load_tables_state_dict``) from the chain
    ``links`` of a checkpoint saved by another rank layout; rows this rank owns in an
    SSD tier are written into its (emptied) SSD store here."""
    emb = parts.embedding
    base, base_m = links[0]
    world = base_m.get("world")
    shards = [""] if world is None else [f"rank{r}/" for r in world["fast_groups"][0]]
    ids = {t.name: i for i, t in enumerate(emb.tables)}
    widths = {t.name: t.row_width for t in emb.tables}
    if emb.ssd_store is not None and any(t.in_ssd for t in emb.tables):
        emb.ssd_store.reset()
    owned: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    states: list[dict[str, Any]] = []
    for shard in shards:
        for p, m in links:
            verify_files(p, m, [f"{shard}{n}" for n in rank_files(m, shard)])
        tables = rows.load_states(base, shard, base_m)
        record = ssd_snapshot.record_in(base, base_m, shard)
        if record is not None:
            _copy_owned(record, emb, ids)
            cached = ssd_snapshot.cached_in(base, shard, record)
            if cached is not None and emb.ssd_store is not None:  # its caches' copies
                ours = {"tables": {n: {"table_id": ids[n], "row_width": widths[n]}
                                   for n in cached}}
                ssd_snapshot.apply_cached(emb.ssd_store, ours, cached, keep=emb.owned)
        write = delta.ssd_writer(emb.ssd_store, ids, widths)
        tables = delta.apply(tables, links[1:], shard,
                             None if write is None else _owned_only(emb, write))
        for name, state in tables.items():
            if "rows" in state:
                mine = emb.owned(name, state["keys"])
                owned.setdefault(name, []).append((state.pop("keys")[mine],
                                                   state.pop("rows")[mine]))
        states.append(tables)
    out = states[0]
    for name, kept in owned.items():
        out[name]["keys"] = torch.cat([k for k, _ in kept])
        out[name]["rows"] = torch.cat([r for _, r in kept])
    for name, state in out.items():
        if "admission" in state:
            state["admission"] = _summed([s[name]["admission"] for s in states])
    return out


def _owned_only(emb: HierarchicalEmbeddingBagCollection, write: delta.SSDWriter
                ) -> delta.SSDWriter:
    """``write`` of a delta's changes, the changed rows this rank owns only (deleting a
    row it does not hold is a no-op)."""
    def owned_write(name: str, change: dict[str, torch.Tensor], step: int) -> None:
        mine = emb.owned(name, change["keys"])
        change = {k: (v[mine] if k in ("keys", "rows", "last") else v)
                  for k, v in change.items()}
        write(name, change, step)
    return owned_write


def _copy_owned(record: dict[str, Any], emb: HierarchicalEmbeddingBagCollection,
                ids: dict[str, int]) -> None:
    """Streams the rows of a saved SSD snapshot that this rank owns into its store
    (values as stored: the row, then its last-use metadata)."""
    store = emb.ssd_store
    if store is None:
        raise CheckpointError(f"the checkpoint keeps tables {sorted(record['tables'])} in "
                              "an SSD tier snapshot, but this run has no SSD tier")
    saved = ssd_snapshot.open_read_only(record)
    try:
        for name, t in record["tables"].items():
            src = SSDTier(saved, t["row_width"], table_id=t["table_id"])
            dst = SSDTier(store, t["row_width"], table_id=ids[name])
            width, pad = src.stored_width, dst.stored_width - src.stored_width
            for keys, vals in saved.scan(src.table_id, width, CHUNK_ROWS):
                mine = emb.owned(name, torch.from_numpy(keys)).numpy()
                if mine.any():
                    vals = vals[mine]
                    if pad:  # saved without metadata: as last used at step 0
                        vals = np.concatenate([vals, np.zeros((len(vals), pad), "<f4")], 1)
                    store.write(dst.table_id, keys[mine], vals)
    finally:
        saved.close()


def _summed(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Admission states of the saved shards as one: counters, totals and stats added."""
    out = dict(states[0])
    sketches = [s.get("sketch") for s in states]
    if all(sk is not None for sk in sketches):
        first = dict(sketches[0])
        counts = torch.stack([sk["counters"] for sk in sketches]).sum(0, dtype=torch.int64)
        first["counters"] = counts.clamp_(max=torch.iinfo(torch.int32).max).to(torch.int32)
        first["total"] = sum(int(sk["total"]) for sk in sketches)
        out["sketch"] = first
    stats: dict[str, int] = {}
    for s in states:
        for k, v in s.get("stats", {}).items():
            stats[k] = stats.get(k, 0) + int(v)
    out["stats"] = stats
    return out


def load_rest(path: Path, manifest: dict[str, Any], parts: Components,
              source: Any) -> None:
    """This rank's data position and RNG state under the new layout (dense state:
    :func:`load_checkpoint`). The saved ranks' ``data.json`` files are verified."""
    rank = 0 if parts.dist is None else parts.dist.rank
    dirs = [f"rank{r}/" if manifest.get("world") else "" for r in saved_ranks(manifest)]
    if source is not None and hasattr(source, "reshard_state"):
        verify_files(path, manifest, [f"{d}data.json" for d in dirs])
        saved = [json.loads((path / d / "data.json").read_text()) for d in dirs]
        source.load_state_dict(source.reshard_state(saved))
    own = dirs[rank] if rank < len(dirs) else dirs[0]
    verify_files(path, manifest, [f"{own}rng.pt"])
    torch.set_rng_state(torch.load(path / own / "rng.pt", weights_only=True)["torch"])

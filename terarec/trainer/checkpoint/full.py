"""Full checkpoints: every row of every table, dense weights, optimizer and data state.

Layout of one full checkpoint directory (one process; several ranks write
``rank<r>/`` for the per-rank files, see the package docstring)::

    manifest.json   format version, step, samples, the run's config, and the size +
                    sha256 of every file below
    tables.pt       per table: its row count and optimizer state; a table with an SSD
                    tier ``ssd: True`` (its rows are in the SSD tier's snapshot); with
                    admission, the first table of each group also holds the group's
                    count-min sketch (format 1 checkpoints: every table's keys [R] and
                    rows [R, dim + state] too)
    rows.<i>.safetensors  the other tables' keys and rows (dim + state), streamed in
                    chunks (``rows.py``); a tiered table's rows come from all its tiers,
                    the freshest copy of each
    dense.pt        model state_dict (MLPs), dense optimizer state_dict and class name
    ssd.json        with an SSD tier: the record of its RocksDB snapshot beside the DB
                    (``ssd_snapshot.py``)
    data.json       the train source's position (exact resume)
    rng.pt          torch RNG state
    dense_local.pt  per rank with k-step merging: its dense optimizer and merger state

A multi-rank checkpoint resumes on the same number of ranks in the same fast groups
(each rank loads its own shard and position) or on another layout (``reshard.py``);
one process without a data source (``terarec eval``) loads the shards of the first
fast group together.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from terarec.config import Config
from terarec.ps.state import dense_state_only
from terarec.trainer.checkpoint import delta, reshard, rows, ssd_snapshot
from terarec.trainer.checkpoint.files import (
    LOCAL_FILE,
    Capture,
    CheckpointError,
    capture,
    commit,
    fast_groups,
    rank_files,
    read_manifest,
    save_torch,
    verify_files,
)

if TYPE_CHECKING:
    from terarec.trainer.components import Components

log = logging.getLogger("terarec.trainer")


def save_checkpoint(
    path: Path, parts: Components, source: Any, step: int, cfg: Config, samples: int = 0
) -> Path:
    """Writes a full checkpoint of the run to ``path``, replacing an older one there
    (and the SSD tier snapshots of older ones) atomically (:func:`write_full`).

    Args:
        path: the checkpoint directory, e.g. ``runs/<name>/checkpoint``.
        parts: the run's embedding, model and dense optimizer.
        source: the train batch source (its ``state_dict()`` is the data position).
        step: training steps taken so far.
        cfg: the run's config (stored in the manifest, so ``terarec eval`` can rebuild it).
        samples: training samples seen so far by the whole job (restored on resume).

    Raises:
        NonFiniteState: a row or dense weight is NaN/Inf (on any rank); nothing was written.
        CheckpointError: an OS error (full disk, permissions) while writing, on any rank.
    """
    snap = write_full(path, parts, source, step, cfg, samples)
    ssd_snapshot.keep_only(snap)
    return Path(path)


def write_full(
    path: Path, parts: Components, source: Any, step: int, cfg: Config, samples: int = 0,
    retire_to: Optional[Path] = None,
) -> Optional[dict[str, Any]]:
    """Writes a full checkpoint to ``path`` (arguments as :func:`save_checkpoint`).

    Everything is written into ``<path>.tmp`` first; if any write fails the temporary
    directory is removed and an existing checkpoint at ``path`` is left untouched. Every
    file and the temporary directory are fsynced before the rename and the parent
    directory after it, so after a power loss ``path`` is the old checkpoint or the
    complete new one, never a renamed directory of empty files. With several ranks
    (``parts.dist``) every rank must call this (a collective).

    Args:
        retire_to: where the checkpoint ``path`` held before goes (kept), instead of
            being deleted.

    Returns:
        this rank's SSD tier snapshot record (or None); the caller deletes the snapshots
        no kept checkpoint points at (``ssd_snapshot.keep_only``).
    """
    taken, snap, fmt = capture_full(parts, source, step, Path(path))
    commit_full(Path(path), parts, step, cfg, samples, taken, snap, fmt, retire_to)
    return snap


def capture_full(parts: Components, source: Any, step: int, path: Path
                 ) -> tuple[Capture, Optional[dict[str, Any]], dict[str, Any]]:
    """This rank's part of a full checkpoint of ``step`` at ``path``, taken now (the
    pause of an asynchronous save): the cached rows of SSD tables copied and the SSD
    tier snapshotted, the in-memory tables' rows streamed into staged chunk files
    (``rows.py``), the dense state copied. Returns it, the snapshot's record (None
    without an SSD tier) and the manifest's format field."""
    d = parts.dist
    stage = rows.stage_dir(path, f"rank{d.rank}" if d is not None and d.world_size > 1
                           else "")
    try:
        bad, snap, tables, chunks = _capture_tables(parts, step, stage)
    except OSError as e:  # staging the row chunks: a full disk names the file
        rows.drop_stage(stage)
        raise CheckpointError(f"cannot write checkpoint {path}: {e}") from e

    def write_files(out: Path) -> list[str]:
        names = rows.move_chunks(stage, chunks, out) + ["tables.pt"]
        save_torch(tables, out / "tables.pt")
        if snap is not None:
            (out / ssd_snapshot.FILE).write_text(json.dumps(snap, indent=1))
            names.append(ssd_snapshot.FILE)
        return names

    try:
        taken = capture(parts, source, bad, write_files)
    except BaseException:
        ssd_snapshot.drop(snap)
        rows.drop_stage(stage)
        raise
    if taken.bad is not None:  # nothing will be written
        rows.drop_stage(stage)
    taken.stage = stage
    return taken, snap, {"format": 4}


def commit_full(path: Path, parts: Components, step: int, cfg: Config, samples: int,
                taken: Capture, snap: Optional[dict[str, Any]], fmt: dict[str, Any],
                retire_to: Optional[Path] = None, group: Any = None) -> None:
    """Writes a captured full checkpoint (:func:`capture_full`) to ``path``; its SSD
    snapshot is dropped when the commit says nothing was written. Any other failure (a
    peer lost after rank 0 renamed the checkpoint into place, an interrupt) may follow a
    commit that points at the snapshot: it stays, and the next save's ``keep_only``
    removes it if no kept checkpoint needs it."""
    try:
        commit(path, parts, step, cfg, samples, taken, fmt, retire_to=retire_to,
               group=group)
    except BaseException as e:
        if isinstance(e, CheckpointError) and not ssd_snapshot.used_by(path, snap):
            ssd_snapshot.drop(snap)
        if taken.stage is not None:
            rows.drop_stage(taken.stage)
        raise


def _capture_tables(
    parts: Components, step: int, stage: Path
) -> tuple[Optional[str], Optional[dict[str, Any]], dict[str, Any], list[str]]:
    """This rank's rows: ``(what is not finite, if something is; the SSD tier
    snapshot's record, if taken; the table states without rows; the staged chunk
    files)``. Tables with an SSD tier are snapshotted (``ssd_snapshot.py``), not
    exported; ``ssd.json`` points at the snapshot. The other tables' rows are streamed
    into chunk files in ``stage``."""
    emb = parts.embedding
    emb.flush()
    try:
        snap, cached = ssd_snapshot.take(emb, step)
    except ssd_snapshot.NonFiniteRows as e:
        return str(e), None, {}, []
    if snap is not None:
        ssd_snapshot.write_cached(stage, cached)  # (moved into the checkpoint with the rows)
    streamed = [t.name for t in emb.tables if not (t.in_ssd and snap is not None)]
    bad, chunks = rows.write_chunks(emb, stage, streamed)
    if bad is not None:
        ssd_snapshot.drop(snap)
        return bad, None, {}, []
    if snap is not None:
        chunks.append(ssd_snapshot.CACHED)
    tables = {}
    for t in emb.tables:  # no rows: optimizer counters, row count, clock, sketch (copies)
        state = copy.deepcopy(t.state_dict(rows=False))
        if t.name in streamed:
            del state["ssd"]
        tables[t.name] = state
    return None, snap, tables, chunks


def load_checkpoint(path: Path, parts: Components, source: Any = None) -> int:
    """Restores rows, dense weights, optimizer states (and data position); returns step.

    ``path`` is a full checkpoint or a delta (then its base and the deltas up to it are
    read, ``delta.py``). The files this rank reads are verified against their manifests
    (size and sha256) before anything is loaded, so a corrupted checkpoint fails here
    rather than training on bad rows. A tiered table's rows all go into its bottom tier
    (the SSD tier, or the unbounded host tier); its caches start empty (the rows and the
    math are the same wherever a row lives, so training continues bit for bit).

    A multi-rank checkpoint is loaded by every rank of a job with the same ranks and
    fast groups (each its own shard), or by one process without ``source`` (the rows of
    the first fast group's shards together; e.g. ``terarec eval``). A job of another
    rank layout (1, 2, 4 ... ranks, other fast groups) reshards it (``reshard.py``):
    each rank keeps the rows it owns now and derives its data position.

    Args:
        path: the checkpoint directory.
        parts: the freshly built components of the run to restore into.
        source: the train batch source to move to the saved position (optional).

    Raises:
        CheckpointError: a file is missing, truncated or corrupted (named in the
            message), or the checkpoint was saved by a model of another shape.
    """
    path = Path(path)
    manifest = read_manifest(path, verify=False)
    links = delta.chain(path, manifest)
    rank_dir = _rank_dir(path, manifest, parts, source)
    local: Optional[str] = None
    try:
        if rank_dir is None:  # one process reads a multi-rank checkpoint's rows
            ranks = [f"rank{r}/" for r in manifest["world"]["fast_groups"][0]]
            verify_files(path, manifest, ["dense.pt"])
            tables = merge_shards([read_tables(path, r, manifest) for r in ranks])
        elif rank_dir == RESHARD:  # saved by another rank layout
            verify_files(path, manifest, ["dense.pt"])
            tables = reshard.load_tables(links, parts)
        else:
            # this replica's own dense optimizer state (k-step merging), when this run
            # keeps replicas apart between merges too (a k = 1 resume takes rank 0's)
            local = f"{rank_dir}{LOCAL_FILE}"
            if local not in manifest["files"] or parts.sync.local_state_dict() is None:
                local = None
            for p, m in links:
                verify_files(p, m, [f"{rank_dir}{n}" for n in rank_files(m, rank_dir)])
            verify_files(path, manifest, ["dense.pt"] + ([local] if local else []))
            base, base_m = links[0]
            tables = rows.load_states(base, rank_dir, base_m, parts.device)
            record = ssd_snapshot.record_in(base, base_m, rank_dir)
            if record is not None:
                ssd_snapshot.restore(parts.embedding, record)
                cached = ssd_snapshot.cached_in(base, rank_dir, record)
                if cached is not None:
                    assert parts.embedding.ssd_store is not None
                    ssd_snapshot.apply_cached(parts.embedding.ssd_store, record, cached)
            writer = None if record is None else delta.ssd_writer(
                parts.embedding.ssd_store,
                {n: t["table_id"] for n, t in record["tables"].items()},
                {n: t["row_width"] for n, t in record["tables"].items()})
            tables = delta.apply(tables, links[1:], rank_dir, writer)
        parts.embedding.load_tables_state_dict(tables)
        dense = torch.load(path / "dense.pt", map_location=parts.device, weights_only=True)
        with dense_state_only(parts.model):
            parts.model.load_state_dict(dense["model"])
        saved, ours = dense.get("optimizer_class"), type(parts.dense_optimizer).__name__
        if saved is not None and saved != ours:
            # torch would load another optimizer's state and fail at the first step
            raise ValueError(
                f"the dense optimizer state is {saved}'s, this run uses {ours} "
                "(optimizer.dense.kind)"
            )
        parts.dense_optimizer.load_state_dict(dense["optimizer"])
        sync = dense.get("sync") or {}
        if rank_dir == RESHARD and not sync:  # saved without replicas to keep in step
            sync = parts.sync.state_dict()  # (its counters from zero)
            sync.update({"step": int(manifest["step"])} if sync else {})
        parts.sync.load_state_dict(sync)
        if local is not None:
            own = torch.load(path / local, map_location=parts.device, weights_only=True)
            parts.dense_optimizer.load_state_dict(own["optimizer"])
            parts.sync.load_local_state_dict(own["sync"])
        if rank_dir == RESHARD:
            reshard.load_rest(path, manifest, parts, source)
        elif rank_dir is not None:
            if source is not None and hasattr(source, "load_state_dict"):
                source.load_state_dict(json.loads((path / rank_dir / "data.json").read_text()))
            rng = torch.load(path / rank_dir / "rng.pt", weights_only=True)
            torch.set_rng_state(rng["torch"])
    except ssd_snapshot.SnapshotError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except CheckpointError:  # a missing or damaged file, named as it is (a RuntimeError)
        raise
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{path}: does not fit this model/config: {e}") from e
    return int(manifest["step"])


def read_tables(path: Path, rank_dir: str = "", manifest: Optional[dict[str, Any]] = None
                ) -> dict[str, Any]:
    """A checkpoint's table states with every row in memory: ``tables.pt`` of
    ``rank_dir`` (``""`` or ``"rank<r>/"``), the rows of its SSD tier snapshot filled
    in, a delta's chain applied (tools, tests, one-process reads of small tables). The
    files read are verified against their manifests."""
    path = Path(path)
    manifest = manifest or read_manifest(path, verify=False)
    links = delta.chain(path, manifest)
    for p, m in links:
        verify_files(p, m, [f"{rank_dir}{n}" for n in rank_files(m, rank_dir)])
    base, base_m = links[0]
    tables = rows.load_states(base, rank_dir, base_m)
    record = ssd_snapshot.record_in(base, base_m, rank_dir)
    if record is not None:
        ttl = {t["name"]: t.get("ttl_steps") for t in base_m.get("config", {}).get("tables", [])}
        fresh = {n: int(base_m["step"]) + 1 - v for n, v in ttl.items() if v is not None}
        try:
            snapshot_rows = ssd_snapshot.read_rows(
                record, fresh, ssd_snapshot.cached_in(base, rank_dir, record))
        except ssd_snapshot.SnapshotError as e:
            raise CheckpointError(f"{path}: {e}") from e
        for name, kr in snapshot_rows.items():
            state = {k: v for k, v in tables[name].items() if k not in ("ssd", "num_rows")}
            tables[name] = {**state, **kr}
    return delta.apply(tables, links[1:], rank_dir)


RESHARD = "*"  # _rank_dir: this run's rank layout is not the checkpoint's


def _rank_dir(path: Path, manifest: dict[str, Any], parts: Components,
              source: Any) -> Optional[str]:
    """Where this rank's files are in the checkpoint (``""`` or ``"rank<r>/"``);
    :data:`RESHARD` when this run's ranks or fast groups are not the checkpoint's (every
    rank reads the shards and keeps what it owns, ``reshard.py``); None when one
    process reads a multi-rank checkpoint's rows without resuming it."""
    d = parts.dist
    ours = 1 if d is None else d.world_size
    world = manifest.get("world")
    groups = fast_groups(d) if d is not None and ours > 1 else [[0]]
    if world is None:
        return "" if ours == 1 else RESHARD
    if ours == 1 and source is None:
        return None
    saved = [list(g) for g in world["fast_groups"]]
    if int(world["size"]) != ours or saved != [list(g) for g in groups]:
        log.info("%s: saved by %s ranks in fast groups %s, resumed by %d in %s: "
                 "resharding", path, world["size"], saved, ours, groups)
        return RESHARD
    assert d is not None
    return f"rank{d.rank}/"


def merge_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The tables of one fast group's shards as one table state (keys are disjoint
    between the shards of a fast group; optimizer counters and sketches are the first
    shard's, which is what an evaluation needs)."""
    out: dict[str, Any] = {}
    for name, first in shards[0].items():
        parts = [s[name] for s in shards]
        out[name] = {**first, "keys": torch.cat([p["keys"] for p in parts]),
                     "rows": torch.cat([p["rows"] for p in parts])}
    return out

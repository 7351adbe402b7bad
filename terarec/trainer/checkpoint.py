"""Checkpoints: rows + dense weights + optimizer states + data position, atomically.

Layout of ``<dir>/``::

    manifest.json   format version, step, samples, the run's config, and the size +
                    sha256 of every file below
    tables.pt       per table: keys [R], rows [R, dim + state], optimizer step; a tiered
                    table's rows come from all its tiers, the freshest copy of each; a
                    table with an SSD tier holds ``ssd: True`` and its row count instead
                    (its rows are in the SSD tier's snapshot); with admission,
                    the first table of each group also holds the group's count-min
                    sketch (counters, decay phase, counts), so a resume admits the same
                    keys at the same steps
    dense.pt        model state_dict (MLPs), dense optimizer state_dict and class name
    ssd.json        with an SSD tier: the record of its RocksDB snapshot beside the DB
                    (``trainer/ssd_snapshot.py``)
    data.json       the train source's position (exact resume)
    rng.pt          torch RNG state

A multi-rank run (``parts.dist``) saves one shard per rank, every rank taking part::

    manifest.json   as above, plus ``world``: the number of ranks, the fast groups and
                    every rank's own sample count; ``files`` lists every rank's files
    dense.pt        rank 0's (the dense weights and optimizer are the same on all ranks)
    rank<r>/tables.pt   the rows rank ``r`` owns (its shard of every table)
    rank<r>/data.json   rank ``r``'s data position
    rank<r>/rng.pt      rank ``r``'s RNG state
    rank<r>/dense_local.pt  with k-step merging (``sync.k > 1``): rank ``r``'s dense
                    optimizer state and its merger's own state (replicas differ there
                    between merges, so a resume restores each rank's, not rank 0's)

Every rank writes its directory into ``<dir>.tmp``, the ranks agree that all of them
succeeded (a NaN or a failed write on any rank fails the save on every rank, leaving the
old checkpoint), then rank 0 writes the manifest and renames the directory, so the
checkpoint directory must be on a file system every rank sees. A multi-rank checkpoint
resumes on the same number of ranks in the same fast groups (each rank loads its own
shard and position); one process (``terarec eval``) can load its rows, the shards of
the first fast group together, but not its data positions.

The directory is written under a temporary name, fsynced and renamed into place, so a
crash or power loss mid-save never leaves a half checkpoint where a complete one is
expected. State holding NaN/Inf is refused rather than saved over a good checkpoint.
Loading checks the manifest's sizes and hashes and names the file that does not match.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from terarec.config import Config, config_to_dict
from terarec.ps.tiers.ssd import SSDTierError
from terarec.runtime import DistHandles
from terarec.trainer import ssd_snapshot
from terarec.trainer.ranks import all_fast_groups

if TYPE_CHECKING:
    from terarec.trainer.components import Components

log = logging.getLogger("terarec.trainer")

# 1: every row in tables.pt; 2: tables with an SSD tier in snapshots (``ssd.json``).
# A checkpoint is written as 1 when it has no snapshot, so older code still reads it.
FORMAT = 2
FORMATS = (1, 2)
REQUIRED_FILES = ("tables.pt", "dense.pt", "data.json", "rng.pt")
RANK_FILES = ("tables.pt", "data.json", "rng.pt")  # per rank, in rank<r>/ (multi-rank)
LOCAL_FILE = "dense_local.pt"  # per rank with k-step merging: its dense optimizer state


def required_files(manifest: dict[str, Any]) -> list[str]:
    """The files a checkpoint with this manifest must hold."""
    world = manifest.get("world")
    if not world:
        return list(REQUIRED_FILES)
    return ["dense.pt"] + [f"rank{r}/{n}" for r in range(int(world["size"])) for n in RANK_FILES]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or of another model."""


class NonFiniteState(CheckpointError):
    """The rows or dense weights to save hold NaN/Inf; no checkpoint was written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flushes a file's data, or a directory's entries (its renames), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory; its files are durable regardless.
        if not (path.is_dir() and e.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def _first_non_finite(tables: dict[str, Any], model: dict[str, Any]) -> Optional[str]:
    """Names the first table or dense tensor holding a NaN or Inf, or None (tables in
    an SSD tier snapshot are checked by ``ssd_snapshot.take``: their cached rows)."""
    for name, t in tables.items():
        if "rows" in t and not bool(torch.isfinite(t["rows"]).all()):
            return f"table {name!r} has NaN/Inf rows"
    for name, v in model.items():
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"dense weight {name!r} has NaN/Inf values"
    return None


def save_checkpoint(
    path: Path, parts: Components, source: Any, step: int, cfg: Config, samples: int = 0
) -> Path:
    """Writes a checkpoint of the run to ``path`` (replacing an older one atomically).

    Everything is written into ``<path>.tmp`` first; if any write fails the temporary
    directory is removed and an existing checkpoint at ``path`` is left untouched. Every
    file and the temporary directory are fsynced before the rename and the parent
    directory after it, so after a power loss ``path`` is the old checkpoint or the
    complete new one, never a renamed directory of empty files. With several ranks
    (``parts.dist``) every rank must call this (see the module docstring).

    Args:
        path: the checkpoint directory, e.g. ``runs/<name>/checkpoint``.
        parts: the run's embedding, model and dense optimizer.
        source: the train batch source (its ``state_dict()`` is the data position).
        step: training steps taken so far.
        cfg: the run's config (stored in the manifest, so ``terarec eval`` can rebuild it).
        samples: training samples seen so far by the whole job (restored on resume).

    Returns:
        ``path``.

    Raises:
        NonFiniteState: a row or dense weight is NaN/Inf (on any rank); nothing was written.
        CheckpointError: an OS error (full disk, permissions) while writing, on any rank.
    """
    d = parts.dist
    if d is not None and d.world_size > 1:
        return _save_sharded(Path(path), parts, source, step, cfg, samples, d)
    path = Path(path)
    tmp = _fresh_tmp(path)
    snap: Optional[dict[str, Any]] = None
    try:
        bad, snap = _write_rank_files(tmp, parts, source, step)
        bad = bad or _write_dense(tmp, parts)
        if bad is not None:
            # Saving would replace the last good checkpoint with one nobody can resume from.
            raise NonFiniteState(f"{bad}; {path} was not written")
        files = _describe(tmp, sorted(p.name for p in tmp.iterdir()))
        _write_manifest(tmp, _manifest(step, samples, cfg, files))
    except BaseException as e:
        # Whatever failed (disk full, an unpicklable object, Ctrl-C), leave no half dir.
        shutil.rmtree(tmp, ignore_errors=True)
        ssd_snapshot.drop(snap)
        if isinstance(e, (OSError, SSDTierError)):
            raise CheckpointError(f"cannot write checkpoint {path}: {e}") from e
        raise
    try:
        _replace(tmp, path)
    except BaseException:
        ssd_snapshot.drop(snap)
        raise
    ssd_snapshot.keep_only(snap)
    return path


def _fresh_tmp(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _write_rank_files(
    out: Path, parts: Components, source: Any, step: int
) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """This rank's rows, data position and RNG into ``out``: ``(what is not finite, if
    something is (then nothing is written), the SSD tier snapshot's record, if taken)``.
    Tables with an SSD tier are snapshotted (``trainer/ssd_snapshot.py``), not exported;
    ``ssd.json`` points at the snapshot."""
    parts.embedding.flush()
    try:
        snap = ssd_snapshot.take(parts.embedding, step)
    except ssd_snapshot.NonFiniteRows as e:
        return str(e), None
    tables = parts.embedding.tables_state_dict(ssd_rows=snap is None)
    bad = _first_non_finite(tables, {})
    if bad is not None:
        ssd_snapshot.drop(snap)
        return bad, None
    torch.save(tables, out / "tables.pt")
    if snap is not None:
        (out / ssd_snapshot.FILE).write_text(json.dumps(snap, indent=1))
    state = source.state_dict() if hasattr(source, "state_dict") else {}
    (out / "data.json").write_text(json.dumps(state))
    torch.save({"torch": torch.get_rng_state()}, out / "rng.pt")
    return None, snap


def _write_dense(out: Path, parts: Components) -> Optional[str]:
    """The dense weights, optimizer and replica-sync state into ``out/dense.pt``."""
    model = parts.model.state_dict()
    bad = _first_non_finite({}, model)
    if bad is not None:
        return bad
    torch.save(
        {
            "model": model,
            "optimizer": parts.dense_optimizer.state_dict(),
            "optimizer_class": type(parts.dense_optimizer).__name__,
            "sync": parts.sync.state_dict(),
        },
        out / "dense.pt",
    )
    return None


def _describe(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file ``root/name``, fsynced first."""
    out = {}
    for n in names:
        _fsync(root / n)
        out[n] = {"bytes": (root / n).stat().st_size, "sha256": _sha256(root / n)}
    return out


def _manifest(
    step: int, samples: int, cfg: Config, files: dict[str, Any], world: Optional[dict] = None
) -> dict[str, Any]:
    snapshots = any(n.endswith(ssd_snapshot.FILE) for n in files)
    out: dict[str, Any] = {"format": FORMAT if snapshots else 1, "step": step,
                           "samples": samples, "config": config_to_dict(cfg)}
    if world is not None:
        out["world"] = world
    out["files"] = dict(sorted(files.items()))
    return out


def _write_manifest(tmp: Path, manifest: dict[str, Any]) -> None:
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / "manifest.json")
    _fsync(tmp)


def _replace(tmp: Path, path: Path) -> None:
    """Renames the complete ``tmp`` to ``path``; the old checkpoint goes only after."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    try:
        _fsync(path.parent)  # the renames; only then may the old checkpoint go
    except OSError as e:
        raise CheckpointError(f"cannot make checkpoint {path} durable: {e}") from e
    shutil.rmtree(old, ignore_errors=True)


def _gather(obj: Any, d: DistHandles) -> list[Any]:
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj, group=d.world)
    return out


def _fast_groups(d: DistHandles) -> list[list[int]]:
    return [list(g) for g in all_fast_groups(d)]


def _save_sharded(
    path: Path, parts: Components, source: Any, step: int, cfg: Config, samples: int,
    d: DistHandles,
) -> Path:
    """:func:`save_checkpoint` of one rank of a multi-rank run (a collective)."""
    tmp = path.with_name(path.name + ".tmp")
    err: Optional[str] = None
    if d.rank == 0:
        try:
            _fresh_tmp(path)
        except OSError as e:
            err = f"rank 0: {e}"
    errs = [e for e in _gather(err, d) if e]  # also: nobody writes before tmp exists
    if errs:
        raise CheckpointError(f"cannot write checkpoint {path}: {errs[0]}")
    mine = f"rank{d.rank}"
    bad: Optional[str] = None
    snap: Optional[dict[str, Any]] = None
    files: dict[str, Any] = {}
    try:
        (tmp / mine).mkdir(parents=True, exist_ok=True)
        bad, snap = _write_rank_files(tmp / mine, parts, source, step)
        local = parts.sync.local_state_dict()
        if bad is None and local is not None:
            torch.save({"optimizer": parts.dense_optimizer.state_dict(), "sync": local},
                       tmp / mine / LOCAL_FILE)
        if bad is None and d.rank == 0:
            bad = _write_dense(tmp, parts)
        if bad is None:
            names = [f"{mine}/{n}" for n in RANK_FILES] + (["dense.pt"] if d.rank == 0 else [])
            names += [f"{mine}/{LOCAL_FILE}"] if local is not None else []
            names += [f"{mine}/{ssd_snapshot.FILE}"] if snap is not None else []
            files = _describe(tmp, names)
            _fsync(tmp / mine)
    except (OSError, SSDTierError) as e:
        err = str(e)
    reports = _gather((None if bad is None else f"rank {d.rank}: {bad}",
                       None if err is None else f"rank {d.rank}: {err}", files), d)
    groups = _fast_groups(d)
    bads = [r[0] for r in reports if r[0]]
    errs = [r[1] for r in reports if r[1]]
    result: Optional[str] = None
    if d.rank == 0:
        if not bads and not errs:
            every = {n: m for r in reports for n, m in r[2].items()}
            try:
                unseen = [n for n in every if not (tmp / n).is_file()]
                if unseen:
                    result = (
                        f"{tmp / unseen[0]} (written by another rank) is not visible to rank "
                        f"0: the checkpoint directory must be on a file system every rank "
                        f"sees (train.runs_dir)"
                    )
                else:
                    world = {"size": d.world_size, "fast_groups": groups}
                    _write_manifest(tmp, _manifest(step, samples, cfg, every, world))
                    _replace(tmp, path)
            except (OSError, CheckpointError) as e:
                result = f"cannot write checkpoint {path}: {e}"
        if bads or errs or result:
            shutil.rmtree(tmp, ignore_errors=True)
    if bads or errs:
        ssd_snapshot.drop(snap)
    if bads:
        raise NonFiniteState(f"{bads[0]}; {path} was not written")
    if errs:
        raise CheckpointError(f"cannot write checkpoint {path}: {errs[0]}")
    result = _gather(result, d)[0]
    if result:
        ssd_snapshot.drop(snap)
        raise CheckpointError(result)
    ssd_snapshot.keep_only(snap)
    return path


def read_manifest(path: Path, verify: bool = True) -> dict[str, Any]:
    """The checkpoint's manifest, after checking every file's size (and hash).

    Args:
        path: the checkpoint directory.
        verify: also compare every file's sha256 with the manifest (reads every byte).

    Raises:
        CheckpointError: naming the file that is missing, truncated, corrupted or
            unreadable (including ``manifest.json`` itself).
    """
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        old = path.with_name(path.name + ".old")
        hint = (
            f"; a save was interrupted, the previous checkpoint is in {old}"
            if (old / "manifest.json").is_file()
            else ""
        )
        raise CheckpointError(f"{path}: not a checkpoint (no manifest.json){hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        step = manifest["step"]
        if not isinstance(files, dict) or not isinstance(step, int):
            raise TypeError("'files' must be a mapping and 'step' an integer")
        for meta in files.values():
            if not isinstance(meta["bytes"], int) or not isinstance(meta["sha256"], str):
                raise TypeError("every file needs integer 'bytes' and string 'sha256'")
    except (ValueError, KeyError, TypeError) as e:  # bad JSON/UTF-8, missing or bad keys
        raise CheckpointError(f"{mpath}: corrupted manifest ({type(e).__name__}: {e})") from None
    if manifest.get("format") not in FORMATS:
        raise CheckpointError(
            f"{mpath}: format {manifest.get('format')}, this terarec reads {FORMATS}")
    unlisted = [n for n in required_files(manifest) if n not in files]
    if unlisted:
        raise CheckpointError(f"{mpath}: corrupted manifest (does not list {unlisted})")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{f}: size {f.stat().st_size} != {meta['bytes']} in the manifest (truncated?)"
            )
        if verify:
            _verify(path, manifest, [name])
    return manifest


def _verify(path: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """Compares the sha256 of files ``names`` with the manifest."""
    for name in names:
        if _sha256(path / name) != manifest["files"][name]["sha256"]:
            raise CheckpointError(f"{path / name}: sha256 does not match the manifest (corrupted)")


def load_checkpoint(path: Path, parts: Components, source: Any = None) -> int:
    """Restores rows, dense weights, optimizer states (and data position); returns step.

    The files this rank reads are verified against the manifest (size and sha256)
    before anything is loaded, so a corrupted checkpoint fails here rather than training
    on bad rows. A tiered table's rows all go into its bottom tier (the SSD tier, or the
    unbounded host tier); its caches start empty (the rows and the math are the same
    wherever a row lives, so training continues bit for bit).

    A multi-rank checkpoint is loaded by every rank of a job with the same ranks and
    fast groups (each its own shard), or by one process without ``source`` (the rows of
    the first fast group's shards together; e.g. ``terarec eval``).

    Args:
        path: the checkpoint directory.
        parts: the freshly built components of the run to restore into.
        source: the train batch source to move to the saved position (optional).

    Raises:
        CheckpointError: a file is missing, truncated or corrupted (named in the
            message), the checkpoint was saved by a model of another shape, or by
            another number or layout of ranks.
    """
    path = Path(path)
    manifest = read_manifest(path, verify=False)
    rank_dir = _rank_dir(path, manifest, parts, source)
    local: Optional[str] = None
    try:
        if rank_dir is None:  # one process reads a multi-rank checkpoint's rows
            ranks = [f"rank{r}/" for r in manifest["world"]["fast_groups"][0]]
            _verify(path, manifest, [f"{r}tables.pt" for r in ranks] + ["dense.pt"])
            tables = merge_shards([read_tables(path, r, manifest) for r in ranks])
        else:
            mine = [f"{rank_dir}{n}" for n in RANK_FILES]
            # this replica's own dense optimizer state (k-step merging), when this run
            # keeps replicas apart between merges too (a k = 1 resume takes rank 0's)
            local = f"{rank_dir}{LOCAL_FILE}"
            if local not in manifest["files"] or parts.sync.local_state_dict() is None:
                local = None
            _verify(path, manifest, [*mine, "dense.pt"] + ([local] if local else []))
            tables = torch.load(path / mine[0], map_location=parts.device, weights_only=True)
            record = _snapshot_record(path, manifest, rank_dir)
            if record is not None:
                ssd_snapshot.restore(parts.embedding, record)
        parts.embedding.load_tables_state_dict(tables)
        dense = torch.load(path / "dense.pt", map_location=parts.device, weights_only=True)
        parts.model.load_state_dict(dense["model"])
        saved, ours = dense.get("optimizer_class"), type(parts.dense_optimizer).__name__
        if saved is not None and saved != ours:
            # torch would load another optimizer's state and fail at the first step
            raise ValueError(
                f"the dense optimizer state is {saved}'s, this run uses {ours} "
                "(optimizer.dense.kind)"
            )
        parts.dense_optimizer.load_state_dict(dense["optimizer"])
        parts.sync.load_state_dict(dense.get("sync") or {})
        if local is not None:
            own = torch.load(path / local, map_location=parts.device, weights_only=True)
            parts.dense_optimizer.load_state_dict(own["optimizer"])
            parts.sync.load_local_state_dict(own["sync"])
        if rank_dir is not None:
            if source is not None and hasattr(source, "load_state_dict"):
                source.load_state_dict(json.loads((path / rank_dir / "data.json").read_text()))
            rng = torch.load(path / rank_dir / "rng.pt", weights_only=True)
            torch.set_rng_state(rng["torch"])
    except ssd_snapshot.SnapshotError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{path}: does not fit this model/config: {e}") from e
    return int(manifest["step"])


def _snapshot_record(path: Path, manifest: dict[str, Any], rank_dir: str
                     ) -> Optional[dict[str, Any]]:
    """The SSD tier snapshot record (``ssd.json``) of ``rank_dir``, verified against the
    manifest; None when the checkpoint has none there."""
    name = f"{rank_dir}{ssd_snapshot.FILE}"
    if name not in manifest["files"]:
        return None
    _verify(path, manifest, [name])
    return ssd_snapshot.load_record(path / name)


def latest_valid(run_dir: Path) -> Optional[Path]:
    """The run's newest checkpoint that verifies (every file's size and sha256, the SSD
    tier snapshots' files too), for ``--resume auto``: ``checkpoint/``, else the
    ``checkpoint.old/`` a save killed between its two renames leaves; None when there is
    none (the run starts fresh). A damaged one is skipped with a warning."""
    found = []
    for cand in (run_dir / "checkpoint", run_dir / "checkpoint.old"):
        if not (cand / "manifest.json").is_file():
            continue
        try:
            manifest = read_manifest(cand, verify=True)
            for name in manifest["files"]:
                if name.endswith(ssd_snapshot.FILE):
                    ssd_snapshot.verify(ssd_snapshot.load_record(cand / name))
        except (CheckpointError, ssd_snapshot.SnapshotError) as e:
            log.warning("--resume auto: skipping %s: %s", cand, e)
            continue
        found.append((int(manifest["step"]), cand))
    return max(found)[1] if found else None


def read_tables(path: Path, rank_dir: str = "", manifest: Optional[dict[str, Any]] = None
                ) -> dict[str, Any]:
    """A checkpoint's table states with every row in memory: ``tables.pt`` of
    ``rank_dir`` (``""`` or ``"rank<r>/"``), the rows of its SSD tier snapshot filled
    in (tools, tests, one-process reads of small tables)."""
    path = Path(path)
    manifest = manifest or read_manifest(path, verify=False)
    tables = torch.load(path / f"{rank_dir}tables.pt", map_location="cpu", weights_only=True)
    record = _snapshot_record(path, manifest, rank_dir)
    if record is not None:
        try:
            rows = ssd_snapshot.read_rows(record)
        except ssd_snapshot.SnapshotError as e:
            raise CheckpointError(f"{path}: {e}") from e
        for name, kr in rows.items():
            state = {k: v for k, v in tables[name].items() if k not in ("ssd", "num_rows")}
            tables[name] = {**state, **kr}
    return tables


def _rank_dir(path: Path, manifest: dict[str, Any], parts: Components,
              source: Any) -> Optional[str]:
    """Where this rank's files are in the checkpoint (``""`` or ``"rank<r>/"``); None
    when one process reads a multi-rank checkpoint's rows. Raises on a launch that
    does not fit the checkpoint."""
    d = parts.dist
    ours = 1 if d is None else d.world_size
    world = manifest.get("world")
    if world is None:
        if ours > 1:
            raise CheckpointError(
                f"{path}: saved by one process, this run has {ours} ranks: resume it on one "
                "process (its rows are not sharded)"
            )
        return ""
    saved = [list(g) for g in world["fast_groups"]]
    if ours == 1 and source is None:
        return None
    groups = _fast_groups(d) if d is not None and ours > 1 else [[0]]
    if int(world["size"]) != ours or saved != [list(g) for g in groups]:
        raise CheckpointError(
            f"{path}: saved by {world['size']} ranks in fast groups {saved}, this run has "
            f"{ours} in {groups}: rows are sharded by fast group and data positions are "
            "per rank, so resume it with the same launch (ranks per node and nodes)"
        )
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

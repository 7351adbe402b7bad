"""How any checkpoint (full or delta) is written and verified: files, manifest, commit.

A checkpoint is a directory with ``manifest.json`` listing every file's size and sha256.
:func:`commit` writes one: each rank writes its files into ``<path>.tmp`` (one process:
its files at the top; several ranks: ``rank<r>/``), rank 0 the dense state
(``dense.pt``), the ranks agree that all of them succeeded, rank 0 writes the manifest,
fsyncs and renames the directory into place (the directory must be on a file system
every rank sees). :func:`read_manifest` checks a checkpoint before anything loads it.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from terarec.config import Config, config_to_dict
from terarec.ps.state import dense_state_only
from terarec.ps.tiers.ssd import SSDTierError
from terarec.runtime import DistHandles
from terarec.trainer.ranks import all_fast_groups

if TYPE_CHECKING:
    from terarec.trainer.components import Components

log = logging.getLogger("terarec.trainer")

# 1: every row in tables.pt; 2: tables with an SSD tier in snapshots (``ssd.json``);
# 3: a delta (``kind: delta``: the rows changed since its parent); 4: a full checkpoint
# whose in-memory tables' rows are in ``rows.<i>.safetensors`` chunks (streamed) and
# whose SSD tier snapshots come with the caches' copies (``ssd_cached.safetensors``)
# instead of the caches written through before the snapshot.
FORMATS = (1, 2, 3, 4)
DELTA_FORMAT = 3
CHUNK_FILE = re.compile(r"rows\.(\d+)\.safetensors")
# what a one-process full checkpoint holds besides manifest.json (ssd.json: if snapshotted)
REQUIRED_FILES = ("tables.pt", "dense.pt", "data.json", "rng.pt")
LOCAL_FILE = "dense_local.pt"  # per rank with k-step merging: its dense optimizer state


@dataclass
class Capture:
    """One rank's part of a checkpoint, taken at its step (the training loop pauses
    for this only), written later by :func:`commit` (on another thread while training
    goes on, with ``train.async_checkpoint``): it holds copies, never live state."""

    bad: Optional[str]  # the first NaN/Inf found (then nothing is written)
    write: Callable[[Path], list[str]]  # this rank's files into a directory -> their names
    dense: dict[str, Any]  # dense.pt: weights, optimizer, replica sync (rank 0 writes it)
    local: Optional[dict[str, Any]]  # dense_local.pt (k-step: each replica's own), or None
    stage: Optional[Path] = None  # where files were staged while taking it (rows.py)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or of another model."""


class NonFiniteState(CheckpointError):
    """The rows or dense weights to save hold NaN/Inf; no checkpoint was written."""


class _KeepsWriteErrors:
    """A binary file for ``torch.save`` that remembers the ``OSError`` of a failed write:
    torch's zip writer reports one as ``RuntimeError: unexpected pos ...``."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None
        self.name = f.name  # the path, as a file object has it

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``; a failed write (a full disk) raises its ``OSError``
    (naming ``path``), not torch's ``RuntimeError``."""
    with open(path, "wb") as f:
        w = _KeepsWriteErrors(f)
        try:
            torch.save(obj, w)  # type: ignore[arg-type]
        except RuntimeError as e:
            if w.error is None:
                raise
            raise OSError(w.error.errno, f"{w.error.strerror}: {path}") from e


def rank_files(manifest: dict[str, Any], rank_dir: Optional[str] = None) -> list[str]:
    """The files each rank (or the one process) of a checkpoint writes; with
    ``rank_dir`` (``""`` or ``"rank<r>/"``) also that rank's row chunks, in order."""
    if manifest.get("kind") == "delta":
        return ["rows.safetensors", "tables.pt", "data.json", "rng.pt"]
    if rank_dir is None:
        return ["tables.pt", "data.json", "rng.pt"]
    cached = [n for n in ("ssd_cached.safetensors",) if f"{rank_dir}{n}" in manifest["files"]]
    return ["tables.pt", "data.json", "rng.pt", *row_chunks(manifest, rank_dir), *cached]


def row_chunks(manifest: dict[str, Any], rank_dir: str) -> list[str]:
    """The ``rows.<i>.safetensors`` files of ``rank_dir`` a full checkpoint lists, by
    ``i`` (names relative to the rank's directory)."""
    found = []
    for name in manifest["files"]:
        m = CHUNK_FILE.fullmatch(name[len(rank_dir):]) if name.startswith(rank_dir) else None
        if m is not None:
            found.append((int(m.group(1)), name[len(rank_dir):]))
    return [n for _, n in sorted(found)]


def required_files(manifest: dict[str, Any]) -> list[str]:
    """The files a checkpoint with this manifest must hold."""
    mine = rank_files(manifest)
    world = manifest.get("world")
    if not world:
        return ["dense.pt", *mine]
    return ["dense.pt"] + [f"rank{r}/{n}" for r in range(int(world["size"])) for n in mine]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: Path) -> None:
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


def all_finite(t: torch.Tensor, block: int = 1 << 20) -> bool:
    """Whether ``t`` holds no NaN/Inf, checked ``block`` values at a time (``isfinite``
    of a whole table would allocate several copies of it)."""
    return all(bool(torch.isfinite(b).all()) for b in t.reshape(-1).split(block))


def first_non_finite(tables: dict[str, Any], model: dict[str, Any]) -> Optional[str]:
    """Names the first table or dense tensor holding a NaN or Inf, or None."""
    for name, t in tables.items():
        if "rows" in t and not all_finite(t["rows"]):
            return f"table {name!r} has NaN/Inf rows"
    for name, v in model.items():
        if torch.is_tensor(v) and v.is_floating_point() and not all_finite(v):
            return f"dense weight {name!r} has NaN/Inf values"
    return None


def capture(parts: Components, source: Any, bad: Optional[str],
            write_files: Callable[[Path], list[str]]) -> Capture:
    """A :class:`Capture` of this rank: ``write_files`` (its table files, from copies
    taken already) plus what every checkpoint of a rank holds: the data position, the
    RNG state, the dense weights and optimizer states (copied now)."""
    position = source.state_dict() if hasattr(source, "state_dict") else {}
    rng = torch.get_rng_state()
    with dense_state_only(parts.model):  # the rows are the table files' (written apart)
        model = {k: v.detach().clone() for k, v in parts.model.state_dict().items()}
    optimizer = copy.deepcopy(parts.dense_optimizer.state_dict())
    dense = {"model": model, "optimizer": optimizer,
             "optimizer_class": type(parts.dense_optimizer).__name__,
             "sync": copy.deepcopy(parts.sync.state_dict())}
    own = parts.sync.local_state_dict()
    local = None if own is None else {"optimizer": optimizer, "sync": copy.deepcopy(own)}

    def write(out: Path) -> list[str]:
        names = write_files(out)
        (out / "data.json").write_text(json.dumps(position))
        save_torch({"torch": rng}, out / "rng.pt")
        return [*names, "data.json", "rng.pt"]

    return Capture(bad or first_non_finite({}, model), write, dense, local)


def describe(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file ``root/name``, fsynced first."""
    out = {}
    for n in names:
        fsync(root / n)
        out[n] = {"bytes": (root / n).stat().st_size, "sha256": sha256(root / n)}
    return out


def fresh_tmp(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _manifest(step: int, samples: int, cfg: Config, files: dict[str, Any],
              extra: dict[str, Any], world: Optional[dict] = None) -> dict[str, Any]:
    out: dict[str, Any] = {"format": 1, "step": step, "samples": samples, **extra,
                           "config": config_to_dict(cfg)}
    if world is not None:
        out["world"] = world
    out["files"] = dict(sorted(files.items()))
    return out


def _write_manifest(tmp: Path, manifest: dict[str, Any]) -> None:
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    fsync(tmp / "manifest.json")
    fsync(tmp)


def replace(tmp: Path, path: Path, retire_to: Optional[Path] = None) -> None:
    """Renames the complete ``tmp`` to ``path``; the old directory goes only after
    (to ``retire_to`` when given, else deleted)."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    # The new checkpoint is in place: from here on nothing fails the save (the caller
    # would drop what the new checkpoint points at, e.g. its SSD tier snapshot).
    try:
        fsync(path.parent)  # the renames; only then may the old checkpoint go
    except OSError as e:
        log.warning("checkpoint %s: cannot fsync its directory (%s); the previous "
                    "checkpoint is kept in %s", path, e, old)
        return
    try:
        if retire_to is not None and old.exists():
            retire_to.parent.mkdir(parents=True, exist_ok=True)
            if retire_to.exists():
                shutil.rmtree(retire_to)
            os.replace(old, retire_to)
            fsync(retire_to.parent)
    except OSError as e:
        log.warning("checkpoint %s: cannot keep the previous one as %s (%s)", path,
                    retire_to, e)
    shutil.rmtree(old, ignore_errors=True)


def _gather(obj: Any, d: DistHandles, group: Any = None) -> list[Any]:
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj, group=d.world if group is None else group)
    return out


def fast_groups(d: DistHandles) -> list[list[int]]:
    return [list(g) for g in all_fast_groups(d)]


def commit(path: Path, parts: Components, step: int, cfg: Config, samples: int,
           taken: Capture, extra: dict[str, Any], retire_to: Optional[Path] = None,
           group: Any = None) -> None:
    """Writes a checkpoint directory ``path`` atomically (see the module docstring).

    Args:
        taken: this rank's part, taken at ``step`` (:func:`capture`).
        extra: manifest fields (``format``, ``kind``, ``parent``, ...).
        retire_to: where the directory ``path`` held before goes (see :func:`replace`).
        group: the process group the ranks agree over (default: the world); a commit on
            a background thread needs one of its own.

    Raises:
        NonFiniteState: a row or dense weight is NaN/Inf (on any rank); nothing written.
        CheckpointError: an OS error (full disk, permissions) while writing, on any rank.
    """
    d = parts.dist
    if d is not None and d.world_size > 1:
        _commit_sharded(path, step, cfg, samples, taken, extra, retire_to, d, group)
        return
    if taken.bad is not None:
        # Saving would replace the last good checkpoint with one nobody can resume from.
        raise NonFiniteState(f"{taken.bad}; {path} was not written")
    tmp = fresh_tmp(path)
    try:
        names = taken.write(tmp)
        save_torch(taken.dense, tmp / "dense.pt")
        files = describe(tmp, [*names, "dense.pt"])
        _write_manifest(tmp, _manifest(step, samples, cfg, files, extra))
    except BaseException as e:
        # Whatever failed (disk full, an unpicklable object, Ctrl-C), leave no half dir.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SSDTierError)):
            raise CheckpointError(f"cannot write checkpoint {path}: {e}") from e
        raise
    replace(tmp, path, retire_to)


def _commit_sharded(path: Path, step: int, cfg: Config, samples: int, taken: Capture,
                    extra: dict[str, Any], retire_to: Optional[Path], d: DistHandles,
                    group: Any) -> None:
    """:func:`commit` of one rank of a multi-rank run (a collective)."""
    tmp = path.with_name(path.name + ".tmp")
    err: Optional[str] = None
    if d.rank == 0:
        try:
            fresh_tmp(path)
        except OSError as e:
            err = f"rank 0: {e}"
    errs = [e for e in _gather(err, d, group) if e]  # also: nobody writes before tmp exists
    if errs:
        raise CheckpointError(f"cannot write checkpoint {path}: {errs[0]}")
    mine = f"rank{d.rank}"
    bad = taken.bad
    files: dict[str, Any] = {}
    try:
        if bad is None:
            (tmp / mine).mkdir(parents=True, exist_ok=True)
            names = taken.write(tmp / mine)
            if taken.local is not None:
                save_torch(taken.local, tmp / mine / LOCAL_FILE)
                names.append(LOCAL_FILE)
            if d.rank == 0:
                save_torch(taken.dense, tmp / "dense.pt")
            files = describe(tmp, [f"{mine}/{n}" for n in names]
                             + (["dense.pt"] if d.rank == 0 else []))
            fsync(tmp / mine)
    except (OSError, SSDTierError) as e:
        err = str(e)
    reports = _gather((None if bad is None else f"rank {d.rank}: {bad}",
                       None if err is None else f"rank {d.rank}: {err}", files,
                       tuple(d.fast_ranks)), d, group)
    groups = [list(g) for g in sorted({r[3] for r in reports})]  # as all_fast_groups
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
                    _write_manifest(tmp, _manifest(step, samples, cfg, every, extra, world))
                    replace(tmp, path, retire_to)
            except (OSError, CheckpointError) as e:
                result = f"cannot write checkpoint {path}: {e}"
        if bads or errs or result:
            shutil.rmtree(tmp, ignore_errors=True)
    if bads:
        raise NonFiniteState(f"{bads[0]}; {path} was not written")
    if errs:
        raise CheckpointError(f"cannot write checkpoint {path}: {errs[0]}")
    result = _gather(result, d, group)[0]
    if result:
        raise CheckpointError(result)


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
            verify_files(path, manifest, [name])
    return manifest


def verify_files(path: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """Compares the sha256 of files ``names`` with the manifest."""
    for name in names:
        if sha256(path / name) != manifest["files"][name]["sha256"]:
            raise CheckpointError(f"{path / name}: sha256 does not match the manifest (corrupted)")


def manifest_sha256(path: Path) -> str:
    """The sha256 of a checkpoint's ``manifest.json`` (what a delta names its parent by)."""
    return sha256(Path(path) / "manifest.json")

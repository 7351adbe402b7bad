"""Checkpoints: rows + dense weights + optimizer states + data position, atomically.

Layout of ``<dir>/``::

    manifest.json   format version, step, samples, the run's config, and the size +
                    sha256 of every file below
    tables.pt       per table: keys [R], rows [R, dim + state], optimizer step; a tiered
                    table's rows come from all its tiers (device, host, SSD), the
                    freshest copy of each, after a flush of every tier; with admission,
                    the first table of each group also holds the group's count-min
                    sketch (counters, decay phase, counts), so a resume admits the same
                    keys at the same steps
    dense.pt        model state_dict (MLPs), dense optimizer state_dict and class name
    data.json       the train source's position (exact resume)
    rng.pt          torch RNG state

The directory is written under a temporary name, fsynced and renamed into place, so a
crash or power loss mid-save never leaves a half checkpoint where a complete one is
expected. State holding NaN/Inf is refused rather than saved over a good checkpoint.
Loading checks the manifest's sizes and hashes and names the file that does not match.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from terarec.config import Config, config_to_dict

if TYPE_CHECKING:
    from terarec.trainer.loop import Components

FORMAT = 1
REQUIRED_FILES = ("tables.pt", "dense.pt", "data.json", "rng.pt")


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
    """Names the first table or dense tensor holding a NaN or Inf, or None."""
    for name, t in tables.items():
        if not bool(torch.isfinite(t["rows"]).all()):
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
    complete new one, never a renamed directory of empty files.

    Args:
        path: the checkpoint directory, e.g. ``runs/<name>/checkpoint``.
        parts: the run's embedding, model and dense optimizer.
        source: the train batch source (its ``state_dict()`` is the data position).
        step: training steps taken so far.
        cfg: the run's config (stored in the manifest, so ``terarec eval`` can rebuild it).
        samples: training samples seen so far (restored on resume).

    Returns:
        ``path``.

    Raises:
        NonFiniteState: a row or dense weight is NaN/Inf; nothing was written.
        CheckpointError: an OS error (full disk, permissions) while writing.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        parts.embedding.flush()
        tables = parts.embedding.tables_state_dict()
        model = parts.model.state_dict()
        bad = _first_non_finite(tables, model)
        if bad is not None:
            # Saving would replace the last good checkpoint with one nobody can resume from.
            raise NonFiniteState(f"{bad}; {path} was not written")
        torch.save(tables, tmp / "tables.pt")
        torch.save(
            {
                "model": model,
                "optimizer": parts.dense_optimizer.state_dict(),
                "optimizer_class": type(parts.dense_optimizer).__name__,
            },
            tmp / "dense.pt",
        )
        state = source.state_dict() if hasattr(source, "state_dict") else {}
        (tmp / "data.json").write_text(json.dumps(state))
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "format": FORMAT,
            "step": step,
            "samples": samples,
            "config": config_to_dict(cfg),
            "files": {
                n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for n in [*files, "manifest.json"]:
            _fsync(tmp / n)
        _fsync(tmp)
    except BaseException as e:
        # Whatever failed (disk full, an unpicklable object, Ctrl-C), leave no half dir.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {e}") from e
        raise
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
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')}, expected {FORMAT}")
    unlisted = [n for n in REQUIRED_FILES if n not in files]
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
        if verify and _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (corrupted)")
    return manifest


def load_checkpoint(path: Path, parts: Components, source: Any = None) -> int:
    """Restores rows, dense weights, optimizer states (and data position); returns step.

    Every file is verified against the manifest (size and sha256) before anything is
    loaded, so a corrupted checkpoint fails here rather than training on bad rows.
    A tiered table's rows all go into its bottom tier (the SSD tier, or the unbounded
    host tier); its caches start empty (the rows and the math are the same wherever a
    row lives, so training continues bit for bit).

    Args:
        path: the checkpoint directory.
        parts: the freshly built components of the run to restore into.
        source: the train batch source to move to the saved position (optional).

    Raises:
        CheckpointError: a file is missing, truncated or corrupted (named in the
            message), or the checkpoint was saved by a model of another shape.
    """
    path = Path(path)
    manifest = read_manifest(path)
    try:
        parts.embedding.load_tables_state_dict(
            torch.load(path / "tables.pt", map_location=parts.device, weights_only=True)
        )
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
        if source is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(json.loads((path / "data.json").read_text()))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{path}: does not fit this model/config: {e}") from e
    return int(manifest["step"])

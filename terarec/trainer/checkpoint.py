"""Checkpoints: rows + dense weights + optimizer states + data position, atomically.

Layout of ``<dir>/``::

    manifest.json   step, format version, and size + sha256 of every file below
    tables.pt       per table: keys [R], rows [R, dim + state], optimizer step
    dense.pt        model state_dict (MLPs), dense optimizer state_dict
    data.json       the train source's position (exact resume)
    rng.pt          torch RNG state

The directory is written under a temporary name and renamed into place, so a crash
mid-save never leaves a half checkpoint where a complete one is expected. Loading checks
the manifest's sizes and hashes and names the file that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from terarec.config import Config, config_to_dict

if TYPE_CHECKING:
    from terarec.trainer.loop import Components

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or of another model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: Path, parts: Components, source: Any, step: int, cfg: Config) -> Path:
    """Writes a checkpoint of the run to ``path`` (replacing an older one atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for t in parts.embedding.tables:
            t.tier.flush()
        torch.save(parts.embedding.tables_state_dict(), tmp / "tables.pt")
        torch.save(
            {"model": parts.model.state_dict(), "optimizer": parts.dense_optimizer.state_dict()},
            tmp / "dense.pt",
        )
        state = source.state_dict() if hasattr(source, "state_dict") else {}
        (tmp / "data.json").write_text(json.dumps(state))
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "format": FORMAT,
            "step": step,
            "config": config_to_dict(cfg),
            "files": {
                n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {e}") from e
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_manifest(path: Path, verify: bool = True) -> dict[str, Any]:
    """The checkpoint's manifest, after checking every file's size (and hash)."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: corrupted manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')}, expected {FORMAT}")
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
    """Restores rows, dense weights, optimizer states (and data position); returns step."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        parts.embedding.load_tables_state_dict(
            torch.load(path / "tables.pt", map_location=parts.device, weights_only=True)
        )
        dense = torch.load(path / "dense.pt", map_location=parts.device, weights_only=True)
        parts.model.load_state_dict(dense["model"])
        parts.dense_optimizer.load_state_dict(dense["optimizer"])
        if source is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(json.loads((path / "data.json").read_text()))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: does not fit this model/config: {e}") from e
    return int(manifest["step"])

"""A run's checkpoints over time: where each lives, which to keep, which to resume.

Layout of a run directory's checkpoints::

    checkpoint/              the newest full checkpoint
    checkpoints/step<N>/     older full checkpoints kept (``train.keep_checkpoints``)
    deltas/step<N>/          delta checkpoints (``train.delta_every``), each naming its
                             parent (``delta.py``)

Keeping the last K full checkpoints keeps the deltas that follow them and deletes the
rest (and, per rank, the SSD tier snapshots no kept full checkpoint points at).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch.distributed as dist

from terarec.config import Config
from terarec.trainer.checkpoint import ssd_snapshot
from terarec.trainer.checkpoint.delta import capture_delta, delta_manifest
from terarec.trainer.checkpoint.files import (
    CheckpointError,
    commit,
    manifest_sha256,
    read_manifest,
)
from terarec.trainer.checkpoint.full import capture_full, commit_full

if TYPE_CHECKING:
    from terarec.trainer.components import Components

log = logging.getLogger("terarec.trainer")

FULL, KEPT, DELTAS = "checkpoint", "checkpoints", "deltas"
_STEP = re.compile(r"step(\d+)$")


def save(run_dir: Path, parts: Components, source: Any, step: int, cfg: Config,
         samples: int, parent: Optional[Path] = None) -> Path:
    """Saves the run's checkpoint of ``step`` (a collective with several ranks): a delta
    after ``parent`` when given, else a full one into ``checkpoint/`` (the one it
    replaces kept as ``checkpoints/step<N>/`` while ``train.keep_checkpoints`` allows);
    then prunes what is no longer kept. Returns the checkpoint's directory."""
    return prepare(run_dir, parts, source, step, cfg, samples, parent)()


def prepare(run_dir: Path, parts: Components, source: Any, step: int, cfg: Config,
            samples: int, parent: Optional[Path] = None, group: Any = None
            ) -> Callable[[], Path]:
    """Takes the checkpoint of ``step`` (:func:`save`) now and returns the call that
    writes it. Taking it is what pauses training: the caches' rows of SSD tables copied,
    the SSD tier snapshotted, the in-memory tables' and the changed rows exported, the dense
    state copied; the changes recorded for the next delta start over. The returned call
    writes, commits and prunes, on any thread (training may go on meanwhile); with
    several ranks every rank calls both, and the writing call's collectives run over
    ``group`` (default: the world; a background thread needs a group of its own).
    ``parent`` must be committed (written) when this is called."""
    run_dir = Path(run_dir)
    d = parts.dist
    multi = d is not None and d.world_size > 1
    if parent is not None:
        taken = capture_delta(parts, source, step)
        extra = delta_manifest(parent)
        parts.embedding.clear_changes()
        path = delta_path(run_dir, step)

        def finish_delta() -> Path:
            commit(path, parts, step, cfg, samples, taken, extra, group=group)
            return path
        return finish_delta
    taken, snap, fmt = capture_full(parts, source, step, run_dir / FULL)
    parts.embedding.clear_changes()

    def finish_full() -> Path:
        main = d is None or d.rank == 0
        keep = cfg.train.keep_checkpoints
        path = run_dir / FULL
        leftover = run_dir / (FULL + ".old")  # a save killed between its two renames
        if main and keep > 1 and (leftover / "manifest.json").is_file():
            at = _step_of(leftover)
            if at is not None and not retired_path(run_dir, at).exists():
                retired_path(run_dir, at).parent.mkdir(parents=True, exist_ok=True)
                leftover.rename(retired_path(run_dir, at))  # kept, not deleted
        prev = _step_of(path) if (path / "manifest.json").is_file() else None
        best = best_step(run_dir)  # the best checkpoint (train.keep_best) is kept too
        retire = (retired_path(run_dir, prev)
                  if (keep > 1 or prev == best) and prev not in (None, step) else None)
        commit_full(path, parts, step, cfg, samples, taken, snap, fmt, retire, group)
        if main:
            prune(run_dir, keep, best)
        if multi:
            assert d is not None
            dist.barrier(group=d.world if group is None else group)  # the kept set is final
        ssd_snapshot.keep_only(snap, kept_snapshots(run_dir, f"rank{d.rank}/" if multi and d
                                                    else ""))
        return path
    return finish_full


def run_dir_of(path: Path) -> Path:
    """The run directory a checkpoint directory belongs to."""
    path = Path(path)
    stepped = _STEP.match(path.name) and path.parent.name in (KEPT, DELTAS)
    return path.parent.parent if stepped else path.parent


def retired_path(run_dir: Path, step: int) -> Path:
    """Where a full checkpoint of ``step`` goes when a newer one replaces it."""
    return Path(run_dir) / KEPT / f"step{step}"


def delta_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / DELTAS / f"step{step}"


def _stepped(root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of the ``step<N>`` directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _step_of(path: Path) -> Optional[int]:
    try:
        return int(read_manifest(path, verify=False)["step"])
    except CheckpointError:
        return None


def fulls(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's full checkpoints ``(step, dir)``, oldest first (``checkpoint.old/``, a
    save killed between its two renames, included)."""
    run_dir = Path(run_dir)
    out = list(_stepped(run_dir / KEPT))
    for name in (FULL, FULL + ".old"):
        step = _step_of(run_dir / name) if (run_dir / name / "manifest.json").is_file() else None
        if step is not None:
            out.append((step, run_dir / name))
    return sorted(out)


def deltas(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's delta checkpoints ``(step, dir)``, oldest first."""
    return _stepped(Path(run_dir) / DELTAS)


def find_full(run_dir: Path, step: int, sha: str) -> Optional[Path]:
    """The full checkpoint of ``step`` whose manifest has sha256 ``sha``, if kept."""
    for s, p in fulls(run_dir):
        if s == step and manifest_sha256(p) == sha:
            return p
    return None


def best_step(run_dir: Path) -> Optional[int]:
    """The step of the run's best checkpoint (``best.json``, ``trainer/best.py``)."""
    from terarec.trainer.best import read_best

    best = read_best(run_dir)
    return None if best is None else int(best["step"])


def prune(run_dir: Path, keep: int, protect: Optional[int] = None) -> None:
    """Keeps the newest ``keep`` full checkpoints (and the one of step ``protect``: the
    best) and the deltas that follow the newest ``keep``."""
    run_dir = Path(run_dir)
    kept = fulls(run_dir)
    for s, p in kept[:-keep]:
        if s != protect:
            shutil.rmtree(p, ignore_errors=True)
    bases = {(s, manifest_sha256(p)) for s, p in kept[-keep:]}
    for _, p in deltas(run_dir):
        try:
            base = read_manifest(p, verify=False).get("base") or {}
        except CheckpointError:
            base = {}
        if (base.get("step"), base.get("manifest_sha256")) not in bases:
            shutil.rmtree(p, ignore_errors=True)


def drop_after(run_dir: Path, step: int) -> None:
    """Deletes the checkpoints past ``step``, full or delta: a run resumed at ``step``
    (from an older checkpoint than its newest) writes that future again, and a newer
    checkpoint of the abandoned one must not be taken for it (``--resume auto``)."""
    # newest first: a kill midway leaves no newer abandoned checkpoint than one deleted
    from terarec.trainer.best import FILE

    best = best_step(run_dir)
    if best is not None and best > step:  # the abandoned future's best
        (Path(run_dir) / FILE).unlink(missing_ok=True)
    for s, p in sorted(fulls(run_dir) + deltas(run_dir), key=lambda c: c[0], reverse=True):
        if s > step:
            shutil.rmtree(p, ignore_errors=True)


def kept_snapshots(run_dir: Path, rank_dir: str) -> list[dict[str, Any]]:
    """The SSD tier snapshot records the kept full checkpoints of ``rank_dir`` (``""``
    or ``"rank<r>/"``) point at."""
    out = []
    for _, p in fulls(run_dir):
        f = p / f"{rank_dir}{ssd_snapshot.FILE}"
        try:
            out.append(ssd_snapshot.load_record(f))
        except (OSError, ValueError):  # none, or being pruned by rank 0 right now
            continue
    return out


def latest_valid(run_dir: Path) -> Optional[Path]:
    """The run's newest checkpoint that verifies, for ``--resume auto``: full or delta,
    every file of it and of the checkpoints a restore reads before it (a delta's chain)
    checked by size and sha256, the SSD tier snapshots' files too; None when there is
    none (the run starts fresh). A damaged one is skipped with a warning."""
    from terarec.trainer.checkpoint.delta import chain

    run_dir = Path(run_dir)
    cands = sorted(fulls(run_dir) + deltas(run_dir), key=lambda c: c[0], reverse=True)
    for _, cand in cands:
        try:
            for path, manifest in chain(cand, read_manifest(cand, verify=False)):
                read_manifest(path, verify=True)
                for name in manifest["files"]:
                    if name.endswith(ssd_snapshot.FILE):
                        ssd_snapshot.verify(ssd_snapshot.load_record(path / name))
        except (CheckpointError, ssd_snapshot.SnapshotError) as e:
            log.warning("--resume auto: skipping %s: %s", cand, e)
            continue
        return cand
    return None

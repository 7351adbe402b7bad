"""Delta checkpoints: the rows changed since the previous checkpoint, and the dense state.

A delta is a checkpoint directory like a full one (``manifest.json``, ``dense.pt``,
``data.json``, ``rng.pt``, per rank with several ranks) whose manifest has ``kind:
"delta"`` and names its ``parent`` (the checkpoint it follows: the full one or the
previous delta) and its ``base`` (the full checkpoint the chain starts from), each by
step and the sha256 of its ``manifest.json``. Instead of every row it holds::

    rows.safetensors   per table <name>: "<name>/keys" int64 [C] ascending, the keys
                       whose row changed since the parent; "<name>/rows" float32
                       [C, dim + state] their rows (weights, then the sparse optimizer's
                       state); "<name>/last" int64 [C] each row's last training step;
                       "<name>/deleted" int64 [D] keys that have no row any more (TTL),
                       or never had one (a reader skips those)
    tables.pt          per table: its optimizer state (step counter), row count and,
                       with admission, the group's sketch, as at this step

Restoring a delta restores its base, then applies every delta of the chain in order:
per table, the deleted keys are removed, the changed rows written (replacing the old
row of the key, or adding one). The result is the state a full checkpoint at the
delta's step holds, bit for bit. The rows changed since the parent are those the
training steps since then prepared, the k-step merges overwrote and the TTL sweeps
deleted (``ps/changes.py``), read through the tiers at save time: O(changed rows).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from terarec.config import Config
from terarec.ps.tiers.protocol import LAST, META_WIDTH
from terarec.ps.tiers.ssd import SSDStore, SSDTier
from terarec.trainer.checkpoint.files import (
    DELTA_FORMAT,
    Capture,
    CheckpointError,
    capture,
    commit,
    first_non_finite,
    manifest_sha256,
    read_manifest,
    save_torch,
)

if TYPE_CHECKING:
    from terarec.trainer.components import Components

ROWS = "rows.safetensors"
Link = tuple[Path, dict[str, Any]]  # a checkpoint of a chain: (directory, manifest)


def save_delta(path: Path, parts: Components, source: Any, step: int, cfg: Config,
               samples: int, parent: Path) -> Path:
    """Writes a delta checkpoint at ``path`` holding what changed since ``parent``
    (the run's last checkpoint, full or delta; its changes were recorded since it was
    written: ``HierarchicalEmbeddingBagCollection.track_changes``). A collective with
    several ranks. The caller clears the recorded changes once this returns.

    Raises:
        NonFiniteState: a changed row or dense weight is NaN/Inf; nothing was written.
        CheckpointError: an OS error while writing, on any rank.
    """
    commit(Path(path), parts, step, cfg, samples, capture_delta(parts, source, step),
           delta_manifest(parent))
    return Path(path)


def delta_manifest(parent: Path) -> dict[str, Any]:
    """The manifest fields of a delta written after ``parent`` (a committed checkpoint)."""
    parent_m = read_manifest(parent, verify=False)
    base = parent_m.get("base") or {"step": int(parent_m["step"]),
                                    "manifest_sha256": manifest_sha256(parent)}
    return {
        "format": DELTA_FORMAT,
        "kind": "delta",
        "parent": {"kind": parent_m.get("kind", "full"), "step": int(parent_m["step"]),
                   "manifest_sha256": manifest_sha256(parent)},
        "base": base,
    }


def capture_delta(parts: Components, source: Any, step: int) -> Capture:
    """This rank's part of a delta of ``step``, taken now: the changed rows read
    through the tiers (copies), the tables' other state, the dense state."""
    changed = parts.embedding.changed_state()
    bad = first_non_finite(changed, {})
    tensors = {f"{name}/{field}": t.detach().to("cpu", copy=True).contiguous()
               for name, c in changed.items() for field, t in c.items()}
    states = {}
    for t in parts.embedding.tables:  # no rows: the optimizer, row count, sketch
        states[t.name] = copy.deepcopy(
            {k: v for k, v in t.state_dict(rows=False).items() if k != "ssd"})

    def write_files(out: Path) -> list[str]:
        from safetensors.torch import save_file

        save_file(tensors, out / ROWS, metadata={"step": str(step)})
        save_torch(states, out / "tables.pt")
        return [ROWS, "tables.pt"]

    return capture(parts, source, bad, write_files)


def read_changes(path: Path, rank_dir: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """A delta's changes of one rank: ``{table: {"keys", "rows", "deleted"}}``."""
    from terarec.trainer.checkpoint.rows import read_by_table

    return read_by_table(Path(path) / f"{rank_dir}{ROWS}")


def chain(path: Path, manifest: dict[str, Any]) -> list[Link]:
    """The checkpoints a restore of ``path`` reads, base first: ``[(path, manifest)]``
    for a full one; the base and every delta up to ``path`` for a delta. Each link is
    found in the run directory (full: ``checkpoint/`` or ``checkpoints/step<N>/``;
    delta: ``deltas/step<N>/``) and checked against the sha256 its child names."""
    from terarec.trainer.checkpoint.history import find_full, run_dir_of

    links: list[Link] = [(Path(path), manifest)]
    run = run_dir_of(Path(path))
    while links[0][1].get("kind") == "delta":
        child, m = links[0]
        want = m["parent"]
        if want["kind"] == "delta":
            cand: Optional[Path] = run / "deltas" / f"step{want['step']}"
        else:
            cand = find_full(run, int(want["step"]), want["manifest_sha256"])
        if cand is None or not (cand / "manifest.json").is_file():
            raise CheckpointError(
                f"{child}: its parent, the {want['kind']} checkpoint of step {want['step']}, "
                f"is not in {run} (deleted, or the delta was moved without it)")
        if manifest_sha256(cand) != want["manifest_sha256"]:
            raise CheckpointError(
                f"{cand}: is not the parent {child} was written after (its manifest's "
                "sha256 differs: a checkpoint of another run, or rewritten)")
        links.insert(0, (cand, read_manifest(cand, verify=False)))
    return links


SSDWriter = Callable[[str, dict[str, torch.Tensor], int], None]


def apply(tables: dict[str, Any], deltas: list[Link], rank_dir: str,
          write_ssd: Optional[SSDWriter] = None) -> dict[str, Any]:
    """Applies ``deltas`` (in order) to a base's table states ``tables`` and returns them.

    A table held in memory (``keys`` / ``rows``) is merged in memory; a table whose rows
    are in the base's SSD snapshot (``ssd: True``) gets each delta's changes passed to
    ``write_ssd(table, changes, delta step)`` (:func:`ssd_writer`: into the restored SSD
    store). The tables' other state (optimizer step, sketch) is the last delta's.
    """
    for path, manifest in deltas:
        step = int(manifest["step"])
        states = torch.load(Path(path) / f"{rank_dir}tables.pt", map_location="cpu",
                            weights_only=True)
        for name, change in read_changes(path, rank_dir).items():
            if name not in tables:
                raise CheckpointError(f"{path}: delta of table {name!r}, not in its base")
            t = tables[name]
            if "rows" in t:
                t["keys"], t["rows"] = merge(t["keys"], t["rows"], change)
            elif write_ssd is None:
                raise CheckpointError(f"{path}: table {name!r} is in an SSD tier "
                                      "snapshot, and this run has no SSD tier")
            else:
                write_ssd(name, change, step)
        for name, state in states.items():
            if name in tables:
                tables[name].update(state)
    return tables


def ssd_writer(store: Optional[SSDStore], table_ids: dict[str, int],
               widths: dict[str, int]) -> Optional[SSDWriter]:
    """Writes a delta's changes of a table into ``store`` (its id in the store
    ``table_ids[name]``, its row width ``widths[name]``); None without a store."""
    if store is None:
        return None

    def write(name: str, change: dict[str, torch.Tensor], step: int) -> None:
        _apply_ssd(store, {"table_id": table_ids[name], "row_width": widths[name]},
                   change, step)
    return write


def merge(keys: torch.Tensor, rows: torch.Tensor, change: dict[str, torch.Tensor]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys [R]`` / ``rows [R, W]`` with one delta applied: ``change["deleted"]`` and
    the changed keys' old rows dropped, the changed ``rows`` appended."""
    new_keys = change["keys"].to(keys.device)
    gone = torch.cat([new_keys, change["deleted"].to(keys.device)])
    keep = ~torch.isin(keys, gone)
    return (torch.cat([keys[keep], new_keys]),
            torch.cat([rows[keep], change["rows"].to(rows.device, rows.dtype)]))


def _apply_ssd(store: SSDStore, table: dict[str, Any], change: dict[str, torch.Tensor],
               step: int) -> None:
    tier = SSDTier(store, table["row_width"], table_id=table["table_id"])
    if change["deleted"].numel():
        tier.delete(change["deleted"])
    keys = change["keys"]
    if keys.numel():
        meta = torch.zeros(keys.numel(), META_WIDTH, dtype=torch.int64)
        # each row's last use, as the SSD snapshot of a full checkpoint keeps it
        meta[:, LAST] = change["last"] if "last" in change else step
        tier.insert(keys, change["rows"], meta)

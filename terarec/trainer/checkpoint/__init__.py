"""Checkpoints: rows + dense weights + optimizer states + data position, atomically.

A run directory holds its newest full checkpoint in ``checkpoint/``, older full ones it
keeps in ``checkpoints/step<N>/`` and delta checkpoints in ``deltas/step<N>/``
(``history.py``). A checkpoint directory has ``manifest.json`` (format, step, samples,
the run's config, and the size + sha256 of every file) and:

- a full one (``full.py``): ``tables.pt`` (every row of the tables held in memory; the
  tables with an SSD tier in a RocksDB snapshot beside the DB, ``ssd.json`` pointing at
  it: ``ssd_snapshot.py``), ``dense.pt``, ``data.json``, ``rng.pt``;
- a delta (``delta.py``): ``rows.safetensors`` (the rows changed since its parent and
  the keys deleted), ``tables.pt`` (the tables' optimizer state, without rows) and the
  same dense / data / RNG files.

A multi-rank run writes the per-rank files into ``rank<r>/`` (rank 0 alone writes
``dense.pt``); every rank takes part in a save, the ranks agree that all of them
succeeded, and rank 0 renames the directory into place (``files.py``). A checkpoint is
written under a temporary name, fsynced and renamed, so a crash never leaves a half
checkpoint where a complete one is expected; state holding NaN/Inf is refused; loading
checks sizes and hashes and names the file that does not match. The format is described
for other programs in ``docs/checkpoints.md``.
"""

from terarec.trainer.checkpoint.delta import save_delta
from terarec.trainer.checkpoint.files import (
    FORMATS,
    REQUIRED_FILES,
    CheckpointError,
    NonFiniteState,
    read_manifest,
    required_files,
)
from terarec.trainer.checkpoint.full import (
    load_checkpoint,
    merge_shards,
    read_tables,
    save_checkpoint,
)
from terarec.trainer.checkpoint.history import latest_valid, save

__all__ = [
    "FORMATS",
    "REQUIRED_FILES",
    "CheckpointError",
    "NonFiniteState",
    "latest_valid",
    "load_checkpoint",
    "merge_shards",
    "read_manifest",
    "read_tables",
    "required_files",
    "save",
    "save_checkpoint",
    "save_delta",
]

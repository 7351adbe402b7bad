"""The rows of in-memory tables in a full checkpoint: streamed chunk files.

A full checkpoint (format 4) holds the rows of every table that is not in an SSD tier
snapshot as ``rows.<i>.safetensors`` files beside ``tables.pt`` (which then holds the
tables' other state only)::

    rows.<i>.safetensors   "<table>/keys" int64 [C], "<table>/rows" float32 [C, W]:
                           one chunk of one table's rows (at most ~64 MiB), in the
                           table's export order; a table's chunks are consecutive in i

They are written while the rows are read, chunk by chunk (an untiered table never has
all its rows copied at once; ``EmbeddingTable.export_chunks``), into a staging
directory beside the checkpoint (``<checkpoint>.stage/``) during the training loop's
pause, and moved into the checkpoint when it is committed (``files.commit``, maybe on
the background thread). safetensors: reading them runs no code from the file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from terarec.trainer.checkpoint.files import all_finite, row_chunks

if TYPE_CHECKING:
    from terarec.ps.embedding import HierarchicalEmbeddingBagCollection

CHUNK_BYTES = 64 << 20


def stage_dir(path: Path, rank_dir: str) -> Path:
    """Where a checkpoint of ``path`` stages this rank's chunks (emptied first)."""
    stage = Path(path).with_name(Path(path).name + ".stage") / rank_dir
    shutil.rmtree(stage, ignore_errors=True)  # a killed save's leftovers
    stage.mkdir(parents=True)
    return stage


def write_chunks(emb: HierarchicalEmbeddingBagCollection, stage: Path, names: list[str]
                 ) -> tuple[Optional[str], list[str]]:
    """Streams the rows of tables ``names`` into ``stage/rows.<i>.safetensors`` (each
    table at least one file, so an empty table keeps its row width). Returns (the first
    table holding NaN/Inf rows, if one does (writing stops there); the files written)."""
    files: list[str] = []
    for t in emb.tables:
        if t.name not in names:
            continue
        chunk = max(1, CHUNK_BYTES // (4 * t.row_width + 8))
        wrote = False
        for got_keys, got_rows in t.export_chunks(chunk):
            if not all_finite(got_rows):
                return f"table {t.name!r} has NaN/Inf rows", files
            # (a tiered table's export comes whole: written in chunks all the same)
            for keys, rows in zip(got_keys.split(chunk), got_rows.split(chunk)):
                if keys.numel() == 0:
                    continue
                name = f"rows.{len(files)}.safetensors"
                write_safetensors(stage / name, {f"{t.name}/keys": keys, f"{t.name}/rows": rows})
                files.append(name)
                wrote = True
        if not wrote:  # no chunk at all: an empty one
            name = f"rows.{len(files)}.safetensors"
            write_safetensors(stage / name, {f"{t.name}/keys": torch.empty(0, dtype=torch.int64),
                                             f"{t.name}/rows": torch.empty(0, t.row_width)})
            files.append(name)
    return None, files


_DTYPES = {torch.int64: "I64", torch.float32: "F32"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written straight from the tensors' memory: the header (its
    length as u64 LE, then JSON naming each tensor's dtype, shape and byte range), then
    the tensors' bytes (little-endian, as on x86-64). ``safetensors.torch.save_file``
    would first copy every tensor into a ``bytes`` object; the files read back with
    ``safetensors`` all the same."""
    cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    header: dict[str, Any] = {}
    offset = 0
    for k, t in cpu.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in cpu.values():
            if t.numel():
                f.write(memoryview(t.numpy()).cast("B"))


def move_chunks(stage: Path, files: list[str], out: Path) -> list[str]:
    """Moves the staged chunk files into the checkpoint's directory ``out``."""
    for name in files:
        os.replace(stage / name, out / name)
    drop_stage(stage)
    return list(files)


def drop_stage(stage: Path) -> None:
    """Removes this rank's staging directory (and ``<checkpoint>.stage/`` once every
    rank's is gone)."""
    shutil.rmtree(stage, ignore_errors=True)
    parent = stage if stage.name.endswith(".stage") else stage.parent
    try:
        parent.rmdir()
    except OSError:
        pass


def read_by_table(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A safetensors file of ``<table>/<field>`` tensors as ``{table: {field: t}}``."""
    from safetensors.torch import load_file

    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path)).items():
        table, _, field = key.rpartition("/")
        out.setdefault(table, {})[field] = t
    return out


def load_states(base: Path, rank_dir: str, manifest: dict[str, Any],
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """A full checkpoint's table states of ``rank_dir``: ``tables.pt``, with the rows of
    its chunk files (format 4) filled in as ``keys`` / ``rows``. The files are not
    verified here."""
    states = torch.load(Path(base) / f"{rank_dir}tables.pt", map_location=device,
                        weights_only=True)
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    for name in row_chunks(manifest, rank_dir):
        for table, fields in read_by_table(Path(base) / rank_dir / name).items():
            for field, tensor in fields.items():
                parts.setdefault(table, {}).setdefault(field, []).append(tensor)
    for table, fields in parts.items():
        states[table]["keys"] = torch.cat(fields["keys"]).to(device)
        states[table]["rows"] = torch.cat(fields["rows"]).to(device)
    return states

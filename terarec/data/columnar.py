"""The preprocessed columnar format: parsed, hashed rows as memory-mappable arrays.

A dataset is a directory written by ``terarec preprocess``::

    DIR/meta.json            format, features, dense transform, parts (written last)
    DIR/part-00000.bin       the chunks of source file 0, back to back
    DIR/part-00000.json      that part's chunk index (written when the part is complete)

A part holds the good rows of one source file in file order, cut into chunks of
``chunk_rows`` rows. A chunk of ``R`` rows, ``D`` dense and ``F`` sparse features with
``V_f`` keys for feature ``f`` is four little-endian arrays, each starting on a 64-byte
boundary (offsets relative to the chunk's start)::

    labels      float32 [R]
    dense       float32 [R, D]      the dense transform already applied
    lengths     int32   [F, R]      keys per (feature, row), feature-major like a KJT
    values      int64   [V_0 + ... + V_{F-1}]   feature 0's keys of rows 0..R-1, then 1, ...

so a batch of consecutive rows is a slice of each array (``values`` one slice per
feature) and reading a chunk is a page-in, not a parse. Keys are the int64 keys the text
readers produce (``terarec.data.keys``), so a model trained from the preprocessed data
sees exactly the keys it would see from the text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from terarec.data.errors import DataError
from terarec.data.rows import Rows

FORMAT = "terarec-columnar"
VERSION = 1
ALIGN = 64
META = "meta.json"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def chunk_layout(rows: int, num_dense: int, num_sparse: int, num_values: int) -> list[int]:
    """Byte offsets of (labels, dense, lengths, values, end) in a chunk."""
    sizes = [4 * rows, 4 * rows * num_dense, 4 * rows * num_sparse, 8 * num_values]
    offs = [0]
    for s in sizes:
        offs.append(_align(offs[-1] + s))
    return offs


def part_name(index: int) -> str:
    return f"part-{index:05d}"


@dataclass
class ChunkInfo:
    """Where one chunk lives in its part file.

    Attributes:
        offset: byte offset of the chunk in the part file.
        rows: rows ``R`` in the chunk.
        counts: keys per feature, ``[F]``.
    """

    offset: int
    rows: int
    counts: list[int]

    def to_json(self) -> list[Any]:
        return [self.offset, self.rows, self.counts]

    @staticmethod
    def from_json(v: Any) -> ChunkInfo:
        return ChunkInfo(int(v[0]), int(v[1]), [int(c) for c in v[2]])


@dataclass
class PartInfo:
    """One part: the good rows of one source file."""

    name: str  # part file stem, e.g. "part-00000"
    source: str  # the source file's path as given to `terarec preprocess`
    rows: int
    chunks: list[ChunkInfo]


def write_chunk(f: Any, rows: Rows) -> ChunkInfo:
    """Appends ``rows`` as one chunk at ``f``'s current (64-byte aligned) position.

    Args:
        f: a binary file open for writing, positioned at the end.
        rows: the chunk's rows.
    """
    start = f.tell()
    assert start % ALIGN == 0, start
    n, nd = rows.dense.shape if rows.dense.ndim == 2 else (rows.n, 0)
    nf = rows.lengths.shape[0]
    counts = [int(v.shape[0]) for v in rows.values]
    offs = chunk_layout(n, nd, nf, sum(counts))
    arrays = [
        np.ascontiguousarray(rows.labels, dtype="<f4"),
        np.ascontiguousarray(rows.dense, dtype="<f4"),
        np.ascontiguousarray(rows.lengths, dtype="<i4"),
        np.concatenate(rows.values).astype("<i8", copy=False) if rows.values
        else np.zeros(0, "<i8"),
    ]
    for i, a in enumerate(arrays):
        f.write(a.tobytes())
        pad = offs[i + 1] - offs[i] - a.nbytes
        if pad:
            f.write(b"\0" * pad)
    return ChunkInfo(start, n, counts)


class PartReader:
    """Memory-maps one part file and hands out its chunks as :class:`Rows` views.

    Args:
        path: the part's ``.bin`` file.
        info: its chunk index.
        num_dense, num_sparse: the dataset's feature counts.
    """

    def __init__(self, path: Path, info: PartInfo, num_dense: int, num_sparse: int) -> None:
        self.path = path
        self.info = info
        self.nd, self.nf = num_dense, num_sparse
        size = path.stat().st_size
        last = info.chunks[-1] if info.chunks else None
        need = 0 if last is None else last.offset + chunk_layout(
            last.rows, num_dense, num_sparse, sum(last.counts))[-1]
        if size < need:
            raise DataError(f"{path}: {size} bytes, its index needs {need} (truncated part)")
        self.mem = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Chunk ``i``'s arrays, views of the mapped file: labels ``[R]``, dense
        ``[R, D]``, lengths ``[F, R]`` and values (all features back to back)."""
        c = self.info.chunks[i]
        r = c.rows
        offs = chunk_layout(r, self.nd, self.nf, sum(c.counts))
        m = self.mem[c.offset : c.offset + offs[-1]]

        def arr(k: int, dtype: str, count: int) -> np.ndarray:
            return m[offs[k] : offs[k] + count * np.dtype(dtype).itemsize].view(dtype)

        return (arr(0, "<f4", r), arr(1, "<f4", r * self.nd).reshape(r, self.nd),
                arr(2, "<i4", r * self.nf).reshape(self.nf, r), arr(3, "<i8", sum(c.counts)))

    def chunk(self, i: int) -> Rows:
        """Chunk ``i`` as :class:`Rows` whose arrays are views of the mapped file."""
        labels, dense, lengths, values = self.arrays(i)
        bounds = np.cumsum([0, *self.info.chunks[i].counts])
        return Rows(labels=labels, dense=dense, lengths=lengths,
                    values=[values[bounds[f] : bounds[f + 1]] for f in range(self.nf)])


@dataclass
class Dataset:
    """A preprocessed directory's ``meta.json``.

    Attributes:
        root: the directory.
        source_kind: the text format it came from ("criteo", "csv", "libfm").
        dense, sparse: feature names (``Batch.dense`` columns, KJT keys).
        dense_transform: the transform applied to the dense values ("none", "log1p").
        chunk_rows: the chunk size it was written with.
        parts: one per source file, in source order.
        bad_rows: malformed source rows skipped while preprocessing, by reason.
        semantic_ids: semantic-id features (keyed by prefix) and their levels.
    """

    root: Path
    source_kind: str
    dense: list[str]
    sparse: list[str]
    dense_transform: str
    chunk_rows: int
    parts: list[PartInfo]
    bad_rows: dict[str, int]
    semantic_ids: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def reader(self, i: int) -> PartReader:
        p = self.parts[i]
        return PartReader(self.root / f"{p.name}.bin", p, len(self.dense), len(self.sparse))


def meta_dict(
    source_kind: str, dense: list[str], sparse: list[str], dense_transform: str,
    chunk_rows: int, fingerprint: dict[str, Any],
) -> dict[str, Any]:
    """The dataset-wide fields of ``meta.json`` (parts are added by the writer)."""
    return {"format": FORMAT, "version": VERSION, "source_kind": source_kind,
            "dense": dense, "sparse": sparse, "dense_transform": dense_transform,
            "chunk_rows": chunk_rows, "fingerprint": fingerprint}


def part_dict(info: PartInfo, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {"name": info.name, "source": info.source, "rows": info.rows,
            "chunks": [c.to_json() for c in info.chunks], **(extra or {})}


def part_from_dict(d: dict[str, Any], where: str) -> PartInfo:
    try:
        return PartInfo(str(d["name"]), str(d["source"]), int(d["rows"]),
                        [ChunkInfo.from_json(c) for c in d["chunks"]])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"{where}: malformed part entry ({type(e).__name__}: {e})") from None


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Writes ``obj`` to ``path`` atomically (temp file, fsync, rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_dataset(root: str | Path) -> Dataset:
    """Reads ``root/meta.json``.

    Raises:
        DataError: naming the file, if it is missing (not preprocessed, or preprocessing
            did not finish), of another format/version, or malformed.
    """
    root = Path(root)
    path = root / META
    if not path.is_file():
        raise DataError(f"{root}: no {META}: not a preprocessed dataset, or `terarec "
                        f"preprocess` has not finished writing it")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if d.get("format") != FORMAT or d.get("version") != VERSION:
        raise DataError(f"{path}: format {d.get('format')!r} version {d.get('version')!r}, "
                        f"expected {FORMAT!r} version {VERSION}")
    try:
        parts = [part_from_dict(p, str(path)) for p in d["parts"]]
        return Dataset(root, str(d["source_kind"]), list(d["dense"]), list(d["sparse"]),
                       str(d["dense_transform"]), int(d["chunk_rows"]), parts,
                       {str(k): int(v) for k, v in d.get("bad_rows", {}).items()},
                       {str(k): int(v) for k, v in d.get("semantic_ids", {}).items()})
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: missing or malformed field ({type(e).__name__}: {e})") from None


def write_dataset(
    root: str | Path,
    parts: list[Iterable[Rows]],
    *,
    source_kind: str,
    dense: list[str],
    sparse: list[str],
    dense_transform: str = "none",
) -> Dataset:
    """Writes a dataset whose part ``i`` holds the chunks ``parts[i]`` yields, in order.

    ``terarec preprocess`` makes datasets from text; this writes one from rows made in
    memory (a generator, a conversion), e.g. ``SyntheticGenerator.rows`` chunks.

    Args:
        root: the dataset directory (created; ``meta.json`` is written last).
        parts: per part, its chunks (each a :class:`Rows` over ``sparse``).
        source_kind, dense, sparse, dense_transform: recorded in ``meta.json``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    infos, chunk_rows = [], 0
    for i, chunks in enumerate(parts):
        info = PartInfo(part_name(i), f"<{source_kind} part {i}>", 0, [])
        with open(root / f"{info.name}.bin", "wb") as f:
            for rows in chunks:
                if rows.n:
                    info.chunks.append(write_chunk(f, rows))
                    info.rows += rows.n
                    chunk_rows = max(chunk_rows, rows.n)
        write_json(root / f"{info.name}.json", part_dict(info))
        infos.append(info)
    meta = meta_dict(source_kind, dense, sparse, dense_transform, chunk_rows, {})
    meta["parts"] = [part_dict(p) for p in infos]
    meta["bad_rows"], meta["rows"] = {}, sum(p.rows for p in infos)
    write_json(root / META, meta)
    return open_dataset(root)

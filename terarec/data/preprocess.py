"""``terarec preprocess``: text data (Criteo TSV, CSV, libFM; plain, gzip or zstd) → the
columnar format of ``columnar.py``, so training reads arrays instead of parsing text.

For each source file the rows are parsed and hashed by the same parser training would
use on the text (same keys, same dense transform, same malformed-row policy) and written
in file order, one output chunk per input chunk of ``chunk_rows`` lines. Output::

    OUT/train/   the rows of ``data.path`` (less the eval hold-out, if any)
    OUT/eval/    the rows of ``data.eval_path``, or the ``eval_fraction`` of ``data.path``
                 held out by the same row hash the text reader uses (if either is set)

Streaming and bounded memory: one chunk per worker at a time. Resumable: a file's
progress (source offset, chunks written) is saved after every chunk; a rerun with the
same config continues where it stopped and skips finished files. Several files are
processed in parallel by ``workers`` processes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np

from terarec.config import DataConfig, DataKind
from terarec.data.columnar import (
    META,
    PartInfo,
    meta_dict,
    part_dict,
    part_from_dict,
    part_name,
    write_chunk,
    write_json,
)
from terarec.data.errors import BadRows, DataError, logger
from terarec.data.files import data_size, eval_mask, expand_paths, is_compressed, iter_line_chunks
from terarec.data.remote import is_url, url_size
from terarec.data.source import text_parser

PROGRESS = ".progress"


def fingerprint(cfg: DataConfig, chunk_rows: int) -> dict[str, Any]:
    """What decides the bytes written: a rerun into the same directory must match it."""
    return {
        "kind": cfg.kind.value,
        "dense_transform": cfg.dense_transform.value,
        "eval_fraction": 0.0 if cfg.eval_path else cfg.eval_fraction,
        "csv": None if cfg.csv is None else json.loads(json.dumps(asdict(cfg.csv))),
        "libfm_fields": cfg.libfm.fields,
        "chunk_rows": chunk_rows,
    }


def _source_id(path: str) -> dict[str, Any]:
    if is_url(path):  # (a remote file's mtime is not always known: its size names it)
        return {"path": path, "size": url_size(path), "mtime_ns": 0}
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class _PartWriter:
    """One output part (one split of one source file), appended chunk by chunk."""

    def __init__(self, root: Path, index: int, source: str, resume: Optional[dict]) -> None:
        self.info = PartInfo(part_name(index), source, 0, [])
        self.bin = root / f"{self.info.name}.bin"
        self.f = open(self.bin, "r+b" if resume else "wb")  # noqa: SIM115 - closed by close()
        if resume:
            done = part_from_dict(resume, str(self.bin))
            self.info = done
            self.f.truncate(int(resume["bytes"]))
            self.f.seek(int(resume["bytes"]))

    def add(self, rows: Any) -> None:
        if rows.n:
            self.info.chunks.append(write_chunk(self.f, rows))
            self.info.rows += rows.n

    def state(self) -> dict[str, Any]:
        self.f.flush()
        os.fsync(self.f.fileno())
        return part_dict(self.info, {"bytes": self.f.tell()})

    def close(self) -> None:
        self.f.close()


def process_file(
    cfg: DataConfig, index: int, path: str, outs: dict[str, Path], hold_out: float,
    chunk_rows: int, on_bytes: Optional[Callable[[int], None]] = None,
) -> dict[str, Any]:
    """Converts one source file into part ``index`` of each split in ``outs``.

    Args:
        cfg: the data config (parser, transform, strictness).
        index: the file's position in its split's file list (the part number).
        path: the source file.
        outs: split name → its output directory ("train" and/or "eval").
        hold_out: fraction of rows held out to "eval" by row hash (0: every row goes to
            the one split in ``outs``).
        chunk_rows: lines read and parsed per chunk.
        on_bytes: optional callback with the source bytes of each chunk done.

    Returns:
        ``{"parts": {split: part dict}, "bad_rows": {reason: n}}``.
    """
    bad = BadRows(cfg.strict, cfg.log_bad_rows)
    parser = text_parser(cfg, bad)
    name = part_name(index)
    prog_path = next(iter(outs.values())).parent / PROGRESS / f"{name}-{'-'.join(outs)}.json"
    src = _source_id(path)
    saved: dict[str, Any] = {}
    if prog_path.is_file():
        saved = json.loads(prog_path.read_text())
        if saved.get("source") != src:
            saved = {}
    writers = {s: _PartWriter(d, index, path, saved.get("parts", {}).get(s))
               for s, d in outs.items()}
    for k, v in saved.get("bad_rows", {}).items():
        bad.counts[k] = int(v)
    hdr = parser.start_file(path)
    hdr_lines = 1 if hdr else 0
    off, line = (int(saved["offset"]), int(saved["line"])) if saved else (hdr, hdr_lines)
    done_bytes = off
    try:
        for chunk in iter_line_chunks(path, off, line, chunk_rows):
            if hold_out > 0:
                data_idx = chunk.first_line - hdr_lines + np.arange(chunk.n, dtype=np.int64)
                held = eval_mask(path, data_idx, hold_out)
                writers["train"].add(parser.parse(chunk, ~held))
                writers["eval"].add(parser.parse(chunk, held))
            else:
                (w,) = writers.values()
                w.add(parser.parse(chunk, np.ones(chunk.n, dtype=bool)))
            state = {"source": src, "offset": chunk.next_offset,
                     "line": chunk.first_line + chunk.n, "bad_rows": bad.snapshot(),
                     "parts": {s: w.state() for s, w in writers.items()}}
            write_json(prog_path, state)
            if on_bytes is not None:
                on_bytes(chunk.next_offset - done_bytes)
            done_bytes = chunk.next_offset
    finally:
        for w in writers.values():
            w.close()
    parts = {}
    for s, w in writers.items():
        parts[s] = part_dict(w.info)
        write_json(outs[s] / f"{w.info.name}.json",
                   {**parts[s], "source_id": src, "file_bad_rows": bad.snapshot()})
    prog_path.unlink(missing_ok=True)
    return {"parts": parts, "bad_rows": bad.snapshot()}


def _finished(outs: dict[str, Path], index: int, path: str) -> Optional[dict[str, Any]]:
    """The saved result of file ``index`` if every split's part is complete and current."""
    parts, bad = {}, {}
    for s, d in outs.items():
        p = d / f"{part_name(index)}.json"
        if not p.is_file():
            return None
        saved = json.loads(p.read_text())
        if saved.pop("source_id", None) != _source_id(path):
            return None
        bad = saved.pop("file_bad_rows", {})
        parts[s] = saved
    return {"parts": parts, "bad_rows": bad}


def _check_or_write_fingerprint(out: Path, fp: dict[str, Any]) -> None:
    path = out / PROGRESS / "fingerprint.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != fp:
            diff = {k: (old.get(k), fp.get(k)) for k in set(old) | set(fp)
                    if old.get(k) != fp.get(k)}
            raise DataError(f"{out}: holds a preprocess of another config (differs in "
                            f"{diff}); choose another output directory or delete it")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, fp)


def preprocess(
    cfg: DataConfig,
    out: str | Path,
    *,
    chunk_rows: int = 131_072,
    workers: int = 1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Preprocesses ``cfg``'s text data into ``out``.

    Args:
        cfg: a data config of kind criteo, csv or libfm (``path``, optionally
            ``eval_path`` or ``eval_fraction``, ``dense_transform``, ``strict``).
        out: the output directory (created; a rerun resumes an unfinished one).
        chunk_rows: rows per chunk (and lines parsed at a time).
        workers: source files converted in parallel (processes).
        show_progress: a tqdm bar over source bytes on stderr.

    Returns:
        ``{split: {"path", "rows", "parts", "bad_rows"}}`` for each split written.

    Raises:
        DataError: a missing source, a non-text kind, an ``out`` written with another
            config, or (``strict``) the first malformed row.
    """
    if cfg.kind not in (DataKind.CRITEO, DataKind.CSV, DataKind.LIBFM):
        raise DataError(f"data.kind {cfg.kind.value}: preprocess reads text data "
                        f"(criteo, csv, libfm)")
    if chunk_rows < 1 or workers < 1:
        raise DataError(f"chunk_rows and workers must be >= 1, got {chunk_rows}, {workers}")
    if cfg.csv is not None and cfg.csv.weight:
        raise DataError("csv.weight: the preprocessed format has no weight column; train "
                        "from the text files to use sample weights")
    if cfg.valid_fraction > 0 or cfg.valid_path:
        # its rows would land in the train split
        raise DataError("data.valid_fraction / data.valid_path: preprocess writes a train and "
                        "an eval split only; preprocess the validation rows as the eval "
                        "split of a config of their own and give the run valid_path")
    if cfg.csv is not None and cfg.csv.extra_labels:
        raise DataError("data.csv.extra_labels: the preprocessed format holds one label; "
                        "train a multi-task model on the CSV / Parquet files themselves")
    assert cfg.path is not None  # validated by DataConfig
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, chunk_rows)
    _check_or_write_fingerprint(out, fp)
    train_files = expand_paths(cfg.path)
    eval_files = expand_paths(cfg.eval_path) if cfg.eval_path else []
    hold = 0.0 if cfg.eval_path else cfg.eval_fraction
    dirs = {"train": out / "train"}
    if eval_files or hold > 0:
        dirs["eval"] = out / "eval"
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    jobs: list[tuple[int, str, dict[str, Path], float]] = []
    for i, f in enumerate(train_files):
        outs = dict(dirs) if hold > 0 else {"train": dirs["train"]}
        jobs.append((i, f, outs, hold))
    for i, f in enumerate(eval_files):
        jobs.append((i, f, {"eval": dirs["eval"]}, 0.0))
    results = _run_jobs(cfg, jobs, chunk_rows, workers, show_progress)
    from terarec.data import (  # the package API
        dense_feature_names,
        semantic_id_features,
        sparse_feature_names,
    )

    summary: dict[str, Any] = {}
    for split, d in dirs.items():
        parts, bad = [], {}
        for (_, _, outs, _), r in zip(jobs, results):
            if split in outs:
                parts.append(r["parts"][split])
                for k, v in r["bad_rows"].items():
                    bad[k] = bad.get(k, 0) + v
        meta = meta_dict(cfg.kind.value, dense_feature_names(cfg), sparse_feature_names(cfg),
                         cfg.dense_transform.value, chunk_rows, fp)
        meta["parts"], meta["bad_rows"] = parts, bad
        meta["semantic_ids"] = semantic_id_features(cfg)
        meta["rows"] = sum(p["rows"] for p in parts)
        write_json(d / META, meta)
        summary[split] = {"path": str(d), "rows": meta["rows"], "parts": len(parts),
                          "bad_rows": bad}
    return summary


def _run_jobs(
    cfg: DataConfig, jobs: list[tuple[int, str, dict[str, Path], float]], chunk_rows: int,
    workers: int, show_progress: bool,
) -> list[dict[str, Any]]:
    """Runs ``process_file`` over ``jobs`` (skipping finished ones) with a progress bar."""
    from tqdm import tqdm

    results: list[Optional[dict[str, Any]]] = [_finished(o, i, f) for i, f, o, _ in jobs]
    todo = [k for k, r in enumerate(results) if r is None]
    if len(todo) < len(jobs):
        logger.info("preprocess: %d of %d files already done", len(jobs) - len(todo), len(jobs))
    # Progress counts decompressed bytes; a compressed file's size is unknown without a
    # pass over it.
    gz = any(is_compressed(jobs[k][1]) for k in todo)
    total = None if gz else sum(data_size(jobs[k][1]) for k in todo)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess",
               disable=not show_progress)
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    try:
        if workers == 1 or len(todo) <= 1:
            for k in todo:
                i, f, o, h = jobs[k]
                results[k] = process_file(cfg, i, f, o, h, chunk_rows, bar.update)
        else:
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx,
                                     initializer=_init_worker, initargs=(counter,)) as ex:
                futs = {k: ex.submit(_worker_file, cfg, *jobs[k][:4], chunk_rows)
                        for k in todo}
                pending = set(futs)
                while pending:
                    for k in [k for k in pending if futs[k].done()]:
                        results[k] = futs[k].result()
                        pending.discard(k)
                    bar.n = counter.value
                    bar.refresh()
                    time.sleep(0.2)
    finally:
        bar.close()
    return [r for r in results if r is not None]


_COUNTER: Any = None


def _init_worker(counter: Any) -> None:
    global _COUNTER
    _COUNTER = counter


def _count(n: int) -> None:
    with _COUNTER.get_lock():
        _COUNTER.value += n


def _worker_file(cfg: DataConfig, index: int, path: str, outs: dict[str, Path],
                 hold: float, chunk_rows: int) -> dict[str, Any]:
    return process_file(cfg, index, path, outs, hold, chunk_rows, _count)

"""Where each rank of a new rank layout continues a train stream saved by another.

A checkpoint holds one data position per rank (``Batch.position``). Resumed on another
number of ranks, each new rank derives its own position from all the saved ones
(:func:`reshard_state`). The rule, by source:

* **synthetic**: every rank draws its own endless stream, batch ``i`` of rank ``r``
  seeded by ``(seed, r, i)``; each new rank continues its stream at the batch count
  the saved ranks reached (ranks that did not exist before start their streams there).
* **text files read by every rank** (fewer files than ranks, or one rank: rank ``r`` of
  ``W`` keeps the rows ``j = r (mod W)``), saved and resumed alike:

  - without shuffling (``shuffle_buffer: 0``) the new ranks continue from the first
    row some saved rank had not trained, each with its own rows from there: every row
    before it was trained, and none after it (ranks whose rows interleave evenly stop
    at consecutive rows; with an eval hold-out, a rank a few rows ahead of the others
    has those few trained again);
  - with shuffling a position is a window (``shuffle_buffer`` rows) and how far each
    rank got into its permutation of it; the new ranks restart the earliest window any
    saved rank was in, so the rows the saved ranks had trained of their current
    windows are trained again (at most one window per saved rank).

* **text files split by file**, or a layout change between the two modes, and
  **preprocessed (columnar) data**: which rows of a half-read file or chunk window a
  saved rank had trained does not carry over to another assignment of files, so the
  new ranks restart the pass the earliest saved rank was in (its rows trained so far
  are trained again; a warning says how many samples that pass had seen).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from terarec.data.errors import DataError
from terarec.data.files import eval_mask

log = logging.getLogger("terarec.data")


def reshard_state(stream: Any, saved: list[dict[str, Any]]) -> dict[str, Any]:
    """The position from which ``stream`` (a new rank's train stream) continues a run
    whose ranks saved the positions ``saved`` (one per saved rank, in rank order).

    Raises:
        DataError: the saved positions are of another kind of source.
    """
    kinds = {s.get("kind") for s in saved}
    want = stream.initial_state()
    if kinds != {want["kind"]}:
        raise DataError(f"data positions of a {sorted(map(str, kinds))} source cannot "
                        f"continue a {want['kind']} source")
    if want["kind"] == "synthetic":
        return {**want, "batch": max(int(s["batch"]) for s in saved)}
    if want["kind"] == "file" and _all_files(saved[0]) and _reads_all(stream):
        return _file_rows(stream, saved)
    p = min(int(s["pass"]) for s in saved)
    log.warning("data: the saved position does not map to %d rank(s) row by row (%s); "
                "the ranks restart pass %d from its start", stream.world, _why(stream), p)
    return {**want, "pass": p}


def _why(stream: Any) -> str:
    if getattr(stream, "ds", None) is not None:
        return "preprocessed data are split by chunk"
    return "files are split between ranks"


def _all_files(state: dict[str, Any]) -> bool:
    """Whether every rank of the saved layout read every file."""
    world = int(state["world_size"])
    return world == 1 or int(state["num_files"]) < world


def _reads_all(stream: Any) -> bool:
    return stream.world == 1 or len(stream.files) < stream.world


def _file_rows(stream: Any, saved: list[dict[str, Any]]) -> dict[str, Any]:
    """Text files every rank reads (rows strided by rank): see the module docstring."""
    want = stream.initial_state()
    starts = [tuple(int(s[x]) for x in ("pass", "file", "line")) for s in saved]
    first = min(range(len(saved)), key=lambda i: starts[i])
    shuffled = stream.shuffle and stream.split == "train"
    if not shuffled:
        nexts = [_next_row(stream, s) for s in saved]
        known = [n for n in nexts if n is not None]
        if len(known) == len(saved):
            first = min(range(len(saved)), key=known.__getitem__)
            s = saved[first]
            rows = _kept(stream, s, _window_row(stream, s), known[first][2], stream.rank,
                         stream.world)
            return {**want, **{x: int(s[x]) for x in ("pass", "file", "offset", "line")},
                    "skip": int(rows.size)}
    s = saved[first]
    return {**want, **{x: int(s[x]) for x in ("pass", "file", "offset", "line")}, "skip": 0}


def _path(stream: Any, state: dict[str, Any]) -> str:
    return stream.files[stream._order(int(state["pass"]))[int(state["file"])]]


def _window_row(stream: Any, state: dict[str, Any]) -> int:
    """The data row (0-based, header excluded) where the state's window starts."""
    if int(state["offset"]) == 0:  # a file's start: its data rows from the first
        return 0
    hdr = stream.parser.start_file(_path(stream, state))
    return int(state["line"]) - (1 if hdr else 0)


def _kept(stream: Any, state: dict[str, Any], lo: int, hi: int, rank: int,
          world: int) -> np.ndarray:
    """The data rows in ``[lo, hi)`` of the state's file that ``rank`` of ``world``
    trains (its stride, less the rows held out for eval)."""
    j = np.arange(lo, hi, dtype=np.int64)
    keep = j % world == rank
    if stream.hold_out > 0:
        keep &= ~eval_mask(_path(stream, state), j, stream.hold_out)
    return j[keep]


def _next_row(stream: Any, state: dict[str, Any]) -> tuple[int, int, int] | None:
    """``(pass, file, data row)`` of the first row the saved rank had not trained: the
    ``skip``-th of its rows from its window's start (None where that is not within one
    chunk of lines, e.g. a window that ran into the next file)."""
    lo = _window_row(stream, state)
    rows = _kept(stream, state, lo, lo + stream.chunk_rows, int(state["rank"]),
                 int(state["world_size"]))
    skip = int(state["skip"])
    if skip >= rows.size:
        return None
    return int(state["pass"]), int(state["file"]), int(rows[skip])

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

* **text files split between ranks** (at least as many files as ranks, on either side
  of the change, or a change between the two modes): the new ranks read the pass the
  earliest saved rank was in, without the files that were finished (by every saved
  rank that read them); a half-read file continues from the start of the window its
  reader was in, so at most one window (``shuffle_buffer`` rows, or a chunk) per saved
  rank is trained again. The new position carries this plan (``"reshard"``) while in
  that pass, so a later resume, or another change of layout, keeps it.
* **preprocessed (columnar) data**: likewise by chunk: the new ranks read the pass
  without the chunks of the windows the saved ranks had finished (a half-read window
  is read again whole).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from terarec.data.errors import DataError
from terarec.data.files import eval_mask, shard_files
from terarec.data.stream import pass_order

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
    if want["kind"] == "file":
        return _file_plan(stream, saved)
    return _unit_plan(stream, saved)


def _all_files(state: dict[str, Any]) -> bool:
    """Whether every rank of the saved layout read every file."""
    world = int(state["world_size"])
    return world == 1 or int(state["num_files"]) < world


def _reads_all(stream: Any) -> bool:
    return stream.world == 1 or len(stream.files) < stream.world


def _saved_order(stream: Any, state: dict[str, Any]) -> list[int]:
    """The files, in reading order, of the saved rank of ``state`` in its pass."""
    mine, _ = shard_files(int(state["num_files"]), int(state["rank"]),
                          int(state["world_size"]))
    p = int(state["pass"])
    order = pass_order(mine, stream.seed, p, bool(stream.shuffle) and stream.split == "train")
    plan = state.get("reshard")
    if plan is not None and int(plan["pass"]) == p:
        order = [f for f in order if f not in set(plan["done"])]
    return order


def _file_plan(stream: Any, saved: list[dict[str, Any]]) -> dict[str, Any]:
    """Files assigned to ranks on either side: the pass the earliest saved rank is in,
    without the files every saved rank reading them had finished, half-read files
    from the window their reader was in."""
    p = min(int(s["pass"]) for s in saved)
    done: set[int] = set()
    start: dict[str, list[int]] = {}
    strided = _all_files(saved[0])
    at = [s for s in saved if int(s["pass"]) == p]
    for s in saved:
        plan = s.get("reshard")
        if plan is not None and int(plan["pass"]) == p:
            done |= set(plan["done"])
            start.update(plan["from"])
        if int(s["pass"]) > p and not strided:  # its files of pass p are all done
            done |= set(shard_files(int(s["num_files"]), int(s["rank"]),
                                    int(s["world_size"]))[0])
    if strided:  # every rank read every file: done where the slowest rank is
        first = min(at, key=lambda s: (int(s["file"]), int(s["line"])))
        order = _saved_order(stream, first)
        done |= set(order[: int(first["file"])])
        _note_start(start, order, first)
    else:
        for s in at:
            order = _saved_order(stream, s)
            done |= set(order[: int(s["file"])])
            _note_start(start, order, s)
    log.info("data: resharded to %d rank(s): pass %d continues without %d file(s) the "
             "saved ranks had finished, %d half-read file(s) from their windows",
             stream.world, p, len(done), len(start))
    return {**stream.initial_state(), "pass": p,
            "reshard": {"pass": p, "done": sorted(done),
                        "from": {f: v for f, v in start.items() if int(f) not in done}}}


def _note_start(start: dict[str, list[int]], order: list[int], s: dict[str, Any]) -> None:
    """A half-read file continues at the saved rank's window."""
    k = int(s["file"])
    if k < len(order) and int(s["offset"]) > 0:
        start[str(order[k])] = [int(s["offset"]), int(s["line"])]


def _unit_plan(stream: Any, saved: list[dict[str, Any]]) -> dict[str, Any]:
    """Preprocessed data: the pass the earliest saved rank is in, without the chunks of
    the windows a saved rank had finished (a half-read window is read again)."""
    p = min(int(s["pass"]) for s in saved)
    done: set[tuple[int, int]] = set()
    for s in saved:
        units = stream.units_of(int(s["rank"]), int(s["world_size"]))
        plan = s.get("reshard")
        if plan is not None and int(plan["pass"]) == p:
            before = {(int(a), int(b)) for a, b in plan["done"]}
            done |= before
            units = [u for u in units if u not in before]
        if int(s["pass"]) > p:
            done |= set(units)
        else:
            wins = stream.windows_of(units, p, int(s["rank"]))
            done |= {units[i] for win in wins[: int(s["window"])] for i in win}
    log.info("data: resharded to %d rank(s): pass %d continues without %d chunk(s) the "
             "saved ranks had finished", stream.world, p, len(done))
    return {**stream.initial_state(), "pass": p,
            "reshard": {"pass": p, "done": sorted([list(u) for u in done])}}


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
            return {**want, **_at(s), "skip": int(rows.size)}
    return {**want, **_at(saved[first]), "skip": 0}


def _at(s: dict[str, Any]) -> dict[str, Any]:
    """A saved window's place (and the plan its pass was read by, if any)."""
    out: dict[str, Any] = {x: int(s[x]) for x in ("pass", "file", "offset", "line")}
    plan = s.get("reshard")
    if plan is not None and int(plan["pass"]) == out["pass"]:
        out["reshard"] = plan
    return out


def _path(stream: Any, state: dict[str, Any]) -> str:
    return stream.files[_saved_order(stream, state)[int(state["file"])]]


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

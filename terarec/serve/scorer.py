"""Request-centric candidate scoring from a bundle: :class:`Scorer`.

A request is one user (user/context features, maybe dense features) and ``N``
candidates. The scorer hashes raw values to keys exactly as training did
(``data/keys.py``: integer ids and strings, salted by feature), looks each table's
keys of both sides up in one call through its row cache (``serve/rowstore.py``; absent
keys read as zero rows), pools them per feature (the table's sum/mean), runs the user
program once and the candidate program once over all ``N`` candidates
(``models/split.py`` says what each computes), and ranks by score. Several requests can
be scored in one call (:meth:`Scorer.score_many`): their rows are looked up together,
the user program runs once over their users and the candidate program once per
request. Live deltas: :meth:`Scorer.apply_delta` (``serve/overlay.py``).

Feature values, per feature: one value (``int`` id or ``str``) or a list of values
(multi-valued; ``[]`` = missing). For candidates, a list of ``N`` such entries. A
feature left out of a request is missing (pools to zeros, as an empty bag in training).
A semantic-id feature (the manifest's ``features.semantic_ids``) takes each entry's
token sequence (a list of ints, level 1 first); it is keyed by prefix as in training
(``data/keys.py``), so an ad never trained on scores from the prefixes it shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from terarec.data.keys import feature_salts, salted_by, semantic_id_keys, string_keys
from terarec.serve import bundle as b
from terarec.serve.delta import read_delta
from terarec.serve.dense_int8 import quantize_linears, repack_linears
from terarec.serve.fast import FastPath
from terarec.serve.graphs import GraphedProgram
from terarec.serve.overlay import Overlay, OverlayFull, PendingDelta
from terarec.serve.rowstore import CachedRows, RowStore

Column = tuple[torch.Tensor, torch.Tensor]  # (keys int64 [M], lengths int64 [B])


class RequestError(ValueError):
    """A request that cannot be scored; the message names the field."""


@dataclass
class Request:
    """One ranking request (see the module docstring for value shapes).

    Attributes:
        user: user/context-side feature → value(s).
        candidates: candidate-side feature → ``N`` entries.
        dense: the dense features ``[num_dense]`` when they are user-side.
        candidate_dense: ``[N][num_dense]`` when the dense features are candidate-side.
        ids: optional ``N`` candidate ids, returned in ranked order.
    """

    user: dict[str, Any] = field(default_factory=dict)
    candidates: dict[str, Sequence[Any]] = field(default_factory=dict)
    dense: Optional[Sequence[float]] = None
    candidate_dense: Optional[Sequence[Sequence[float]]] = None
    ids: Optional[Sequence[Any]] = None


@dataclass
class Ranking:
    """Scores of one request: ``scores [N]`` (click probabilities, request order),
    ``order [N]`` (candidate positions, best first), ``ids`` in ranked order (when the
    request named them) and the model ``step`` that scored them. A multi-task model:
    ``scores`` are the first task's (the ranking follows them) and ``tasks`` holds every
    task's probabilities ``[N]`` by task name."""

    scores: torch.Tensor
    order: torch.Tensor
    ids: Optional[list[Any]]
    step: int
    tasks: Optional[dict[str, torch.Tensor]] = None


def raw_column(feature: str, values: Sequence[Any], n: int, where: str
               ) -> tuple[np.ndarray, bool, np.ndarray]:
    """``(payload, hashed, lengths [n])`` of ``n`` entries of one feature: integer ids
    (``hashed`` False: :func:`hash_columns` salts and mixes them, all features at once)
    or the keys of string values (``hashed`` True)."""
    if len(values) != n:
        raise RequestError(f"{where}.{feature}: {len(values)} entries for {n} "
                           f"{'candidates' if n != 1 else 'user'}")
    if n and isinstance(values[0], (list, tuple)):
        if not all(map(isinstance, values, repeat((list, tuple)))):
            raise RequestError(f"{where}.{feature}: mixes lists and single values")
        lengths = np.fromiter(map(len, values), np.int64, n)
        flat: list[Any] = list(chain.from_iterable(values))
    else:
        lengths, flat = np.ones(n, np.int64), list(values)
    if not flat:
        return np.empty(0, np.int64), True, lengths
    kind = type(flat[0])
    if kind is str:
        try:
            arr = pa.array(flat, pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise RequestError(f"{where}.{feature}: mixes strings and other values") from None
        present, keys, _ = string_keys(arr, feature)
        if not present.all():
            raise RequestError(f"{where}.{feature}: empty string value (send [] for missing)")
        return keys, True, lengths
    if kind is not int:
        raise RequestError(f"{where}.{feature}: values must be integer ids or strings, "
                           f"got {kind.__name__}")
    try:
        ids = np.asarray(flat)
    except (OverflowError, ValueError):
        raise RequestError(f"{where}.{feature}: ids must be int64/uint64 integers") from None
    if ids.dtype.kind not in "iu" or ids.ndim != 1:
        raise RequestError(f"{where}.{feature}: values must be all integers or all strings")
    return ids.view(np.int64) if ids.dtype.kind == "u" else ids.astype(np.int64), False, lengths


def hash_columns(cols: list[tuple[str, tuple[np.ndarray, bool, np.ndarray]]]
                 ) -> list[Column]:
    """Keys and lengths of raw columns ``(feature, raw)``: every integer column salted
    and mixed in one pass (``data/keys.py``'s ``int_keys``, element-wise salts)."""
    out: list[Column] = []
    ints = [i for i, (_, (p, hashed, _)) in enumerate(cols) if not hashed and p.size]
    mixed: list[np.ndarray] = []
    if ints:
        counts = [cols[i][1][0].size for i in ints]
        salts = feature_salts([cols[i][0] for i in ints])
        every = np.concatenate([cols[i][1][0] for i in ints])
        mixed = np.split(salted_by(every, np.repeat(salts, counts)), np.cumsum(counts)[:-1])
    by_col = dict(zip(ints, mixed))
    for i, (_, (payload, _, lengths)) in enumerate(cols):
        out.append((torch.from_numpy(by_col.get(i, payload)), torch.from_numpy(lengths)))
    return out


def hash_column(feature: str, values: Sequence[Any], n: int, where: str) -> Column:
    """Keys and lengths of ``n`` entries of one feature (see the module docstring)."""
    return hash_columns([(feature, raw_column(feature, values, n, where))])[0]


class Scorer:
    """Scores requests with a bundle. Build with :meth:`from_bundle`.

    Args:
        root: the bundle directory.
        manifest: its manifest (read and checked).
        device: where pooled embeddings, cached rows and the programs live.
        cache_bytes: budget of the row caches (all tables; split by their row counts).
        overlay_rows: most rows live deltas may change before a new export is needed.
        dense_dtype: ``"fp32"``, or ``"int8"``: the per-candidate program's linear
            layers on FBGEMM's int8 GEMM (CPU only; ``serve/dense_int8.py``).
        cuda_graphs: on a CUDA device, replay the programs as CUDA graphs
            (``serve/graphs.py``); False runs them operator by operator.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], device: str | torch.device,
                 cache_bytes: int, overlay_rows: int = 1 << 22,
                 dense_dtype: str = "fp32", cuda_graphs: bool = True) -> None:
        self.root, self.manifest = Path(root), manifest
        self.device = torch.device(device)
        if dense_dtype not in ("fp32", "int8"):
            raise ValueError(f"dense_dtype: {dense_dtype!r} is not fp32 or int8")
        if dense_dtype == "int8" and self.device.type != "cpu":
            raise ValueError("dense_dtype: int8 runs on the CPU (FBGEMM's int8 GEMM); "
                             f"on {self.device} serve fp32")
        self.dense_dtype = dense_dtype
        self.step = int(manifest["step"])
        feats = manifest["features"]
        self.mode = manifest["model"]["mode"]
        self.folded = bool(manifest["model"].get("folded", False))
        self.tasks: list[str] = list(manifest["model"].get("tasks", ["label"]))
        self.order: list[str] = feats["order"]
        self.user_features: list[str] = feats["user"]
        self.candidate_features: list[str] = feats["candidate"]
        self.user_dense: bool = feats["user_dense"]
        self.num_dense = len(feats["dense"])
        self.table_of: dict[str, str] = feats["table"]
        # feature -> levels: values are token sequences, keyed by prefix
        self.semantic: dict[str, int] = dict(feats.get("semantic_ids", {}))
        self.tables = manifest["tables"]
        self.dim = max(t["dim"] for t in self.tables.values())
        self.store = RowStore(self.root / b.ROWS, manifest["row_dtype"])
        self.overlay = Overlay({t["id"]: t["dim"] for t in self.tables.values()},
                               manifest["row_dtype"], overlay_rows)
        self.last_sha = manifest["checkpoint"]["manifest_sha256"]
        self.deltas = 0
        total = max(1, sum(t["rows"] for t in self.tables.values()))
        self.rows: dict[str, CachedRows] = {}
        for name, t in self.tables.items():
            share = cache_bytes * max(t["rows"], 1) // total
            cap = min(int(share // (4 * t["dim"] + 16)), t["rows"] + (1 << 16))
            self.rows[name] = CachedRows(self.store, t["id"], t["dim"], cap, self.device,
                                         self.overlay)
        progs = manifest["model"]["programs"]
        self.programs: dict[str, nn.Module] = {
            part: b.load_program(self.root / f, device=self.device)
            for part, f in progs.items()}
        if dense_dtype == "int8":  # the per-candidate work; the user side runs once
            for part in ("candidate", "model"):
                if part in self.programs:
                    quantize_linears(self.programs[part])  # type: ignore[arg-type]
        # what scores: the programs, or their CUDA graphs (batch arguments, least bucket)
        self.run: dict[str, Callable[..., Any]] = dict(self.programs)
        if cuda_graphs and self.device.type == "cuda":
            spec = {"user": ((0, 1), 1), "candidate": ((2, 3), 64), "model": ((0, 1), 64)}
            self.run = {p: GraphedProgram(m, *spec[p]) for p, m in self.programs.items()}
        self.counts = {"requests": 0, "candidates": 0}
        # the common request's shortcut (serve/fast.py); None where it does not apply
        self.fast = FastPath.of(self.mode, self.user_features, self.candidate_features,
                                self.table_of, self.semantic)

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device = "cpu",
                    cache_bytes: int = 256 << 20, verify: str = "programs",
                    overlay_rows: int = 1 << 22, dense_dtype: str = "fp32",
                    cuda_graphs: bool = True) -> Scorer:
        """Opens bundle ``path`` (checked: :func:`~terarec.serve.bundle.read_manifest`
        with ``verify``)."""
        return cls(Path(path), b.read_manifest(Path(path), verify), device, cache_bytes,
                   overlay_rows, dense_dtype, cuda_graphs)

    # -- live deltas (serve/overlay.py) --------------------------------------------
    def prepare_delta(self, path: str | Path, parent_sha: Optional[str] = None
                      ) -> PendingDelta:
        """Reads and checks delta checkpoint ``path`` (files verified; its parent must be
        ``parent_sha``, default the last model applied) without touching what is served."""
        return read_delta(Path(path), self, parent_sha or self.last_sha)

    def commit_delta(self, pending: PendingDelta) -> None:
        """Applies a prepared delta: rows into the overlay, caches invalidated, dense
        weights loaded. Raises :class:`OverlayFull` (nothing applied) when the overlay
        would pass its bound, ``ValueError`` when it is not the next delta."""
        if pending.parent != self.last_sha:
            raise ValueError(f"{pending.path}: follows another checkpoint than the model "
                             "served (apply the deltas in order)")
        new = sum(self.overlay.new_keys(t, k) for t, (k, _) in pending.rows.items())
        if self.overlay.rows + new > self.overlay.max_rows:
            raise OverlayFull(f"{pending.path}: {new} more rows would pass the overlay's "
                              f"bound of {self.overlay.max_rows}; export a new bundle")
        for name, sd in pending.dense.items():
            self.programs[name].load_state_dict(sd, strict=True)
            repack_linears(self.programs[name])  # type: ignore[arg-type]
        names = {t["id"]: n for n, t in self.tables.items()}
        for table_id, (keys, weights) in pending.rows.items():
            self.overlay.put(table_id, keys, weights)
            self.rows[names[table_id]].invalidate(keys)
        self.step, self.last_sha = pending.step, pending.sha256
        self.deltas += 1

    def apply_delta(self, path: str | Path) -> None:
        """:meth:`prepare_delta` then :meth:`commit_delta`."""
        self.commit_delta(self.prepare_delta(path))

    # -- requests ----------------------------------------------------------------
    def score(self, request: Request) -> Ranking:
        """Scores and ranks one request."""
        return self.score_many([request])[0]

    def score_many(self, requests: Sequence[Request]) -> list[Ranking]:
        """Scores several requests in one pass (their rows looked up together)."""
        sizes = [self._num_candidates(r, i) for i, r in enumerate(requests)]
        known = set(self.order)
        for i, r in enumerate(requests):
            for side, feats in (("user", r.user), ("candidates", r.candidates)):
                for f in feats:
                    if f not in known:
                        raise RequestError(f"request {i}: {side}.{f}: not a feature of "
                                           f"the model (it has {self.order})")
        fast = None if len(requests) != 1 or self.fast is None else self.fast.keys(
            requests[0].user, requests[0].candidates, sizes[0])
        if fast is not None:  # serve/fast.py: the same keys, fewer steps
            du, dc = self._dense(requests, sizes)
            with torch.no_grad():
                logits = self._score_fast(fast, du, dc, sizes[0])
        else:
            logits = self._score_general(requests, sizes)
        scores = torch.sigmoid(logits).cpu()
        self.counts["requests"] += len(requests)
        self.counts["candidates"] += sum(sizes)
        out, at = [], 0
        for r, n in zip(requests, sizes):
            s = scores[at: at + n]
            at += n
            tasks = None
            if s.dim() == 2:  # several tasks: rank by the first
                tasks = dict(zip(self.tasks, s.t().contiguous()))  # rows C-contiguous
                s = tasks[self.tasks[0]]
            order = torch.argsort(s, descending=True, stable=True)
            ids = None if r.ids is None else list(map(r.ids.__getitem__, order.tolist()))
            out.append(Ranking(s, order, ids, self.step, tasks))
        return out

    def _score_general(self, requests: Sequence[Request], sizes: list[int]) -> torch.Tensor:
        """Logits of any requests: every feature a column of raw values, hashed, pooled."""
        raw_u = self._user_raw(requests)
        raw_c = {f: _cat_raw([raw_column(f, r.candidates.get(f, [[]] * n), n, "candidates")
                              for r, n in zip(requests, sizes)])
                 for f in self._candidate_side()}
        for raw, side in ((raw_u, "user"), (raw_c, "candidates")):
            for f in self.semantic.keys() & raw.keys():
                raw[f] = _semantic(raw[f], f, side)
        hashed = hash_columns([*raw_u.items(), *raw_c.items()])
        user_cols = dict(zip(raw_u, hashed[: len(raw_u)]))
        cand_cols = dict(zip(raw_c, hashed[len(raw_u):]))
        du, dc = self._dense(requests, sizes)
        owner = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(sizes))
        with torch.no_grad():
            return self.score_keys(user_cols, cand_cols, owner, du, dc)

    def _score_fast(self, keys: torch.Tensor, du: torch.Tensor, dc: torch.Tensor, n: int
                    ) -> torch.Tensor:
        """Logits of one request from :class:`FastPath` keys ``[Fu + n Fc]``."""
        assert self.fast is not None
        dev = self.device
        rows = self.rows[self.fast.table].lookup(keys)  # [Fu + n Fc, D]
        fu = len(self.fast.user)
        state, partial = self.run["user"](du.to(dev), rows[:fu].unsqueeze(0))
        cands = rows[fu:].view(n, len(self.fast.cand), rows.shape[1])
        return self.run["candidate"](state, partial, dc.to(dev), cands)

    def _user_raw(self, requests: Sequence[Request]
                  ) -> dict[str, tuple[np.ndarray, bool, np.ndarray]]:
        """Raw user-side columns over the requests; the common case (one integer id per
        feature) in one array conversion per request."""
        feats = self._user_side()
        if len(requests) == 1:
            vals = [requests[0].user.get(f, []) for f in feats]
            if all(type(v) is int for v in vals):
                try:
                    ids = np.asarray(vals, np.int64)
                except OverflowError:  # a uint64 id: the general path reports it
                    ids = None
                if ids is not None:
                    one = np.ones(1, np.int64)
                    return {f: (ids[i: i + 1], False, one) for i, f in enumerate(feats)}
        return {f: _cat_raw([raw_column(f, [r.user.get(f, [])], 1, "user")
                             for r in requests]) for f in feats}

    def _num_candidates(self, r: Request, i: int) -> int:
        lens = {len(v) for v in r.candidates.values()}
        if r.ids is not None:
            lens.add(len(r.ids))
        if r.candidate_dense is not None:
            lens.add(len(r.candidate_dense))
        if len(lens) != 1:
            raise RequestError(f"request {i}: candidates: features, ids and dense rows "
                               f"disagree on the number of candidates ({sorted(lens)})")
        n = lens.pop()
        if n < 1:
            raise RequestError(f"request {i}: candidates: none to score")
        return n

    def _user_side(self) -> list[str]:
        return self.user_features if self.mode == "split" else [
            f for f in self.order if f not in self.candidate_features]

    def _candidate_side(self) -> list[str]:
        return self.candidate_features

    def _dense(self, requests: Sequence[Request], sizes: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        nd = self.num_dense
        du = torch.zeros(len(requests), nd if self.user_dense else 0)
        dc = torch.zeros(sum(sizes), 0 if self.user_dense else nd)
        at = 0
        for i, (r, n) in enumerate(zip(requests, sizes)):
            src, name = (r.dense, "dense") if self.user_dense else (r.candidate_dense,
                                                                    "candidate_dense")
            if nd and src is None:
                raise RequestError(f"request {i}: {name}: required ({nd} dense features)")
            if not nd:
                continue
            try:
                t = torch.as_tensor(src, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise RequestError(f"request {i}: {name}: must be numbers") from None
            want = (nd,) if self.user_dense else (n, nd)
            if tuple(t.shape) != want:
                raise RequestError(f"request {i}: {name}: shape {list(t.shape)}, "
                                   f"expected {list(want)}")
            if not bool(torch.isfinite(t).all()):
                raise RequestError(f"request {i}: {name}: NaN or infinite value")
            if self.user_dense:
                du[i] = t
            else:
                dc[at: at + n] = t
            at += n
        return du, dc

    # -- keys → logits -----------------------------------------------------------
    def score_keys(self, user: dict[str, Column], cand: dict[str, Column],
                   owner: torch.Tensor, dense_user: torch.Tensor, dense_cand: torch.Tensor
                   ) -> torch.Tensor:
        """Logits ``[N]`` of hashed inputs: per feature ``(keys, lengths)`` over ``U``
        users / ``N`` candidates, ``owner [N]`` each candidate's user (non-decreasing:
        a user's candidates are consecutive), dense ``[U, Du]`` / ``[N, Dc]`` (the side
        that has none: width 0). Each table's keys of both sides are looked up at once."""
        dev = self.device
        dense_user, dense_cand = dense_user.to(dev), dense_cand.to(dev)
        u, n = dense_user.shape[0], owner.numel()
        ufeat = self._user_side()
        pu, pc = self._pool([(user, ufeat, u), (cand, self.candidate_features, n)])
        if self.mode == "single":
            pooled = dict(zip(ufeat, (p[owner.to(dev)] for p in pu)))
            pooled.update(zip(self.candidate_features, pc))
            dense = dense_user[owner.to(dev)] if self.user_dense else dense_cand
            return self.run["model"](dense, torch.cat([pooled[f] for f in self.order], 1))
        state, partial = self.run["user"](dense_user, torch.stack(pu, 1))
        cands = _stack(pc, n, self.dim, dev)
        counts = torch.bincount(owner, minlength=u).tolist()
        out, at = [], 0
        for i, k in enumerate(counts):  # one program call per user, over its candidates
            if k:
                out.append(self.run["candidate"](
                    state[i: i + 1], partial[i: i + 1], dense_cand[at: at + k],
                    cands[at: at + k]))
            at += k
        return torch.cat(out) if len(out) > 1 else out[0]

    def _pool(self, sides: list[tuple[dict[str, Column], list[str], int]]
              ) -> list[list[torch.Tensor]]:
        """Pooled ``[n, dim]`` per feature of each side ``(cols, feats, n)``: the keys of
        one table over every side are looked up in one call (duplicates as they are;
        only the cache's misses are made unique)."""
        out: dict[tuple[int, str], torch.Tensor] = {}
        by_table: dict[str, list[tuple[int, str]]] = {}
        for i, (_, feats, _) in enumerate(sides):
            for f in feats:
                by_table.setdefault(self.table_of[f], []).append((i, f))
        for table, members in by_table.items():
            keys = torch.cat([sides[i][0][f][0] for i, f in members])
            lengths = torch.cat([sides[i][0][f][1] for i, f in members])
            rows = self.rows[table].lookup(keys)  # [M, dim], duplicates looked up as is
            if bool((lengths == 1).all()):  # one value per bag: the rows are the bags
                bags = rows
            else:
                offsets = torch.zeros(lengths.numel(), dtype=torch.int64)
                torch.cumsum(lengths[:-1], 0, out=offsets[1:])
                mode = "mean" if self.tables[table]["pooling"] == "mean" else "sum"
                bags = nn.functional.embedding_bag(
                    torch.arange(keys.numel(), device=self.device), rows,
                    offsets.to(self.device), mode=mode)
            at = 0
            for i, f in members:
                n = sides[i][2]
                out[(i, f)] = bags[at: at + n]
                at += n
        return [[out[(i, f)] for f in feats] for i, (_, feats, _) in enumerate(sides)]

    def stats(self) -> dict[str, Any]:
        """Requests, candidates and per-table cache statistics (hit rate included)."""
        tables = {}
        for name, r in self.rows.items():
            s = r.stats()
            looked = s["hits"] + s["misses"]
            s["hit_rate"] = s["hits"] / looked if looked else 0.0
            tables[name] = s
        return {**self.counts, "step": self.step, "dense_dtype": self.dense_dtype,
                "tables": tables,
                "overlay_rows": self.overlay.rows, "overlay_max_rows": self.overlay.max_rows,
                "deltas": self.deltas}

    def close(self) -> None:
        self.store.close()


def _stack(pooled: list[torch.Tensor], n: int, dim: int, device: torch.device
           ) -> torch.Tensor:
    """``[n, F, dim]`` of ``F`` pooled ``[n, dim]`` (``F`` may be 0)."""
    return torch.stack(pooled, 1) if pooled else torch.zeros(n, 0, dim, device=device)


def _semantic(raw: tuple[np.ndarray, bool, np.ndarray], feature: str, where: str
              ) -> tuple[np.ndarray, bool, np.ndarray]:
    """A semantic-id column: its integer tokens replaced by their prefix keys."""
    payload, hashed, lengths = raw
    if hashed and payload.size:
        raise RequestError(f"{where}.{feature}: semantic-id tokens must be integers")
    return semantic_id_keys(payload, lengths, feature), True, lengths


def _cat_raw(cols: list[tuple[np.ndarray, bool, np.ndarray]]
             ) -> tuple[np.ndarray, bool, np.ndarray]:
    """One raw column of several requests' (a feature sends ids or strings, not both)."""
    if len(cols) == 1:
        return cols[0]
    kinds = {h for p, h, _ in cols if p.size}
    if len(kinds) > 1:
        raise RequestError("a feature has integer ids in one request and strings in "
                           "another: score them apart")
    return (np.concatenate([p for p, _, _ in cols]), kinds.pop() if kinds else True,
            np.concatenate([n for _, _, n in cols]))

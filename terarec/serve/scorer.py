"""Request-centric candidate scoring from a bundle: :class:`Scorer`.

A request is one user (user/context features, maybe dense features) and ``N``
candidates. The scorer hashes raw values to keys exactly as training did
(``data/keys.py``: integer ids and strings, salted by feature), looks each table's
distinct keys up once through its row cache (``serve/rowstore.py``; absent keys read as
zero rows), pools them per feature (the table's sum/mean), runs the user program once
and the candidate program once over all ``N`` candidates (``models/split.py`` says
what each computes), and ranks by score. Several requests can be scored in one call
(:meth:`Scorer.score_many`): their users and candidates are stacked and every
candidate carries the index of its user.

Feature values, per feature: one value (``int`` id or ``str``) or a list of values
(multi-valued; ``[]`` = missing). For candidates, a list of ``N`` such entries. A
feature left out of a request is missing (pools to zeros, as an empty bag in training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from terarec.data.keys import int_keys, string_keys
from terarec.serve import bundle as b
from terarec.serve.rowstore import CachedRows, RowStore

Column = tuple[torch.Tensor, torch.Tensor]  # (keys int64 [M], lengths int64 [B])
MAX_INT = np.iinfo(np.uint64).max


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
    request named them) and the model ``step`` that scored them."""

    scores: torch.Tensor
    order: torch.Tensor
    ids: Optional[list[Any]]
    step: int


def hash_column(feature: str, values: Sequence[Any], n: int, where: str) -> Column:
    """Keys and lengths of ``n`` entries of one feature (see the module docstring)."""
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
    return torch.from_numpy(_keys(feature, flat, where)), torch.from_numpy(lengths)


def _keys(feature: str, flat: list[Any], where: str) -> np.ndarray:
    if not flat:
        return np.empty(0, np.int64)
    kind = type(flat[0])
    if kind is str:
        try:
            arr = pa.array(flat, pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise RequestError(f"{where}.{feature}: mixes strings and other values") from None
        present, keys, _ = string_keys(arr, feature)
        if not present.all():
            raise RequestError(f"{where}.{feature}: empty string value (send [] for missing)")
        return keys
    if kind is int:
        try:
            ids = np.asarray(flat)
        except (OverflowError, ValueError):
            raise RequestError(f"{where}.{feature}: ids must be int64/uint64 integers") from None
        if ids.dtype.kind not in "iu" or ids.ndim != 1:
            raise RequestError(f"{where}.{feature}: values must be all integers or all "
                               "strings")
        return int_keys(ids.astype(np.uint64) if ids.dtype.kind == "u" else ids, feature)
    raise RequestError(f"{where}.{feature}: values must be integer ids or strings, got "
                       f"{kind.__name__}")


class Scorer:
    """Scores requests with a bundle. Build with :meth:`from_bundle`.

    Args:
        root: the bundle directory.
        manifest: its manifest (read and checked).
        device: where pooled embeddings, cached rows and the programs live.
        cache_bytes: budget of the row caches (all tables; split by their row counts).
    """

    def __init__(self, root: Path, manifest: dict[str, Any], device: str | torch.device,
                 cache_bytes: int) -> None:
        self.root, self.manifest = Path(root), manifest
        self.device = torch.device(device)
        self.step = int(manifest["step"])
        feats = manifest["features"]
        self.mode = manifest["model"]["mode"]
        self.order: list[str] = feats["order"]
        self.user_features: list[str] = feats["user"]
        self.candidate_features: list[str] = feats["candidate"]
        self.user_dense: bool = feats["user_dense"]
        self.num_dense = len(feats["dense"])
        self.table_of: dict[str, str] = feats["table"]
        self.tables = manifest["tables"]
        self.store = RowStore(self.root / b.ROWS, manifest["row_dtype"])
        total = max(1, sum(t["rows"] for t in self.tables.values()))
        self.rows: dict[str, CachedRows] = {}
        for name, t in self.tables.items():
            share = cache_bytes * max(t["rows"], 1) // total
            cap = min(int(share // (4 * t["dim"] + 16)), t["rows"] + (1 << 16))
            self.rows[name] = CachedRows(self.store, t["id"], t["dim"], cap, self.device)
        progs = manifest["model"]["programs"]
        self.programs: dict[str, nn.Module] = {
            part: b.load_program(self.root / f).to(self.device) for part, f in progs.items()}
        self.counts = {"requests": 0, "candidates": 0}

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device = "cpu",
                    cache_bytes: int = 256 << 20, verify: str = "programs") -> Scorer:
        """Opens bundle ``path`` (checked: :func:`~terarec.serve.bundle.read_manifest`
        with ``verify``)."""
        return cls(Path(path), b.read_manifest(Path(path), verify), device, cache_bytes)

    # -- requests ----------------------------------------------------------------
    def score(self, request: Request) -> Ranking:
        """Scores and ranks one request."""
        return self.score_many([request])[0]

    def score_many(self, requests: Sequence[Request]) -> list[Ranking]:
        """Scores several requests in one pass (their rows looked up together)."""
        sizes = [self._num_candidates(r, i) for i, r in enumerate(requests)]
        user_cols, cand_cols = {}, {}
        known = set(self.order)
        for i, r in enumerate(requests):
            for side, feats in (("user", r.user), ("candidates", r.candidates)):
                for f in feats:
                    if f not in known:
                        raise RequestError(f"request {i}: {side}.{f}: not a feature of "
                                           f"the model (it has {self.order})")
        for f in self._user_side():
            user_cols[f] = _cat([hash_column(f, [r.user.get(f, [])], 1, "user")
                                 for r in requests])
        for f in self._candidate_side():
            cand_cols[f] = _cat([hash_column(f, r.candidates.get(f, [[]] * n), n, "candidates")
                                 for r, n in zip(requests, sizes)])
        du, dc = self._dense(requests, sizes)
        owner = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(sizes))
        with torch.no_grad():
            logits = self.score_keys(user_cols, cand_cols, owner, du, dc)
        scores = torch.sigmoid(logits).cpu()
        self.counts["requests"] += len(requests)
        self.counts["candidates"] += sum(sizes)
        out, at = [], 0
        for r, n in zip(requests, sizes):
            s = scores[at: at + n]
            at += n
            order = torch.argsort(s, descending=True, stable=True)
            ids = None if r.ids is None else [r.ids[j] for j in order.tolist()]
            out.append(Ranking(s, order, ids, self.step))
        return out

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
        users / ``N`` candidates, ``owner [N]`` each candidate's user, dense
        ``[U, Du]`` / ``[N, Dc]`` (the side that has none: width 0)."""
        dev = self.device
        owner, dense_user, dense_cand = owner.to(dev), dense_user.to(dev), dense_cand.to(dev)
        u = dense_user.shape[0]
        if self.mode == "split":
            pu = self._pool(user, self.user_features, u)
            pc = self._pool(cand, self.candidate_features, owner.numel())
            slots, partial = self.programs["user"](dense_user, torch.stack(pu, 1))
            return self.programs["candidate"](slots, partial, owner, dense_cand,
                                              _stack(pc, owner.numel(), slots.shape[2], dev))
        ufeat = self._user_side()
        pooled = dict(zip(ufeat, (p[owner] for p in self._pool(user, ufeat, u))))
        pooled.update(zip(self.candidate_features,
                          self._pool(cand, self.candidate_features, owner.numel())))
        dense = dense_user[owner] if self.user_dense else dense_cand
        return self.programs["model"](dense, torch.cat([pooled[f] for f in self.order], 1))

    def _pool(self, cols: dict[str, Column], feats: list[str], n: int
              ) -> list[torch.Tensor]:
        """Pooled ``[n, dim]`` per feature of ``feats`` (one lookup per table)."""
        out: dict[str, torch.Tensor] = {}
        by_table: dict[str, list[str]] = {}
        for f in feats:
            by_table.setdefault(self.table_of[f], []).append(f)
        for table, fs in by_table.items():
            keys = torch.cat([cols[f][0] for f in fs])
            lengths = torch.cat([cols[f][1] for f in fs])
            uniq, inv = torch.unique(keys, return_inverse=True)
            rows = self.rows[table].lookup(uniq)
            offsets = torch.zeros(lengths.numel(), dtype=torch.int64)
            torch.cumsum(lengths[:-1], 0, out=offsets[1:])
            mode = "mean" if self.tables[table]["pooling"] == "mean" else "sum"
            bags = nn.functional.embedding_bag(inv.to(self.device), rows,
                                               offsets.to(self.device), mode=mode)
            for j, f in enumerate(fs):
                out[f] = bags[j * n: (j + 1) * n]
        return [out[f] for f in feats]

    def stats(self) -> dict[str, Any]:
        """Requests, candidates and per-table cache statistics (hit rate included)."""
        tables = {}
        for name, r in self.rows.items():
            s = r.stats()
            looked = s["hits"] + s["misses"]
            s["hit_rate"] = s["hits"] / looked if looked else 0.0
            tables[name] = s
        return {**self.counts, "step": self.step, "tables": tables}

    def close(self) -> None:
        self.store.close()


def _stack(pooled: list[torch.Tensor], n: int, dim: int, device: torch.device
           ) -> torch.Tensor:
    """``[n, F, dim]`` of ``F`` pooled ``[n, dim]`` (``F`` may be 0)."""
    return torch.stack(pooled, 1) if pooled else torch.zeros(n, 0, dim, device=device)


def _cat(cols: list[Column]) -> Column:
    return torch.cat([k for k, _ in cols]), torch.cat([n for _, n in cols])

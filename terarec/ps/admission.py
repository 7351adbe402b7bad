"""Frequency-based admission of new embedding rows: a count-min sketch of key counts.

A table with admission creates a key's row only once the key has been seen
``threshold`` times; until then the key reads as zeros and its gradient is dropped. Rows
for one-off ids (most ids of a long-tailed feature) are never created, which bounds the
memory of the tiers by the ids that recur. The counts live in a count-min sketch, whose
memory is fixed however many distinct keys pass.

**Count-min sketch** (Cormode & Muthukrishnan, 2005). ``depth`` rows of ``width``
int32 counters, ``C [depth, width]``, and one hash per row,
``h_r(k) = fastrange(mix64(k ^ salt_r), width)`` (``salt_r`` derived from ``seed``;
``fastrange(x, w) = (x >>> 32) * w >> 32``, the top 32 bits scaled to ``[0, w)``)::

    add(k, c):     C[r, h_r(k)] += c          for every row r
    estimate(k):   min_r C[r, h_r(k)]

Every cell of ``k`` holds ``k``'s own count plus the counts of the keys that collide with
it in that row, so an estimate is **never below the true count** ``f(k)``. With ``N`` the
total of all counts added (``total``), ``ε = e / width`` and ``δ = e^-depth``,
Markov's inequality on each row and the independence of the rows give::

    P[ estimate(k) > f(k) + ε·N ]  <=  δ

For example ``width = 2^20, depth = 4`` (16 MiB of counters) over ``N = 10^8``
occurrences: an estimate exceeds the truth by more than ``ε·N ≈ 259`` with probability
at most ``e^-4 ≈ 1.8%``, and on skewed (Zipf) streams the error is far smaller, since
most of ``N`` sits in a few hot keys that hit few cells.

**Conservative update** (Estan & Varghese, 2002), used by :class:`Admission` by default:
for a batch of *unique* keys with counts ``c``, each cell of ``k`` is raised only to
``max(C[r, h_r(k)], estimate(k) + c(k))`` (one ``scatter_reduce_`` with ``amax``, so keys
sharing a cell in one batch are handled without a loop). Estimates are still never below
the truth and never above the plain update's (same hashes), and the error on skewed
streams drops by a large factor. It is only exact for unique keys: a key twice in one
call would be counted once.

**Saturation and ageing.** Counters are int32 and saturate at ``2^31 - 1`` instead of
wrapping (a plain ``index_add_`` when the touched cells have room, an int64 pass
otherwise). :meth:`CountMinSketch.decay` halves every counter (``C >>= 1``), so old
occurrences fade; the never-below guarantee holds against the halved true counts
(``floor(a + b) / 2 >= floor(a / 2)``).

Shapes, with ``N`` keys per call::

    sketch = CountMinSketch(width=1 << 20, depth=4, device="cpu", seed=0)
    sketch.add(keys)                      # keys int64 [N], duplicates allowed
    sketch.add(keys, counts)              # counts int [N] >= 0
    sketch.estimate(keys)                 # int64 [N], >= true counts

    adm = Admission(threshold=3, width=1 << 20, depth=4)
    uniq, counts = torch.unique(batch_keys, return_counts=True)
    new = uniq[slots < 0]                 # keys without a row (the index probe missed)
    ok = adm.observe_and_admit(new, counts[slots < 0])   # bool [U]: create these rows

Everything is torch ops on the sketch's device (no Python loop over keys); each call
reads one or two scalars back (the batch total, the admitted count).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from terarec.hashing import GOLDEN, mix64_np, mix64_torch

INT32_MAX = 2**31 - 1
_STAT_KEYS = ("observed", "admitted", "rejected", "rejected_values", "decays")
_LOW32 = (1 << 32) - 1


def _row_salts(seed: int, depth: int) -> list[int]:
    """``depth`` 64-bit salts (as int64) derived from ``seed``: one hash per row."""
    x = np.array([(seed * 1_000_003 + (r + 1) * GOLDEN) % 2**64 for r in range(depth)], np.uint64)
    return mix64_np(x).view(np.int64).tolist()


class CountMinSketch:
    """Approximate counts of int64 keys in fixed memory (``4 * width * depth`` bytes).

    Args:
        width: counters per row, ``1 .. 2^31 - 1``; the additive error is ``≈ e/width``
            of the total count.
        depth: rows (independent hashes), ``1 .. 32``; the error bound fails with
            probability ``≈ e^-depth``.
        device: where the counters live.
        seed: picks the hash functions (a checkpoint must be loaded with the same one).
    """

    def __init__(
        self, width: int, depth: int = 4, device: torch.device | str = "cpu", seed: int = 0
    ) -> None:
        if not 1 <= width <= INT32_MAX:
            raise ValueError(f"count-min sketch: width must be in [1, 2^31 - 1], got {width}")
        if not 1 <= depth <= 32:
            raise ValueError(f"count-min sketch: depth must be in [1, 32], got {depth}")
        self.width = width
        self.depth = depth
        self.seed = seed
        self.device = torch.device(device)
        self._counters = torch.zeros(depth, width, dtype=torch.int32, device=self.device)
        self._flat = self._counters.view(-1)
        self._salts = torch.tensor(_row_salts(seed, depth), device=self.device).view(-1, 1)
        self._offsets = (torch.arange(depth, device=self.device) * width).view(-1, 1)
        # Upper bound on every counter: while bound + batch total fits in int32, the
        # plain int32 index_add_ cannot overflow and needs no check.
        self._bound = 0
        self._scratch: Optional[torch.Tensor] = None  # int64, only once saturating
        self.total = 0  # sum of all counts added (halved by decay): N of the error bound

    @property
    def epsilon(self) -> float:
        """Relative additive error ``e / width`` of the bound."""
        return math.e / self.width

    @property
    def delta(self) -> float:
        """Probability ``e^-depth`` that an estimate exceeds the bound."""
        return math.exp(-self.depth)

    @property
    def nbytes(self) -> int:
        return self._counters.numel() * self._counters.element_size()

    @property
    def counters(self) -> torch.Tensor:
        """The counters ``[depth, width]`` int32 (read-only view for inspection)."""
        return self._counters

    # -- hashing --------------------------------------------------------------------
    def cells(self, keys: torch.Tensor) -> torch.Tensor:
        """Flat counter index of each key in each row.

        Args:
            keys: int64 ``[N]``.
        Returns:
            int64 ``[depth, N]``: ``r * width + h_r(key)``.
        """
        k = keys.to(self.device, torch.int64).reshape(1, -1)
        h = mix64_torch(k ^ self._salts)  # [depth, N]
        return (((h >> 32) & _LOW32) * self.width >> 32) + self._offsets

    # -- public ops -----------------------------------------------------------------
    def add(
        self,
        keys: torch.Tensor,
        counts: Optional[torch.Tensor] = None,
        *,
        conservative: bool = False,
    ) -> None:
        """Adds ``counts`` (default 1 each) occurrences of ``keys``.

        Args:
            keys: int64 ``[N]``; duplicates allowed unless ``conservative``.
            counts: integer ``[N]``, ``>= 0`` (values above ``2^31 - 1`` are clipped).
            conservative: conservative update (see the module docstring); ``keys`` must
                then be unique.
        """
        cells = self.cells(keys)
        self._add_cells(cells, self._counts(counts, cells.shape[1]), conservative)

    def estimate(self, keys: torch.Tensor) -> torch.Tensor:
        """Estimated count of each key: int64 ``[N]``, never below the true count."""
        return self._estimate_cells(self.cells(keys))

    def decay(self) -> None:
        """Halves every counter (ageing: old occurrences weigh less)."""
        self._counters.bitwise_right_shift_(1)
        self.total //= 2
        self._bound = int(self._counters.max()) if self._counters.numel() else 0

    def clear(self) -> None:
        self._counters.zero_()
        self.total = 0
        self._bound = 0

    # -- internals, shared with Admission (one hashing per batch) ---------------------
    def _counts(self, counts: Optional[torch.Tensor], n: int) -> torch.Tensor:
        if counts is None:
            return torch.ones(n, dtype=torch.int64, device=self.device)
        c = counts.to(self.device, torch.int64).reshape(-1)
        if c.numel() != n:
            raise ValueError(f"count-min sketch: {n} keys but {c.numel()} counts")
        if n and int(c.min()) < 0:
            raise ValueError("count-min sketch: counts must be >= 0")
        return c.clamp(max=INT32_MAX)

    def _estimate_cells(self, cells: torch.Tensor) -> torch.Tensor:
        if cells.shape[1] == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        return self._flat[cells].amin(dim=0).to(torch.int64)

    def _add_cells(self, cells: torch.Tensor, c: torch.Tensor, conservative: bool) -> None:
        n = cells.shape[1]
        if n == 0:
            return
        total = int(c.sum())
        self.total += total
        flat = cells.reshape(-1)
        if conservative:
            # Raise each cell to (the key's estimate + its count); clipping makes it
            # saturate, and scatter_reduce "amax" settles keys sharing a cell.
            new = (self._estimate_cells(cells) + c).clamp_(max=INT32_MAX).to(torch.int32)
            self._flat.scatter_reduce_(0, flat, new.expand(self.depth, n).reshape(-1), "amax")
        elif self._bound + total <= INT32_MAX or int(self._flat[flat].max()) + total <= INT32_MAX:
            self._flat.index_add_(0, flat, c.to(torch.int32).expand(self.depth, n).reshape(-1))
        else:
            self._add_saturating(flat, c.expand(self.depth, n).reshape(-1))
        self._bound = min(self._bound + total, INT32_MAX)

    def _add_saturating(self, flat: torch.Tensor, c: torch.Tensor) -> None:
        """``C[flat] += c`` (duplicates summed), clipped at ``2^31 - 1``, via int64."""
        if self._scratch is None:
            self._scratch = torch.zeros(self._flat.numel(), dtype=torch.int64, device=self.device)
        self._scratch.index_add_(0, flat, c)
        new = (self._flat[flat].to(torch.int64) + self._scratch[flat]).clamp_(max=INT32_MAX)
        self._flat[flat] = new.to(torch.int32)  # duplicates of a cell write the same value
        self._scratch[flat] = 0

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``width``, ``depth``, ``seed``, ``total`` and a copy of the counters (CPU)."""
        return {
            "width": self.width,
            "depth": self.depth,
            "seed": self.seed,
            "total": self.total,
            "counters": self._counters.detach().to("cpu", copy=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the geometry and seed must match this sketch's.

        Raises:
            ValueError: a missing entry, another width/depth/seed (the counters would
                mean nothing under other hashes), or counters of the wrong shape/dtype.
        """
        for name in ("width", "depth", "seed", "total", "counters"):
            if name not in state:
                raise ValueError(f"count-min sketch state: missing {name!r}")
        for name in ("width", "depth", "seed"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(
                    f"count-min sketch state: {name} {int(state[name])} in the checkpoint, "
                    f"{getattr(self, name)} here (counters need the same {name})"
                )
        counters = state["counters"]
        if tuple(counters.shape) != (self.depth, self.width) or counters.dtype != torch.int32:
            raise ValueError(
                f"count-min sketch state: counters {counters.dtype} {tuple(counters.shape)}, "
                f"expected torch.int32 {(self.depth, self.width)}"
            )
        self._counters.copy_(counters)
        self.total = int(state["total"])
        self._bound = int(self._counters.max())


class Admission:
    """Admits a key (creates its row) once it has been seen ``threshold`` times.

    Feed it, once per training step, the unique keys that have no row yet and how often
    each occurs in the batch; it returns which of them to create now. Keys that already
    have a row should not be observed again (their counts would only add collisions).

    Args:
        threshold: occurrences before a key is admitted, ``>= 1``; 1 admits every key
            without a sketch (no memory, no work).
        width, depth, device, seed: the :class:`CountMinSketch` (``4 * width * depth``
            bytes). Size ``width`` to a few times the number of distinct keys expected
            between decays for near-exact counts.
        conservative: conservative update (tighter counts; needs unique keys, which
            :meth:`observe_and_admit` requires anyway).
        decay_every: halve the counts after every ``decay_every`` calls (0: never), so a
            key must recur within a window rather than over the whole run.
    """

    def __init__(
        self,
        threshold: int,
        width: int = 1 << 20,
        depth: int = 4,
        device: torch.device | str = "cpu",
        seed: int = 0,
        conservative: bool = True,
        decay_every: int = 0,
    ) -> None:
        if not 1 <= threshold <= INT32_MAX:
            raise ValueError(f"admission: threshold must be in [1, 2^31 - 1], got {threshold}")
        if decay_every < 0:
            raise ValueError(f"admission: decay_every must be >= 0, got {decay_every}")
        self.threshold = threshold
        self.device = torch.device(device)
        self.conservative = conservative
        self.decay_every = decay_every
        self.sketch = CountMinSketch(width, depth, self.device, seed) if threshold > 1 else None
        self._calls = 0
        self._stats = dict.fromkeys(_STAT_KEYS, 0)

    def observe_and_admit(
        self, unique_keys: torch.Tensor, counts: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Counts this batch's occurrences; returns which keys are now admitted.

        Args:
            unique_keys: int64 ``[U]``, unique (keys without a row).
            counts: integer ``[U]``, occurrences in this batch (default 1 each).
        Returns:
            bool ``[U]``: True where the key has now been seen ``>= threshold`` times in
            total (this batch included; estimates may admit a key early, never late).
        """
        u = unique_keys.numel()
        self._stats["observed"] += u
        self._calls += 1
        if self.sketch is None:
            self._stats["admitted"] += u
            return torch.ones(u, dtype=torch.bool, device=unique_keys.device)
        c = self.sketch._counts(counts, u)
        cells = self.sketch.cells(unique_keys)
        self.sketch._add_cells(cells, c, self.conservative)
        admitted = self.sketch._estimate_cells(cells) >= self.threshold
        # One read-back for both: keys admitted, and values of the keys left out.
        n_admitted, left_out = torch.stack([admitted.sum(), c[~admitted].sum()]).tolist()
        self._stats["admitted"] += n_admitted
        self._stats["rejected"] += u - n_admitted
        self._stats["rejected_values"] += left_out
        if self.decay_every and self._calls % self.decay_every == 0:
            self.sketch.decay()
            self._stats["decays"] += 1
        return admitted.to(unique_keys.device)

    @property
    def calls(self) -> int:
        """Calls of :meth:`observe_and_admit` so far (training steps, in a table group)."""
        return self._calls

    def stats(self) -> dict[str, float]:
        """Counters summed over calls: ``observed`` keys (unique per call), of which
        ``admitted`` and ``rejected``; ``rejected_values``, the occurrences of the rejected
        keys (``counts`` summed); ``decays``; and the sketch's ``bytes``."""
        out = {k: float(v) for k, v in self._stats.items()}
        out["bytes"] = float(self.sketch.nbytes if self.sketch is not None else 0)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the sketch, the decay phase, the counters."""
        return {
            "threshold": self.threshold,
            "calls": self._calls,
            "stats": dict(self._stats),
            "sketch": self.sketch.state_dict() if self.sketch is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`.

        The threshold may differ from the checkpoint's (it only reads the counts). A
        checkpoint without counts (saved with threshold 1, or ``{}``: saved without
        admission) restores empty counts; counts are dropped when this admission has
        threshold 1.
        """
        self._calls = int(state.get("calls", 0))
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._stats.update({k: int(v) for k, v in state.get("stats", {}).items()})
        if self.sketch is None:
            return
        if state.get("sketch") is None:
            self.sketch.clear()
        else:
            self.sketch.load_state_dict(state["sketch"])

"""The one small interface every tier implements (HugeCTR-style "fill what you have").

A *row* is one float32 vector ``[row_width]`` (the embedding weights, then the optimizer
state, see ``terarec.optim.sparse``) plus its metadata, an int64 pair ``(last_step,
freq)``: the last training step that used the row and how many steps used it. Metadata
moves with the row between tiers (eviction order, TTL). Tiers store rows by unbounded
int64 key.

Contract (``tests/ps/test_tier_contract.py`` checks it for every tier):

* ``find(keys, out, meta=None)`` fills the rows (and metadata) of the keys it holds and
  returns the positions it missed, ascending; duplicate keys are allowed. A chain of
  tiers passes only the missed positions to the next tier.
* ``insert(keys, rows, meta=None)`` inserts or overwrites rows of **unique** keys
  (metadata ``(0, 0)`` where ``meta`` is None) and returns the rows it displaced to make
  room (always empty for an unbounded tier): the caller writes them to the tier below.
* ``evict(keys)`` removes the rows of the keys held (duplicates allowed) and returns how
  many it removed; ``expire(before_step, spare)`` removes the rows last used before
  ``before_step`` (except those ``spare`` names) and returns their keys (TTL).
* ``export(with_meta=False)``, ``flush()``, ``stats()``, ``len()``, ``name``,
  ``row_width``.

Keys may live on any device; positions come back on the keys' device. Bad dtypes or
shapes raise ``ValueError`` naming the tier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch

META_WIDTH = 2  # (last_step, freq)
LAST, FREQ = 0, 1
# Stats keys every tier reports (caches add ``evictions``, the SSD tier ``writes`` and
# its DB gauges).
STAT_KEYS = ("rows", "bytes", "hits", "misses", "inserts", "deletes", "expired")

Spare = Callable[[torch.Tensor], torch.Tensor]  # keys [N] -> bool [N]: keep these
Export = Union[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Rows(NamedTuple):
    """A batch of rows with their keys and metadata (what moves between tiers)."""

    keys: torch.Tensor  # int64 [N]
    rows: torch.Tensor  # float32 [N, row_width]
    meta: torch.Tensor  # int64 [N, 2]: (last_step, freq)

    @staticmethod
    def empty(row_width: int, device: torch.device | str = "cpu") -> Rows:
        return Rows(
            torch.empty(0, dtype=torch.int64, device=device),
            torch.empty(0, row_width, device=device),
            torch.empty(0, META_WIDTH, dtype=torch.int64, device=device),
        )

    def __repr__(self) -> str:
        return f"Rows(n={self.keys.numel()}, row_width={self.rows.shape[-1]})"


def zero_meta(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Metadata of rows never used: int64 ``[n, 2]`` zeros."""
    return torch.zeros(n, META_WIDTH, dtype=torch.int64, device=device)


def check_batch(
    tier: str,
    row_width: int,
    keys: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    meta: Optional[torch.Tensor] = None,
    what: str = "rows",
) -> None:
    """Raises ValueError (naming ``tier``) unless ``keys`` is int64 ``[N]``, ``rows``
    (if given) a float ``[N, row_width]`` and ``meta`` (if given) int64 ``[N, 2]``."""
    if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 or keys.dim() != 1:
        got = f"{keys.dtype} {tuple(keys.shape)}" if isinstance(keys, torch.Tensor) else type(keys)
        raise ValueError(f"{tier} tier: keys must be int64 [N], got {got}")
    n = keys.numel()
    if rows is not None and (
        not rows.is_floating_point() or rows.dim() != 2 or rows.shape != (n, row_width)
    ):
        raise ValueError(
            f"{tier} tier: {what} must be float [{n}, {row_width}], got {rows.dtype} "
            f"{tuple(rows.shape)}"
        )
    if meta is not None and (meta.dtype != torch.int64 or meta.shape != (n, META_WIDTH)):
        raise ValueError(
            f"{tier} tier: meta must be int64 [{n}, {META_WIDTH}] (last_step, freq), got "
            f"{meta.dtype} {tuple(meta.shape)}"
        )


@runtime_checkable
class Tier(Protocol):
    """Storage for rows keyed by int64 ids (see the module docstring for the contract)."""

    name: str
    row_width: int

    def __len__(self) -> int:
        """Number of rows held."""
        ...

    def find(
        self, keys: torch.Tensor, out: torch.Tensor, meta: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Copies the rows of present keys into ``out`` (and their metadata into ``meta``).

        Args:
            keys: int64 ``[N]`` (duplicates allowed).
            out: float32 ``[N, row_width]``; rows of absent keys are left untouched.
            meta: optional int64 ``[N, 2]``, filled like ``out``.
        Returns:
            int64 ``[M]`` positions (into ``keys``, ascending) that were missed.
        """
        ...

    def insert(
        self, keys: torch.Tensor, rows: torch.Tensor, meta: Optional[torch.Tensor] = None
    ) -> Rows:
        """Inserts or overwrites rows. keys: int64 ``[N]`` unique; rows ``[N, row_width]``;
        meta int64 ``[N, 2]`` (None: zeros). Returns the rows displaced to make room."""
        ...

    def evict(self, keys: torch.Tensor) -> int:
        """Removes the rows of ``keys`` ``[N]`` that are held; returns how many were."""
        ...

    def expire(self, before_step: int, spare: Optional[Spare] = None) -> torch.Tensor:
        """Removes the rows last used before ``before_step`` (never those ``spare(keys)``
        marks, nor rows locked for a step from ``before_step`` on); returns their keys."""
        ...

    def export(self, with_meta: bool = False) -> Export:
        """All ``(keys [R], rows [R, row_width])`` held (``+ meta [R, 2]`` with_meta)."""
        ...

    def flush(self) -> None:
        """Makes every written row durable (no-op for memory tiers)."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters: at least :data:`STAT_KEYS`."""
        ...


class TierFullError(RuntimeError):
    """A tier cannot take the rows asked for without evicting locked rows.

    Attributes:
        table: the table whose batch did not fit (None where the tier does not know it;
            the chain fills it in).
        tier: the tier's name (``device``, ``host``).
    """

    def __init__(self, message: str, table: Optional[str] = None, tier: str = "") -> None:
        super().__init__(message)
        self.table = table
        self.tier = tier


@runtime_checkable
class Cache(Tier, Protocol):
    """A bounded tier addressed by slot: the device tier and the budgeted host tier.

    Beyond :class:`Tier`, a tier chain (``ps/store/chain.py``) needs from every tier above its
    bottom one: ``capacity`` rows in slots ``0 .. capacity - 1``, lookups that return
    slots, rows read / written / updated in place by slot, per-slot metadata and a lock
    (the step until which a row may not be evicted), admission with eviction by policy,
    and exclusive moves (``take``, ``remove``). ``tests/ps/test_tier_contract.py`` checks
    the :class:`Tier` part, ``tests/ps/test_cache_tier.py`` the rest.
    """

    capacity: int
    device: torch.device

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key, -1 where absent ``[N]``; counts hits and misses."""
        ...

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        """bool ``[N]`` on the keys' device: which keys are held (counts nothing)."""
        ...

    def touch(self, slots: torch.Tensor, step: int) -> None:
        """Records a use at ``step`` of the rows at unique ``slots`` (freq counts steps)."""
        ...

    def lock(self, slots: torch.Tensor, until_step: int) -> None:
        """Keeps the rows at ``slots`` from eviction while the step is <= ``until_step``."""
        ...

    def room(self, step: int) -> int:
        """Rows :meth:`admit` can place at ``step``: free slots plus evictable ones."""
        ...

    def admit(
        self,
        keys: torch.Tensor,
        rows: torch.Tensor,
        step: int,
        lock_until: int = -1,
        meta: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Rows]:
        """Places absent unique ``keys`` ``[M]`` with ``rows``; returns ``(slots [M],
        evicted rows)``. Raises :class:`TierFullError` when locked rows leave no room."""
        ...

    def take(
        self, keys: torch.Tensor, out: torch.Tensor, meta: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """:meth:`Tier.find`, and the rows found leave the tier; ``keys`` unique."""
        ...

    def remove(self, keys: torch.Tensor) -> Rows:
        """Takes present unique ``keys`` out; returns their rows and metadata."""
        ...

    def read(self, slots: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
        """Rows at ``slots`` ``[N, row_width]`` (the first ``cols`` columns if given)."""
        ...

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites the rows at unique ``slots``."""
        ...

    def update_rows(self, slots: torch.Tensor, grad: torch.Tensor, optimizer: Any) -> None:
        """One fused optimizer step in place on the rows at unique ``slots``."""
        ...

    def read_meta(self, slots: torch.Tensor) -> torch.Tensor:
        """Metadata ``(last_step, freq)`` at ``slots``: int64 ``[N, 2]``."""
        ...

    def insert(  # type: ignore[override]
        self,
        keys: torch.Tensor,
        rows: torch.Tensor,
        meta: Optional[torch.Tensor] = None,
        step: int = 0,
    ) -> Rows:
        """:meth:`Tier.insert`, evicting unlocked rows at ``step`` for the new ones."""
        ...

"""The slot-store protocol: what a table group trains through, whatever holds its rows.

A :class:`~terarec.ps.group.TableGroup` keeps the optimizer, admission, the rows touched
since the last k-step merge and the tables' key namespaces; the rows themselves live in
one *slot store*. Two implement it:

* :class:`~terarec.ps.store.flat.FlatStore`: every row in one unbounded host tier (the
  training device's memory); slots are stable until a compaction;
* :class:`~terarec.ps.store.chain.TierChain`: a device cache over lower tiers (host cache,
  SSD, or an unbounded host tier), rows made resident per batch; slots are valid for
  the step they were prepared for.

Keys are int64 *composite* keys (``ps/group.py``: a table's key xor its namespace salt),
each with its table index (``tables``, int64; None = every key in table 0). A training
step is::

    slots = store.prepare(keys, step, create, tables=..., admit=...)  # [U], -1: not admitted
    rows = store.read(slots)                      # gather
    store.update_rows(slots, grad, optimizer)     # fused optimizer step in place
      (or store.write(slots, optimizer.update(rows, grad)))

``tests/ps/test_store_contract.py`` checks every store against a dict reference through
this protocol only; a new store (e.g. a read-only serving store) joins it by one
parametrisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Protocol, runtime_checkable

import torch

# create(positions [M], out=None) -> rows [M, row_width]: the initial rows of the absent
# keys at ``positions``; written into ``out`` (and returned) when given.
RowSource = Callable[..., torch.Tensor]
# admit(positions [M]) -> bool [M]: which keys absent from every tier get a row.
Admit = Callable[[torch.Tensor], torch.Tensor]
# pairs a TTL sweep deleted: ``(comp [D], tables [D]) -> None``
Expired = Callable[[torch.Tensor, torch.Tensor], None]


def subset(create: RowSource, pos: torch.Tensor) -> RowSource:
    """``create`` for the sub-batch at int64 ``pos`` ``[M]``: its positions map back
    through ``pos``."""

    def sub(p: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return create(pos[p], out)

    return sub


def sweep_every(ttl_steps: int) -> int:
    """Steps between two TTL sweeps of a store: ``max(1, ttl_steps // 4)``."""
    return max(1, ttl_steps // 4)


@runtime_checkable
class SlotStore(Protocol):
    """Rows of one table group, trained by slot (see the module docstring)."""

    row_width: int
    # ``(comp [D], tables [D]) -> None``: told the pairs each TTL sweep deletes (or None)
    on_expire: Optional[Expired]

    @property
    def device(self) -> torch.device:
        """Where the rows training reads and updates live."""
        ...

    def __len__(self) -> int:
        """Rows held, over every table and tier."""
        ...

    def prepare(
        self,
        keys: torch.Tensor,
        step: int,
        create: RowSource,
        tables: Optional[torch.Tensor] = None,
        admit: Optional[Admit] = None,
    ) -> torch.Tensor:
        """Slots of unique (keys, tables) pairs ``[U]`` for training step ``step``,
        creating absent rows with ``create`` (only those ``admit`` accepts; the others
        get slot -1 and no row). ``admit`` is called at most once per table (once in all
        by a store of one table or one tier). Equal keys must be adjacent (sorted)."""
        ...

    def prefetch(
        self, keys: torch.Tensor, step: int, tables: Optional[torch.Tensor] = None
    ) -> bool:
        """Makes the next batch's pairs resident while step ``step`` trains (creates
        nothing); False when it gave up (no room beside the batch being trained)."""
        ...

    def read(self, slots: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
        """Rows at ``slots`` ``[N, row_width]`` (a copy; the first ``cols`` columns)."""
        ...

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites the rows at unique ``slots`` with ``rows [N, row_width]``."""
        ...

    def update_rows(self, slots: torch.Tensor, grad: torch.Tensor, optimizer: Any) -> None:
        """One fused optimizer step in place on the rows at unique ``slots``
        (``grad [N, dim]``; ``optimizer`` a ``RowOptimizer``)."""
        ...

    def lookup_rows(
        self,
        keys: torch.Tensor,
        tables: Optional[torch.Tensor] = None,
        fresh_from: Optional[int] = None,
        meta_out: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows [N, row_width], found [N])`` of pairs (duplicates allowed), zeros
        where absent or (TTL) last used before ``fresh_from``; moves and creates nothing.
        ``meta_out`` (int64 ``[N, 2]``, given): the found rows' ``(last_step, freq)``."""
        ...

    def overwrite(
        self, keys: torch.Tensor, rows: torch.Tensor, step: int,
        tables: Optional[torch.Tensor] = None,
    ) -> int:
        """Sets the rows of unique pairs where they live, creating absent ones (a k-step
        merge writes back); returns how many were created."""
        ...

    def export_table(
        self, table: int, fresh_from: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys [R], rows [R, row_width])`` of one table (composite keys), every row
        once (its freshest copy); with ``fresh_from`` (TTL) rows last used before it are
        left out."""
        ...

    def export_table_chunks(
        self, table: int, fresh_from: Optional[int] = None, chunk_rows: int = 1 << 18
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`export_table` as consecutive chunks (the same rows in the same order);
        a store that can yields chunks of at most ``chunk_rows`` rows without copying the
        whole table first (the flat store), others may yield one chunk."""
        ...

    def rows_per_table(self, num_tables: int) -> list[int]:
        """Rows held per table ``[num_tables]``."""
        ...

    def persist(self) -> list[int]:
        """Makes the store's durable tier (the SSD tier) hold the freshest copy of every
        row it keeps there, cached copies staying, and flushes: a snapshot of that tier
        is then a checkpoint of those tables. Nothing to do for memory-only tables.
        Returns the tables whose cached rows (the recently trained ones) hold NaN/Inf."""
        ...

    def cached_rows(self) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Per table, the copies held above the durable tier (the caches, the scratch
        pad) as ``(keys [C], rows [C, row_width], meta [C, 2])`` parts, the freshest
        last: what :meth:`persist` writes through, in that order (copies; an SSD tier
        snapshot plus these is a checkpoint of the table). Empty lists for memory-only
        tables."""
        ...

    def load(
        self, keys: torch.Tensor, rows: torch.Tensor, step: int,
        tables: Optional[torch.Tensor] = None, from_bottom: Sequence[int] = (),
    ) -> None:
        """Replaces every row with unique pairs (a checkpoint restore), as used at
        ``step``; the tables in ``from_bottom`` (none of ``keys``) take their rows from
        their durable tier as it is now (a restored snapshot) instead."""
        ...

    def expire(self, step: int, force: bool = False) -> int:
        """The TTL sweep as step ``step`` starts (work every :func:`sweep_every` steps,
        or now with ``force``); returns the rows deleted. With :attr:`on_expire` set,
        it is called with the deleted pairs ``(comp [D], tables [D])`` (a delta
        checkpoint's deletions)."""
        ...

    def flush(self) -> None:
        """Makes every row durable (no-op in memory)."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters of the store and its tiers."""
        ...

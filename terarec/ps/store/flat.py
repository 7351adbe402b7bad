"""The slot store of unbounded tables: every row of a group in one host tier.

Rows live in a :class:`~terarec.ps.tiers.host.HostTier` on the training device (host
memory on CPU runs, HBM on GPU runs); a slot is stable until a compaction. Several
tables share it through composite keys (``ps/group.py``):

* every slot records its table (``_slot_table``); a probe that finds a composite key
  owned by another table is a *composite collision* (``key2 = key1 ^ salt1 ^ salt2``).
  Such pairs get their own slot outside the hash index, found through a small side map
  (``_side``). With hashed ids a collision is a ~2^-64 event per pair, but it is handled
  exactly: no two ``(table, key)`` pairs ever share a row.

TTL (``ttl_steps``): a row not used for ``ttl_steps`` steps reads as absent and is
created again when next trained (exact at every step); every :func:`sweep_every` steps
the expired rows are deleted and, once dead slots outnumber live ones, the tier is
compacted (slot-indexed data remapped).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Optional

import torch

from terarec.ps.store.protocol import Admit, Expired, RowSource, subset, sweep_every
from terarec.ps.tiers.host import HostTier
from terarec.ps.tiers.protocol import LAST, zero_meta


class FlatStore:
    """Rows of a group's tables in one unbounded host tier (implements ``SlotStore``).

    Args:
        row_width: floats per row (dim + optimizer state).
        device: where the rows live (and training computes).
        num_tables: tables sharing the store (more than one: owners are tracked).
        ttl_steps: rows unused for this many steps expire (None: never).
    """

    def __init__(
        self,
        row_width: int,
        device: torch.device,
        num_tables: int = 1,
        ttl_steps: Optional[int] = None,
    ) -> None:
        self.row_width = row_width
        self.num_tables = num_tables
        self.ttl = ttl_steps
        self.tier = HostTier(row_width, device)
        self.step = 0  # the latest training step prepared (TTL's clock)
        self._slot_table = torch.zeros(1024, dtype=torch.int64, device=device)
        self._side: dict[tuple[int, int], int] = {}  # (table, key) -> slot, collisions only
        self.on_expire: Optional[Expired] = None

    @property
    def device(self) -> torch.device:
        return self.tier.device

    def __len__(self) -> int:
        return len(self.tier)

    @property
    def collisions(self) -> int:
        """Pairs held outside the hash index (composite collisions)."""
        return len(self._side)

    def _tables(self, keys: torch.Tensor, tables: Optional[torch.Tensor]) -> torch.Tensor:
        if tables is not None:
            return tables
        return torch.zeros(keys.numel(), dtype=torch.int64, device=keys.device)

    def _fresh_from(self, step: int, training: bool = True) -> Optional[int]:
        """TTL: rows not used since before this step are expired (None: no TTL).

        While step ``s`` trains, rows last used before ``s - ttl`` are expired (idle for
        the ``ttl`` steps before it); between steps (eval, export) the store looks as
        the next step will see it: ``s + 1 - ttl``."""
        if self.ttl is None:
            return None
        return step - self.ttl + (0 if training else 1)

    # -- training ------------------------------------------------------------------
    def prepare(
        self,
        keys: torch.Tensor,
        step: int,
        create: RowSource,
        tables: Optional[torch.Tensor] = None,
        admit: Optional[Admit] = None,
    ) -> torch.Tensor:
        self.step = step
        tables = self._tables(keys, tables)
        if admit is None:
            return self._slots_for(keys, tables, create)
        slots = self._find(keys, tables, self._fresh_from(step))
        absent = slots < 0
        new = absent.nonzero().squeeze(1)
        keep = ~absent
        keep[new] = admit(new)
        # Rows held and rows admitted, through the one path (the tier counts hits and
        # misses there); a sorted subset keeps equal composite values adjacent.
        pos = keep.nonzero().squeeze(1)
        slots[pos] = self._slots_for(keys[pos], tables[pos], subset(create, pos))
        return slots

    def prefetch(
        self, keys: torch.Tensor, step: int, tables: Optional[torch.Tensor] = None
    ) -> bool:
        """Every row is resident: nothing to do."""
        return True

    def read(self, slots: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
        return self.tier.read(slots, cols)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        self.tier.write(slots, rows)

    def update_rows(self, slots: torch.Tensor, grad: torch.Tensor, optimizer: object) -> None:
        self.tier.update_rows(slots, grad, optimizer)

    def _slots_for(
        self,
        comp: torch.Tensor,
        tables: torch.Tensor,
        create: RowSource,
        dup: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Slots of unique pairs, creating every absent one (new pairs get consecutive
        slots in their order). Unless ``dup`` (bool ``[U]``: True at every occurrence of
        a composite value but one) is given, equal values must be adjacent."""
        fresh_from = self._fresh_from(self.step)
        if self.num_tables == 1:
            slots = self.tier.slots_for(comp, create, fresh_from)
            self.tier.touch(slots, self.step)
            return slots
        if dup is None:
            dup = torch.zeros(comp.numel(), dtype=torch.bool, device=comp.device)
            if comp.numel() > 1:
                dup[1:] = comp[1:] == comp[:-1]
        has_dup = bool(dup.any())
        main = (~dup).nonzero().squeeze(1) if has_dup else None
        comp_main = comp if main is None else comp[main]
        tab_main = tables if main is None else tables[main]
        fill_main = create if main is None else subset(create, main)
        fresh = torch.zeros(comp_main.numel(), dtype=torch.bool, device=comp.device)
        slots_main = self.tier.slots_for(comp_main, fill_main, fresh_from, fresh)
        self._record_tables(fresh, slots_main, tab_main)
        owner_ok = self._slot_table[slots_main] == tab_main
        if main is None:
            slots = slots_main
        else:
            slots = torch.full_like(comp, -1)
            slots[main] = slots_main
        odd = (~owner_ok).nonzero().squeeze(1)
        if main is not None:
            odd = main[odd]
        if has_dup or odd.numel():
            todo = torch.cat([odd, dup.nonzero().squeeze(1)])
            self._resolve_collisions(todo, comp, tables, slots, create)
        self.tier.touch(slots, self.step)
        return slots

    def _record_tables(
        self, fresh: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor
    ) -> None:
        """Records the table of the rows just (re)created (``fresh`` bool ``[U]``)."""
        new = fresh.nonzero().squeeze(1)
        if new.numel() == 0:
            return
        self._reserve_tables(self.tier.num_slots)
        self._slot_table[slots[new]] = tables[new]

    def _resolve_collisions(
        self,
        pos: torch.Tensor,
        comp: torch.Tensor,
        tables: torch.Tensor,
        slots: torch.Tensor,
        create: RowSource,
    ) -> None:
        """Side slots for pairs whose composite key another table owns (rare path)."""
        for p in pos.tolist():
            t = int(tables[p])
            key = int(comp[p])  # the composite key: unique per pair for a fixed table
            one = torch.tensor([p], device=comp.device)
            slot = self._side.get((t, key))
            if slot is not None and self._stale_slot(slot):  # TTL: created again
                create(one, self.tier.row_block(slot, 1))
                self.tier.write_meta(torch.tensor([slot], device=self.device), zero_meta(1))
            if slot is None:  # a repeated composite in the batch may be the index owner
                owner = int(self.tier.lookup_slots(comp[p : p + 1])[0])
                if owner >= 0 and int(self._slot_table[owner]) == t:
                    slot = owner
            if slot is None:
                slot = self.tier.append_unindexed(comp[p : p + 1])
                create(one, self.tier.row_block(slot, 1))
                self._reserve_tables(slot + 1)
                self._slot_table[slot] = t
                self._side[(t, key)] = slot
            slots[p] = slot

    def _stale_slot(self, slot: int) -> bool:
        fresh_from = self._fresh_from(self.step)
        if fresh_from is None:
            return False
        meta = self.tier.read_meta(torch.tensor([slot], device=self.device))
        return int(meta[0, LAST]) < fresh_from

    # -- reads and writes outside training ------------------------------------------
    def _find(
        self, comp: torch.Tensor, tables: torch.Tensor, fresh_from: Optional[int]
    ) -> torch.Tensor:
        """Slots of pairs ``[N]`` (duplicates allowed), -1 where absent or last used
        before ``fresh_from``; never creates."""
        slots = self.tier.lookup_slots(comp)
        if self.num_tables > 1:
            found = slots >= 0
            wrong = found & (self._slot_table[slots.clamp(min=0)] != tables)
            if bool(wrong.any()):
                for p in wrong.nonzero().squeeze(1).tolist():
                    slots[p] = self._side.get((int(tables[p]), int(comp[p])), -1)
        if fresh_from is not None:
            stale = self.tier.read_meta(slots.clamp(min=0))[:, LAST] < fresh_from
            slots = torch.where(stale, -1, slots)
        return slots

    def lookup_rows(
        self,
        keys: torch.Tensor,
        tables: Optional[torch.Tensor] = None,
        fresh_from: Optional[int] = None,
        meta_out: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self._find(keys, self._tables(keys, tables), fresh_from)
        found = slots >= 0
        out = torch.zeros(keys.numel(), self.row_width, device=keys.device)
        hit = found.nonzero().squeeze(1)
        out[hit] = self.tier.read(slots[hit])
        if meta_out is not None:
            meta_out[hit.to(meta_out.device)] = self.tier.read_meta(slots[hit]).to(meta_out.device)
        return out, found

    def overwrite(
        self, keys: torch.Tensor, rows: torch.Tensor, step: int,
        tables: Optional[torch.Tensor] = None,
    ) -> int:
        self.step = step
        tables = self._tables(keys, tables)
        rows = rows.to(self.device, torch.float32)
        slots = self._find(keys, tables, self._fresh_from(step, training=False))
        hit = (slots >= 0).nonzero().squeeze(1)
        self.tier.write(slots[hit], rows[hit])
        new = (slots < 0).nonzero().squeeze(1)
        if new.numel():
            made = self._slots_for(keys[new], tables[new], subset(_given(rows), new))
            self.tier.write(made, rows[new])  # also where TTL's view found a row after all
        return new.numel()

    def export_table(
        self, table: int, fresh_from: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of one table in slot order."""
        return self._export_slots(self.tier.live_slots(), table, fresh_from)

    def export_table_chunks(
        self, table: int, fresh_from: Optional[int] = None, chunk_rows: int = 1 << 18
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`export_table` in chunks of at most ``chunk_rows`` rows, same order:
        a table's rows never all copied at once."""
        for slots in self.tier.live_slot_chunks(chunk_rows):
            yield self._export_slots(slots, table, fresh_from)

    def _export_slots(self, slots: torch.Tensor, table: int, fresh_from: Optional[int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        comp, rows, meta = self.tier.export_slots(slots, with_meta=True)
        owner = self._owners_of(slots)
        if fresh_from is not None:  # expired rows the last sweep has not deleted yet
            keep = (meta[:, LAST] >= fresh_from).nonzero().squeeze(1)
            comp, rows, owner = comp[keep], rows[keep], owner[keep]
        if self.num_tables == 1:
            return comp, rows
        mine = (owner == table).nonzero().squeeze(1)
        return comp[mine], rows[mine]

    def _owners(self) -> torch.Tensor:
        """Table of each row held, in slot order ``[len(self)]``."""
        return self._owners_of(self.tier.live_slots())

    def _owners_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Table of the rows at ``slots`` ``[N]``."""
        if self.num_tables == 1:  # not tracked for one table
            return torch.zeros(slots.numel(), dtype=torch.int64, device=self.device)
        return self._slot_table[slots]

    def rows_per_table(self, num_tables: int) -> list[int]:
        if self.num_tables == 1:
            return [len(self)]
        return torch.bincount(self._owners(), minlength=num_tables).tolist()

    def persist(self) -> list[int]:
        """Nothing to do: the rows live in memory only (a checkpoint exports them, and
        checks them there)."""
        return []

    def cached_rows(self) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        return [[] for _ in range(self.num_tables)]  # no tier below memory

    def load(
        self, keys: torch.Tensor, rows: torch.Tensor, step: int,
        tables: Optional[torch.Tensor] = None, from_bottom: Sequence[int] = (),
    ) -> None:
        """Inserts in the given order (each table's export order survives a round trip);
        the pairs must be unique."""
        if from_bottom:
            raise ValueError("a flat store has no tier below memory to load from")
        self.tier = HostTier(self.row_width, self.device)
        self._slot_table = torch.zeros(1024, dtype=torch.int64, device=self.device)
        self._side = {}
        self.step = step
        if keys.numel() == 0:
            return
        tables = self._tables(keys, tables)
        # repeated composite values (of different tables) through a sort
        sorted_comp, order = torch.sort(keys, stable=True)
        same = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
        same[1:] = sorted_comp[1:] == sorted_comp[:-1]
        dup = torch.zeros_like(same)
        dup[order] = same
        self._slots_for(keys, tables, _given(rows), dup=dup)  # no step taken

    # -- TTL -------------------------------------------------------------------------
    def expire(self, step: int, force: bool = False) -> int:
        """The TTL sweep: expired slots die, and once dead slots outnumber live ones the
        tier is compacted (slot-indexed data remapped)."""
        if self.ttl is None or (step % sweep_every(self.ttl) and not force):
            return 0
        live = self.tier.live_slots() if self.on_expire is not None else None
        gone_keys = self.tier.expire(step - self.ttl)
        gone = gone_keys.numel()
        if live is not None and gone:  # the dead slots' tables, before a compaction
            dead = live[self.tier.is_dead(live)]
            self.on_expire(self.tier.index.keys()[dead], self._owners_of(dead))
        if self._side:  # collision side slots (rare): forget the dead ones
            items = list(self._side.items())
            dead = self.tier.is_dead(torch.tensor([v for _, v in items], device=self.device))
            self._side = {k: v for (k, v), d in zip(items, dead.tolist()) if not d}
        n_slots = self.tier.num_slots
        perm = self.tier.maybe_compact()
        if perm is None or self.num_tables == 1:
            return gone
        self._slot_table[: perm.numel()] = self._slot_table.index_select(0, perm)
        if self._side:
            new_of = torch.full((n_slots,), -1, dtype=torch.int64, device=self.device)
            new_of[perm] = torch.arange(perm.numel(), device=self.device)
            self._side = {k: int(new_of[v]) for k, v in self._side.items()}
        return gone

    def flush(self) -> None:
        self.tier.flush()

    def stats(self) -> dict[str, float]:
        return self.tier.stats()

    def _reserve_tables(self, n: int) -> None:
        if n <= self._slot_table.numel():
            return
        grown = torch.zeros(
            max(n, 2 * self._slot_table.numel()), dtype=torch.int64, device=self.device
        )
        grown[: self._slot_table.numel()] = self._slot_table
        self._slot_table = grown


def _given(rows: torch.Tensor) -> RowSource:
    """A row source handing out ``rows`` (a restore, a k-step write-back)."""

    def give(p: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is None:
            return rows[p]
        return out.copy_(rows[p])

    return give

"""A table group: the rows of several logical tables in one physical store.

Tables of the same dim, pooling and initializer are batched, as FBGEMM's TBE batches
tables: one dedup sort, one index probe, one gather, one pooling kernel, one fused
optimizer step and one scatter per batch for the whole group, instead of one of each per
table. Each table keeps its own key namespace:

* a row is indexed by the *composite key* ``c = key ^ salt[t]`` (``salt`` of the
  group's first table is 0, so a one-table group indexes raw keys). For a fixed table
  this is a bijection, so equal ``(t, c)`` means equal ``(t, key)``;
* every slot records its table (``slot_table``); a probe that finds ``c`` owned by
  another table is a *composite collision* (``key2 = key1 ^ salt1 ^ salt2``). Such pairs
  get their own slot outside the hash index, found through a small side map. With
  hashed ids a collision is a ~2^-64 event per pair, but it is handled exactly: no two
  ``(table, key)`` pairs ever share a row.

With admission (``TableConfig.admission``), a training batch's pairs that have no row
in any tier are counted in the group's count-min sketch (``ps/admission.py``, per
occurrence) and only those seen ``min_count`` times get a row; the others get slot -1:
they read as zeros and their gradients are dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import torch

from terarec.config import SparseOptimConfig, TableConfig
from terarec.hashing import salt_for
from terarec.optim.sparse import RowOptimizer, build_row_optimizer
from terarec.ps.admission import Admission
from terarec.ps.chain import TierChain, sweep_every
from terarec.ps.factory import build_chain
from terarec.ps.host_tier import HostTier
from terarec.ps.initializer import init_rows
from terarec.ps.tier import LAST, zero_meta
from terarec.ps.touched import TouchedRows


def table_seed(seed: int, name: str) -> int:
    """Per-table initializer seed derived from the run seed and the table name."""
    return (seed * 1_000_003 + salt_for(name)) % (1 << 62)


def group_key(cfg: TableConfig) -> tuple:
    """Tables with equal keys can share a group (same row layout and initializer).

    A table with tier budgets is a group of its own (budgets are per table); tables
    with admission share a group (and its sketch) only with tables of the same settings.
    """
    if cfg.device_rows is not None:
        return ("tiered", cfg.name)
    adm = None if cfg.admission is None else dataclasses.astuple(cfg.admission)
    return (cfg.dim, cfg.pooling, cfg.init.kind, cfg.init.scale, adm, cfg.ttl_steps)


class TableGroup:
    """Rows of the tables ``cfgs`` (equal :func:`group_key`) in one host tier.

    Args:
        cfgs: the group's table configs.
        optim: the sparse optimizer config (one optimizer per group: its step counter
            advances once per backward, as each table's would).
        device: where rows live (the device tier, when the table has budgets).
        seed: run seed.
        bottom: the tier under a budgeted host tier (the SSD tier), when there is one.
        fused: the fused (triton) row optimizer updating rows in place by slot: ``None``
            = on CUDA when triton is present; ``True`` demands it; ``False`` never.
    """

    def __init__(
        self,
        cfgs: list[TableConfig],
        optim: SparseOptimConfig,
        device: torch.device,
        seed: int,
        bottom: Optional[Any] = None,
        fused: Optional[bool] = None,
    ) -> None:
        if len({group_key(c) for c in cfgs}) != 1:
            raise ValueError("a table group needs tables of one dim, pooling and initializer")
        self.cfgs = cfgs
        self.names = [c.name for c in cfgs]
        self.dim = cfgs[0].dim
        self.init = cfgs[0].init
        self.device = device
        self.optimizer: RowOptimizer = build_row_optimizer(optim, self.dim)
        self.row_width = self.dim + self.optimizer.state_width
        self.fused = self.optimizer.fused_on(device, fused)
        salts = [0] + [salt_for("table-namespace:" + n) or 1 for n in self.names[1:]]
        self.salts = torch.tensor(salts, dtype=torch.int64, device=device)
        self.seeds = [table_seed(seed, n) for n in self.names]
        self._seeds_t = torch.tensor(self.seeds, dtype=torch.int64, device=device)
        # Under a device cache the unbounded tier is host memory, whatever the device.
        host = device if cfgs[0].device_rows is None else torch.device("cpu")
        self.tier = HostTier(self.row_width, host)
        self.chain: Optional[TierChain] = self._build_chain(cfgs[0], bottom)
        self.step = 0  # training forwards (eviction recency, TTL)
        self.ttl: Optional[int] = cfgs[0].ttl_steps
        self._slot_table = torch.zeros(1024, dtype=torch.int64, device=device)
        self._side: dict[tuple[int, int], int] = {}  # (table, key) -> slot, collisions only
        self.version = 0  # bumped by every optimizer step (stale-gather detection)
        # k-step merging (ps/touched.py): pairs trained since the last merge of the
        # replicas, with their rows at first touch; None: not tracked
        self.touched: Optional[TouchedRows] = None
        adm = cfgs[0].admission
        self.admission: Optional[Admission] = None
        if adm is not None:
            self.admission = Admission(
                adm.min_count,
                adm.width,
                adm.depth,
                device,
                seed=table_seed(seed, "admission:" + self.names[0]),
                decay_every=adm.decay_every,
            )

    def _build_chain(self, cfg: TableConfig, bottom: Optional[Any]) -> Optional[TierChain]:
        if cfg.device_rows is not None and len(self.cfgs) != 1:
            raise ValueError("tier budgets are per table: a budgeted table is its own group")
        return build_chain(cfg, self.row_width, self.device, bottom)

    @property
    def num_tables(self) -> int:
        return len(self.cfgs)

    def __len__(self) -> int:
        if self.chain is not None:
            return len(self.chain)
        return len(self.tier)

    def slot_tables(self) -> torch.Tensor:
        """Table of each row held, in slot order ``[len(self)]``."""
        if self.num_tables == 1:  # not tracked for one table
            return torch.zeros(len(self), dtype=torch.int64, device=self.device)
        return self._slot_table[self.tier.live_slots()]

    def rows_per_table(self) -> list[int]:
        if self.num_tables == 1:
            return [len(self)]
        return torch.bincount(self.slot_tables(), minlength=self.num_tables).tolist()

    def composite(self, keys: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """``keys ^ salt[tables]`` (``[N]``; the identity for a one-table group)."""
        if self.num_tables == 1:
            return keys
        return keys ^ self.salts[tables]

    def keys_of(self, comp: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return self.composite(comp, tables)  # xor is its own inverse

    # -- rows ----------------------------------------------------------------------
    def new_rows(
        self, keys: torch.Tensor, tables: torch.Tensor, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Initial rows (weights + optimizer state) ``[M, row_width]`` of new pairs."""
        if out is None:
            out = torch.empty(keys.numel(), self.row_width, device=keys.device)
        seeds = self.seeds[0] if self.num_tables == 1 else self._seeds_t[tables]
        out[:, : self.dim] = init_rows(keys, self.dim, self.init, seeds)
        out[:, self.dim :] = self.optimizer.init_state(keys.numel(), keys.device)
        return out

    def slots_for(
        self,
        comp: torch.Tensor,
        tables: torch.Tensor,
        create: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        dup: Optional[torch.Tensor] = None,
        counts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Slots of unique pairs ``(tables, keys_of(comp))``, creating absent ones.

        New pairs get consecutive slots in their order in ``comp``.

        Args:
            comp: int64 ``[U]`` composite keys; pairs unique. Unless ``dup`` is given,
                equal values must be adjacent (e.g. sorted).
            tables: int64 ``[U]`` table of each pair.
            create: initial rows ``[M, row_width]`` for the pairs at int64 positions
                ``[M]``; default :meth:`new_rows`.
            dup: bool ``[U]``, True at every occurrence of a composite value but one.
            counts: int64 ``[U]``, occurrences of each pair in the batch: the training
                forward of a group with admission passes them. Pairs without a row in
                any tier are then observed (once per call, even with none) and only the
                admitted ones are created; the others get slot -1 and no row. Ignored
                without admission (and not given by restores and tools: every pair is
                created).
        Returns:
            int64 ``[U]`` slots (-1 only for pairs left out by admission).
        """
        if self.chain is None:  # a training step of the unbounded table starts (TTL)
            self._advance()
        if counts is None or self.admission is None:
            return self._slots_for(comp, tables, create, dup)
        adm = self.admission
        if self.chain is not None:
            observed: list[bool] = []

            def admit(pos: torch.Tensor) -> torch.Tensor:  # pairs absent from every tier
                observed.append(True)
                return adm.observe_and_admit(comp[pos], counts[pos])

            self._advance()
            slots = self.chain.prepare(
                comp, self.step, self._rows_for(comp, tables, create), admit=admit
            )
            if not observed:  # one observation per training step (the decay's clock)
                adm.observe_and_admit(comp[:0], counts[:0])
            return slots
        slots = self.find(comp, tables, training=True)
        absent = slots < 0
        new = absent.nonzero().squeeze(1)
        keep = ~absent
        keep[new] = adm.observe_and_admit(comp[new], counts[new])
        # Rows held and rows admitted, through the one path (the tier counts hits and
        # misses there); a sorted subset keeps equal composite values adjacent.
        pos = keep.nonzero().squeeze(1)
        sub = None if create is None else (lambda p: create(pos[p]))
        slots[pos] = self._slots_for(comp[pos], tables[pos], sub)
        return slots

    def _slots_for(
        self,
        comp: torch.Tensor,
        tables: torch.Tensor,
        create: Optional[Callable[[torch.Tensor], torch.Tensor]],
        dup: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """:meth:`slots_for` creating every absent pair."""

        def fill(pos: torch.Tensor, out: torch.Tensor) -> None:
            if create is not None:
                out.copy_(create(pos))
            else:
                self.new_rows(self.keys_of(comp[pos], tables[pos]), tables[pos], out)

        if self.chain is not None:
            self._advance()
            return self.chain.prepare(comp, self.step, self._rows_for(comp, tables, create))
        fresh_from = self._fresh_from()
        if self.num_tables == 1:
            slots = self.tier.slots_for(comp, lambda pos, out: fill(pos, out), fresh_from)
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

        def fill_main(pos: torch.Tensor, out: torch.Tensor) -> None:
            fill(pos if main is None else main[pos], out)

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
            self._resolve_collisions(todo, comp, tables, slots, fill)
        self.tier.touch(slots, self.step)
        return slots

    # -- TTL -----------------------------------------------------------------------
    def _fresh_from(self, training: bool = True) -> Optional[int]:
        """TTL: rows not used since before this step are expired (None: no TTL).

        While step ``s`` trains, rows last used before ``s - ttl`` are expired (idle for
        the ``ttl`` steps before it); between steps (eval, export) the table looks as
        the next step will see it: ``s + 1 - ttl``."""
        if self.ttl is None:
            return None
        return self.step - self.ttl + (0 if training else 1)

    def _advance(self) -> None:
        """A training step starts: the step counter advances and, with TTL, every
        ``sweep_every(ttl)`` steps the expired rows are deleted from every tier (between
        sweeps, expired rows found on the way read as absent: exact at every step)."""
        self.step += 1
        if self.ttl is None:
            return
        if self.chain is not None:
            self.chain.expire(self.step)
        elif self.step % sweep_every(self.ttl) == 0:
            self._sweep_unbounded()

    def _sweep_unbounded(self) -> None:
        """The TTL sweep of the one host tier: expired slots die, and once dead slots
        outnumber live ones the tier is compacted (slot-indexed data remapped)."""
        assert self.ttl is not None
        self.tier.expire(self.step - self.ttl)
        if self._side:  # collision side slots (rare): forget the dead ones
            items = list(self._side.items())
            dead = self.tier.is_dead(torch.tensor([v for _, v in items], device=self.device))
            self._side = {k: v for (k, v), d in zip(items, dead.tolist()) if not d}
        n_slots = self.tier.num_slots
        perm = self.tier.maybe_compact()
        if perm is None or self.num_tables == 1:
            return
        self._slot_table[: perm.numel()] = self._slot_table.index_select(0, perm)
        if self._side:
            new_of = torch.full((n_slots,), -1, dtype=torch.int64, device=self.device)
            new_of[perm] = torch.arange(perm.numel(), device=self.device)
            self._side = {k: int(new_of[v]) for k, v in self._side.items()}

    def _rows_for(
        self,
        comp: torch.Tensor,
        tables: torch.Tensor,
        create: Optional[Callable[[torch.Tensor], torch.Tensor]],
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        def rows_for(pos: torch.Tensor) -> torch.Tensor:
            if create is not None:
                return create(pos)
            return self.new_rows(self.keys_of(comp[pos], tables[pos]), tables[pos])

        return rows_for

    def prefetch(self, comp: torch.Tensor, tables: torch.Tensor) -> bool:
        """Makes the next batch's unique pairs resident in the device tier (tiered tables
        only), locked through the next step; the batch being trained stays resident.

        May run on a background thread while the current step computes: it touches the
        tiers' maps and free slots only, never the current batch's rows.

        It brings up only pairs that have a row somewhere: whether a new pair gets one
        (and, with admission, whether it is admitted) is decided by the next forward,
        after this step's observations, so a prefetch neither counts a pair twice nor
        creates a row early (an eval or checkpoint between the steps sees no row of a
        batch not trained yet). Returns False when the batch did not fit beside the
        one being trained (nothing moved; see :meth:`TierChain.prefetch`).
        """
        if self.chain is None:
            return True
        return self.chain.prefetch(comp, self.step)

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
        fill: Callable[[torch.Tensor, torch.Tensor], None],
    ) -> None:
        """Side slots for pairs whose composite key another table owns (rare path)."""
        for p in pos.tolist():
            t = int(tables[p])
            key = int(self.keys_of(comp[p : p + 1], tables[p : p + 1])[0])
            slot = self._side.get((t, key))
            if slot is not None and self._stale_slot(slot):  # TTL: created again
                fill(torch.tensor([p], device=comp.device), self.tier.row_block(slot, 1))
                self.tier.write_meta(torch.tensor([slot], device=self.device), zero_meta(1))
            if slot is None:  # a repeated composite in the batch may be the index owner
                owner = int(self.tier.lookup_slots(comp[p : p + 1])[0])
                if owner >= 0 and int(self._slot_table[owner]) == t:
                    slot = owner
            if slot is None:
                slot = self.tier.append_unindexed(comp[p : p + 1])
                fill(torch.tensor([p], device=comp.device), self.tier.row_block(slot, 1))
                self._reserve_tables(slot + 1)
                self._slot_table[slot] = t
                self._side[(t, key)] = slot
            slots[p] = slot

    def _stale_slot(self, slot: int) -> bool:
        fresh_from = self._fresh_from()
        if fresh_from is None:
            return False
        meta = self.tier.read_meta(torch.tensor([slot], device=self.device))
        return int(meta[0, LAST]) < fresh_from

    def track_touched(self, on: bool) -> None:
        """Starts (or stops) recording the pairs trained since the last merge of the
        replicas (``TouchedRows``; k-step merging). Starting forgets earlier records."""
        self.touched = TouchedRows(self.row_width, self.device) if on else None

    def record_touched(
        self,
        comp: torch.Tensor,
        tables: torch.Tensor,
        slots: torch.Tensor,
        rows: Optional[torch.Tensor] = None,
    ) -> None:
        """Records the unique pairs a training forward prepared, before their update,
        when tracking (k-step merging); pairs without a row (slot -1) are skipped.

        Args:
            comp, tables, slots: int64 ``[U]`` the pairs and their slots.
            rows: their rows ``[U, row_width]`` when the forward gathered them; else the
                rows of the pairs not recorded yet are read at ``slots``.
        """
        if self.touched is None:
            return
        if self.admission is not None:
            live = (slots >= 0).nonzero().squeeze(1)
            if live.numel() < slots.numel():
                comp, tables, slots = comp[live], tables[live], slots[live]
                rows = None if rows is None else rows[live]

        def before(pos: torch.Tensor) -> torch.Tensor:
            return rows[pos] if rows is not None else self.top.read(slots[pos])

        self.touched.record(comp, tables, before)

    def overwrite_rows(self, comp: torch.Tensor, tables: torch.Tensor, rows: torch.Tensor) -> None:
        """Sets the rows of pairs wherever they live (a k-step merge writes back): a row
        held in a tier is overwritten in place there, keeping its metadata and locks; a
        pair without a row gets one holding ``rows`` (in the bottom tier of a tiered
        table). Takes no training step.

        Args:
            comp: int64 ``[N]`` composite keys, pairs unique, sorted.
            tables: int64 ``[N]`` table of each pair.
            rows: ``[N, row_width]`` weights and optimizer state.
        """
        if comp.numel() == 0:
            return
        if self.chain is not None:
            self.chain.overwrite(comp, rows, self.step)
        else:
            rows = rows.to(self.device, torch.float32)
            slots = self.find(comp, tables)
            hit = (slots >= 0).nonzero().squeeze(1)
            self.tier.write(slots[hit], rows[hit])
            new = (slots < 0).nonzero().squeeze(1)
            if new.numel():
                made = self._slots_for(comp[new], tables[new], lambda pos: rows[new[pos]])
                self.tier.write(made, rows[new])  # also where TTL's view found a row after all
        self.version += 1

    def lookup_rows(
        self, comp: torch.Tensor, tables: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of pairs ``[N, row_width]`` (zeros where absent or expired) and
        ``found [N]``; never creates or moves rows (evaluation)."""
        if self.chain is not None:
            return self.chain.lookup_rows(comp, self._fresh_from(training=False))
        slots = self.find(comp, tables)
        found = slots >= 0
        out = torch.zeros(comp.numel(), self.row_width, device=comp.device)
        hit = found.nonzero().squeeze(1)
        out[hit] = self.tier.read(slots[hit])
        return out, found

    def find(
        self, comp: torch.Tensor, tables: torch.Tensor, training: bool = False
    ) -> torch.Tensor:
        """Slots of pairs ``[N]`` (duplicates allowed), -1 where absent or expired (TTL:
        as the step being trained sees it with ``training``, else as the next one will);
        never creates."""
        if self.chain is not None:
            raise RuntimeError("a tiered table has no stable slots; use lookup_rows")
        slots = self.tier.lookup_slots(comp)
        if self.num_tables > 1:
            found = slots >= 0
            wrong = found & (self._slot_table[slots.clamp(min=0)] != tables)
            if bool(wrong.any()):
                for p in wrong.nonzero().squeeze(1).tolist():
                    t = int(tables[p])
                    key = int(self.keys_of(comp[p : p + 1], tables[p : p + 1])[0])
                    slots[p] = self._side.get((t, key), -1)
        fresh_from = self._fresh_from(training)
        if fresh_from is not None:
            stale = self.tier.read_meta(slots.clamp(min=0))[:, LAST] < fresh_from
            slots = torch.where(stale, -1, slots)
        return slots

    def _reserve_tables(self, n: int) -> None:
        if n <= self._slot_table.numel():
            return
        grown = torch.zeros(
            max(n, 2 * self._slot_table.numel()), dtype=torch.int64, device=self.device
        )
        grown[: self._slot_table.numel()] = self._slot_table
        self._slot_table = grown

    @property
    def top(self) -> Any:
        """What training reads and updates by slot: the tier chain (cache + scratch pad)
        of a tiered table, else the host tier."""
        return self.chain if self.chain is not None else self.tier

    def read(self, slots: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
        """Rows at ``slots`` ``[N, row_width]`` (the first ``cols`` columns only when
        given); slot -1 (a pair left out by admission) reads as zeros."""
        if self.admission is None:
            return self.top.read(slots, cols)
        live = (slots >= 0).nonzero().squeeze(1)
        if live.numel() == slots.numel():
            return self.top.read(slots, cols)
        width = self.row_width if cols is None else cols
        out = torch.zeros(slots.numel(), width, device=self.top.device)
        out[live] = self.top.read(slots[live], cols)
        return out

    def flush(self) -> None:
        if self.chain is not None:
            self.chain.flush()
        else:
            self.tier.flush()

    def stats(self) -> dict[str, float]:
        """Tier counters, plus ``admission_*`` (see ``Admission.stats``) with admission."""
        out = self.chain.stats() if self.chain is not None else self.tier.stats()
        if self.admission is not None:
            out.update({f"admission_{k}": v for k, v in self.admission.stats().items()})
        return out

    def apply_gradients(
        self, slots: torch.Tensor, grad: torch.Tensor, rows: Optional[torch.Tensor] = None
    ) -> None:
        """Fused optimizer step on the rows at unique ``slots`` (``grad [U, dim]``);
        the gradients of slot -1 (pairs left out by admission) are dropped."""
        if self.admission is not None:
            live = (slots >= 0).nonzero().squeeze(1)
            if live.numel() < slots.numel():
                slots, grad = slots[live], grad[live]
                rows = None if rows is None else rows[live]
        if self.fused:  # one kernel, in place in the tier's storage
            self.top.update_rows(slots, grad, self.optimizer)
        else:
            if rows is None:
                rows = self.top.read(slots)
            self.top.write(slots, self.optimizer.update(rows, grad.to(rows.dtype)))
        self.version += 1

    # -- per-table views -------------------------------------------------------------
    def export_table(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys [R], rows [R, row_width])`` of table ``t``, in slot order."""
        fresh_from = self._fresh_from(training=False)
        if self.chain is not None:  # a tiered table is a group of its own
            return self.chain.export(fresh_from=fresh_from)  # type: ignore[return-value]
        comp, rows, meta = self.tier.export(with_meta=True)
        owner = self.slot_tables()
        if fresh_from is not None:  # expired rows the last sweep has not deleted yet
            keep = (meta[:, LAST] >= fresh_from).nonzero().squeeze(1)
            comp, rows, owner = comp[keep], rows[keep], owner[keep]
        if self.num_tables == 1:
            return comp, rows
        mine = (owner == t).nonzero().squeeze(1)
        tables = torch.full((mine.numel(),), t, dtype=torch.int64, device=comp.device)
        return self.keys_of(comp[mine], tables), rows[mine]

    def load_tables(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replaces every row: ``parts[t] = (keys [R_t], rows [R_t, row_width])``."""
        if self.chain is not None:
            (keys, rows), = parts
            if keys.numel() > 1 and torch.unique(keys).numel() != keys.numel():
                raise ValueError(f"table {self.names[0]}: checkpoint has duplicate keys")
            used = torch.tensor([self.step, 0], device=self.device).repeat(keys.numel(), 1)
            self.chain.load(
                keys.to(self.device, torch.int64), rows.to(self.device, torch.float32), used
            )
            return
        self.tier = HostTier(self.row_width, self.device)
        self._slot_table = torch.zeros(1024, dtype=torch.int64, device=self.device)
        self._side = {}
        if not parts:
            return
        keys = torch.cat([k.to(self.device, torch.int64) for k, _ in parts])
        rows = torch.cat([r.to(self.device, torch.float32) for _, r in parts])
        tables = torch.cat(
            [
                torch.full((k.numel(),), t, dtype=torch.int64, device=self.device)
                for t, (k, _) in enumerate(parts)
            ]
        )
        comp = self.composite(keys, tables)
        # Insert in the given order (each table's export order survives a round trip);
        # find repeated composite values through a sort.
        sorted_comp, order = torch.sort(comp, stable=True)
        same = torch.zeros(comp.numel(), dtype=torch.bool, device=self.device)
        if comp.numel() > 1:
            same[1:] = sorted_comp[1:] == sorted_comp[:-1]
            sorted_tab = tables[order]
            if bool((same[1:] & (sorted_tab[1:] == sorted_tab[:-1])).any()):
                raise ValueError(f"tables {self.names}: checkpoint has duplicate keys")
        dup = torch.zeros_like(same)
        dup[order] = same
        self._slots_for(comp, tables, create=lambda pos: rows[pos], dup=dup)  # no step taken

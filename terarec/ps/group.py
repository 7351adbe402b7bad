"""A table group: the rows of several logical tables in one slot store.

Tables of the same dim, pooling and initializer are batched, as FBGEMM's TBE batches
tables: one dedup sort, one index probe, one gather, one pooling kernel, one fused
optimizer step and one scatter per batch for the whole group, instead of one of each per
table. The rows live in one slot store (``ps/store/protocol.py``, built by
``ps/store/factory.py``): a flat host store for unbounded tables, a tier chain for one
budgeted table, one chain per table over one device row array for several); the group
keeps what is not storage: the row optimizer, admission, the rows touched since the last
k-step merge, the step counter and the tables' key namespaces:

* a row is keyed by the *composite key* ``c = key ^ salt[t]`` (``salt`` of the group's
  first table is 0, so a one-table group keys raw keys). For a fixed table this is a
  bijection, so equal ``(t, c)`` means equal ``(t, key)``; the flat store keeps pairs
  whose composite keys collide apart (``ps/store/flat.py``), a group of tiered tables
  keys each table's chain by its own keys (``ps/store/tiered.py``).

With admission (``TableConfig.admission``), a training batch's pairs that have no row
in any tier are counted in the group's count-min sketch (``ps/admission.py``, per
occurrence) and only those seen ``min_count`` times get a row; the others get slot -1:
they read as zeros and their gradients are dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Optional

import torch

from terarec.config import SparseOptimConfig, TableConfig
from terarec.hashing import salt_for
from terarec.optim.sparse import RowOptimizer, build_row_optimizer
from terarec.ps.admission import Admission
from terarec.ps.changes import ChangedPairs
from terarec.ps.initializer import init_rows
from terarec.ps.store.factory import build_store, is_tiered
from terarec.ps.store.protocol import SlotStore
from terarec.ps.tiers.protocol import LAST
from terarec.ps.tiers.ssd import SSDStore
from terarec.ps.touched import TouchedRows


def table_seed(seed: int, name: str) -> int:
    """Per-table initializer seed derived from the run seed and the table name."""
    return (seed * 1_000_003 + salt_for(name)) % (1 << 62)


def group_key(cfg: TableConfig) -> tuple:
    """Tables with equal keys can share a group (same row layout and initializer).

    Tiered tables (with budgets) group with tiered tables only (each keeps its own
    chain: budgets, policy, scratch pad); a tiered table with admission is a group of its
    own (its sketch is its own). Unbounded tables with admission share a group (and its
    sketch) only with tables of the same settings.
    """
    if is_tiered(cfg) and cfg.admission is not None:
        return ("tiered", cfg.name)
    adm = None if cfg.admission is None else dataclasses.astuple(cfg.admission)
    kind = "tiered" if is_tiered(cfg) else "flat"
    return (kind, cfg.dim, cfg.pooling, cfg.init.kind, cfg.init.scale, adm, cfg.ttl_steps)


class TableGroup:
    """Rows of the tables ``cfgs`` (equal :func:`group_key`) in one slot store.

    Args:
        cfgs: the group's table configs.
        optim: the sparse optimizer config (one optimizer per group: its step counter
            advances once per backward, as each table's would).
        device: where rows live (the device tier, when the table has budgets).
        seed: run seed.
        ssd_store: the rank's SSD store (tables with ``host_rows`` keep rows there).
        table_ids: the tables' ids in the SSD store (default ``0 .. len(cfgs) - 1``).
        fused: the fused (triton) row optimizer updating rows in place by slot: ``None``
            = on CUDA when triton is present; ``True`` demands it; ``False`` never.
    """

    def __init__(
        self,
        cfgs: list[TableConfig],
        optim: SparseOptimConfig,
        device: torch.device,
        seed: int,
        ssd_store: Optional[SSDStore] = None,
        table_ids: Optional[list[int]] = None,
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
        self.tiered = is_tiered(cfgs[0])  # rows made resident per batch (prefetch works)
        self.store: SlotStore = build_store(
            cfgs, self.row_width, device, ssd_store, table_ids, salts
        )
        self.step = 0  # training forwards (eviction recency, TTL)
        self.ttl: Optional[int] = cfgs[0].ttl_steps
        self.version = 0  # bumped by every optimizer step (stale-gather detection)
        # k-step merging (ps/touched.py): pairs trained since the last merge of the
        # replicas, with their rows at first touch; None: not tracked
        self.touched: Optional[TouchedRows] = None
        # delta checkpoints (ps/changes.py): pairs changed since the last checkpoint
        self.changes: Optional[ChangedPairs] = None
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

    @property
    def num_tables(self) -> int:
        return len(self.cfgs)

    def __len__(self) -> int:
        return len(self.store)

    def rows_per_table(self) -> list[int]:
        return self.store.rows_per_table(self.num_tables)

    def composite(self, keys: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """``keys ^ salt[tables]`` (``[N]``; the identity for a one-table group)."""
        if self.num_tables == 1:
            return keys
        return keys ^ self.salts[tables]

    def keys_of(self, comp: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return self.composite(comp, tables)  # xor is its own inverse

    def _tables(self, tables: torch.Tensor) -> Optional[torch.Tensor]:
        """What the store is given: None for a one-table group (all table 0)."""
        return None if self.num_tables == 1 else tables

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
        counts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Slots of unique pairs ``(tables, keys_of(comp))`` for a new training step,
        creating absent ones (new pairs get consecutive slots in their order in ``comp``
        in a flat store).

        Args:
            comp: int64 ``[U]`` composite keys; pairs unique; equal values adjacent
                (e.g. sorted).
            tables: int64 ``[U]`` table of each pair.
            create: initial rows ``[M, row_width]`` for the pairs at int64 positions
                ``[M]``; default :meth:`new_rows`.
            counts: int64 ``[U]``, occurrences of each pair in the batch: the training
                forward of a group with admission passes them. Pairs without a row in
                any tier are then observed (once per call, even with none) and only the
                admitted ones are created; the others get slot -1 and no row. Ignored
                without admission (and not given by restores and tools: every pair is
                created).
        Returns:
            int64 ``[U]`` slots (-1 only for pairs left out by admission).
        """
        self._advance()
        rows_for = self._rows_for(comp, tables, create)
        if counts is None or self.admission is None:
            return self.store.prepare(comp, self.step, rows_for, tables=self._tables(tables))
        adm = self.admission
        observed: list[bool] = []

        def admit(pos: torch.Tensor) -> torch.Tensor:  # pairs absent from every tier
            observed.append(True)
            return adm.observe_and_admit(comp[pos], counts[pos])

        slots = self.store.prepare(
            comp, self.step, rows_for, tables=self._tables(tables), admit=admit
        )
        if not observed:  # one observation per training step (the decay's clock)
            adm.observe_and_admit(comp[:0], counts[:0])
        return slots

    def _advance(self) -> None:
        """A training step starts: the step counter advances and, with TTL, the store
        sweeps its expired rows (every ``sweep_every(ttl)`` steps; between sweeps,
        expired rows found on the way read as absent: exact at every step)."""
        self.step += 1
        if self.ttl is not None:
            self.store.expire(self.step)

    def _fresh_from(self) -> Optional[int]:
        """TTL, between steps (eval, export): rows not used since before this step read
        as absent, as the next step will see them (None: no TTL)."""
        return None if self.ttl is None else self.step + 1 - self.ttl

    def _rows_for(
        self,
        comp: torch.Tensor,
        tables: torch.Tensor,
        create: Optional[Callable[[torch.Tensor], torch.Tensor]],
    ) -> Callable[..., torch.Tensor]:
        """The store's row source: ``(positions [M], out=None) -> rows [M, row_width]``."""

        def rows_for(pos: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
            if create is None:
                return self.new_rows(self.keys_of(comp[pos], tables[pos]), tables[pos], out)
            rows = create(pos)
            return rows if out is None else out.copy_(rows)

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
        return self.store.prefetch(comp, self.step, tables=self._tables(tables))

    def track_touched(self, on: bool) -> None:
        """Starts (or stops) recording the pairs trained since the last merge of the
        replicas (``TouchedRows``; k-step merging). Starting forgets earlier records."""
        self.touched = TouchedRows(self.row_width, self.device) if on else None

    def track_changes(self, on: bool) -> None:
        """Starts (or stops) recording the pairs changed since the last checkpoint
        (``ChangedPairs``; delta checkpoints): trained, overwritten by a merge, or
        deleted by a TTL sweep. Starting forgets earlier records."""
        self.changes = ChangedPairs(self.device) if on else None
        self.store.on_expire = self.changes.record if on else None

    def record_touched(
        self,
        comp: torch.Tensor,
        tables: torch.Tensor,
        slots: torch.Tensor,
        rows: Optional[torch.Tensor] = None,
    ) -> None:
        """Records the unique pairs a training forward prepared: as changed (delta
        checkpoints), and, before their update, as touched since the last merge when
        tracking (k-step merging; pairs without a row, slot -1, are skipped there).

        Args:
            comp, tables, slots: int64 ``[U]`` the pairs and their slots.
            rows: their rows ``[U, row_width]`` when the forward gathered them; else the
                rows of the pairs not recorded yet are read at ``slots``.
        """
        if self.changes is not None:
            if self.admission is not None and self.ttl is None:
                # without TTL a pair left out by admission (slot -1) never had a row;
                # with TTL it may have had one that expired: a deletion to record
                live = (slots >= 0).nonzero().squeeze(1)
                self.changes.record(comp[live], tables[live])
            else:
                self.changes.record(comp, tables)
        if self.touched is None:
            return
        if self.admission is not None:
            live = (slots >= 0).nonzero().squeeze(1)
            if live.numel() < slots.numel():
                comp, tables, slots = comp[live], tables[live], slots[live]
                rows = None if rows is None else rows[live]

        def before(pos: torch.Tensor) -> torch.Tensor:
            return rows[pos] if rows is not None else self.store.read(slots[pos])

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
        if self.changes is not None:
            self.changes.record(comp, tables)
        self.store.overwrite(comp, rows, self.step, tables=self._tables(tables))
        self.version += 1

    def lookup_rows(
        self, comp: torch.Tensor, tables: torch.Tensor, meta_out: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of pairs ``[N, row_width]`` (zeros where absent or expired) and
        ``found [N]``; never creates or moves rows (evaluation). ``meta_out`` (int64
        ``[N, 2]``, given): the found rows' ``(last_step, freq)``."""
        return self.store.lookup_rows(comp, self._tables(tables), fresh_from=self._fresh_from(),
                                      meta_out=meta_out)

    def read(self, slots: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
        """Rows at ``slots`` ``[N, row_width]`` (the first ``cols`` columns only when
        given); slot -1 (a pair left out by admission) reads as zeros."""
        if self.admission is None:
            return self.store.read(slots, cols)
        live = (slots >= 0).nonzero().squeeze(1)
        if live.numel() == slots.numel():
            return self.store.read(slots, cols)
        width = self.row_width if cols is None else cols
        out = torch.zeros(slots.numel(), width, device=self.store.device)
        out[live] = self.store.read(slots[live], cols)
        return out

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites the rows at unique ``slots`` (e.g. of :meth:`slots_for`)."""
        self.store.write(slots, rows)

    def flush(self) -> None:
        self.store.flush()

    def stats(self) -> dict[str, float]:
        """Store counters, plus ``admission_*`` (see ``Admission.stats``) with admission."""
        out = self.store.stats()
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
        if self.fused:  # one kernel, in place in the store
            self.store.update_rows(slots, grad, self.optimizer)
        else:
            if rows is None:
                rows = self.store.read(slots)
            self.store.write(slots, self.optimizer.update(rows, grad.to(rows.dtype)))
        self.version += 1

    # -- per-table views -------------------------------------------------------------
    def export_table(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys [R], rows [R, row_width])`` of table ``t``."""
        comp, rows = self.store.export_table(t, fresh_from=self._fresh_from())
        return self._raw(comp, t), rows

    def export_table_chunks(self, t: int, chunk_rows: int
                            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`export_table` in consecutive chunks (``Store.export_table_chunks``)."""
        for comp, rows in self.store.export_table_chunks(t, self._fresh_from(), chunk_rows):
            yield self._raw(comp, t), rows

    def _raw(self, comp: torch.Tensor, t: int) -> torch.Tensor:
        tables = torch.full((comp.numel(),), t, dtype=torch.int64, device=comp.device)
        return self.keys_of(comp, tables)

    def changed_tables(
        self,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The pairs changed since the last checkpoint (:meth:`track_changes` must be
        on), per table ``t``: ``(keys [C_t], rows [C_t, row_width], deleted [D_t],
        last [C_t])`` (``last``: each row's last training step, on the CPU),
        keys ascending: the rows of the changed pairs that have one, and the changed
        keys that have none (deleted by TTL; or never given one, which a reader skips).
        Reads through the store, never creates or moves rows; with TTL it first sweeps
        the rows the next step would find expired (so their deletions are recorded)."""
        assert self.changes is not None, "track_changes(True) first"
        if self.ttl is not None:  # the rows the next step sees expired go now (recorded)
            self.store.expire(self.step + 1, force=True)
        comp, tables = self.changes.pairs()
        meta = torch.zeros(comp.numel(), 2, dtype=torch.int64)
        rows, found = self.lookup_rows(comp, tables, meta_out=meta)
        keys = self.keys_of(comp, tables)
        keys, order = torch.sort(keys, stable=True)
        tables, found, rows = tables[order], found[order], rows[order]
        last = meta[order.cpu(), LAST]
        out = []
        for t in range(self.num_tables):
            mine = tables == t
            live, dead = (mine & found).nonzero().squeeze(1), (mine & ~found).nonzero().squeeze(1)
            out.append((keys[live], rows[live], keys[dead], last[live.cpu()]))
        return out

    def persist(self) -> list[str]:
        """The SSD tier of every table that has one holds the freshest copy of each of
        its rows (see ``SlotStore.persist``); returns the tables whose cached rows hold
        NaN/Inf."""
        return [self.names[t] for t in self.store.persist()]

    def cached_rows(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Per table name, the copies its caches hold above its SSD tier, the freshest
        last (``SlotStore.cached_rows``; keys as the SSD tier keeps them)."""
        return dict(zip(self.names, self.store.cached_rows()))

    def load_tables(self, parts: list[Optional[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Replaces every row: ``parts[t] = (keys [R_t], rows [R_t, row_width])``, each
        table's rows in the order given; ``None``: table ``t``'s rows are what its SSD
        tier holds now (a restored snapshot). Raises ValueError on a repeated key."""
        from_bottom = [t for t, p in enumerate(parts) if p is None]
        empty = (torch.empty(0, dtype=torch.int64), torch.empty(0, self.row_width))
        parts = [empty if p is None else p for p in parts] or [empty]
        keys = torch.cat([k.to(self.device, torch.int64) for k, _ in parts])
        rows = torch.cat([r.to(self.device, torch.float32) for _, r in parts])
        tables = torch.cat([
            torch.full((k.numel(),), t, dtype=torch.int64, device=self.device)
            for t, (k, _) in enumerate(parts)
        ])
        comp = self.composite(keys, tables)
        if comp.numel() > 1:
            sorted_comp, order = torch.sort(comp, stable=True)
            sorted_tab = tables[order]
            same = (sorted_comp[1:] == sorted_comp[:-1]) & (sorted_tab[1:] == sorted_tab[:-1])
            if bool(same.any()):
                which = self.names[int(sorted_tab[1:][same][0])]
                raise ValueError(f"table {which}: checkpoint has duplicate keys")
        self.store.load(comp, rows, self.step, tables=self._tables(tables),
                        from_bottom=from_bottom)

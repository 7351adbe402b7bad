"""The slot store of a group of tiered tables: one tier chain per table, one slot array.

Every table keeps its own :class:`~terarec.ps.store.chain.TierChain` (its device and host
budgets, cache policy, scratch pad, SSD table, counters: it caches exactly as it would
alone), keyed by the table's own keys. The chains' device tiers are consecutive parts
of one row array, so the group gathers, pools and updates every table's rows of a batch
in one launch each, as FBGEMM's TBE does for several tables, over *group slots*:

    table t's device slot s      -> base[t] + s            (base: running sum of budgets)
    table t's scratch pad row i  -> total + i * T + t      (total: sum of budgets, T tables)

A batch's pairs are split by table once per call (one sort); each chain makes its part
resident. Rows in a scratch pad (batches larger than a budget) are read and updated
through their chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch

from terarec.ps.store.chain import TierChain
from terarec.ps.store.protocol import Admit, Expired, RowSource, subset


class TieredStore:
    """Tier chains of a group's tables over one device row array (``SlotStore``).

    Args:
        storage: float32 ``[sum of device budgets, row_width]``, the chains' device
            tiers' rows (table ``t``'s at ``base[t] : base[t] + capacity``).
        chains: one per table, in table order; table ``t``'s device tier holds the
            rows ``storage[base[t] : base[t + 1]]``.
        salts: the tables' namespace salts (composite key = key ^ salt).
    """

    def __init__(self, storage: torch.Tensor, chains: list[TierChain], salts: list[int]) -> None:
        self.storage = storage
        self.chains = chains
        self.salts = salts
        self.row_width = chains[0].row_width
        caps = [c.top.capacity for c in chains]
        self.base = [sum(caps[:t]) for t in range(len(caps))]
        self.total = sum(caps)
        self._caps = torch.tensor(caps, device=storage.device)
        self._salts = torch.tensor(salts, dtype=torch.int64, device=storage.device)
        self._on_expire: Optional[Expired] = None

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def on_expire(self) -> Optional[Expired]:
        return self._on_expire

    @on_expire.setter
    def on_expire(self, fn: Optional[Expired]) -> None:
        """Each chain reports its own keys; they reach ``fn`` as group pairs."""
        self._on_expire = fn
        for t, chain in enumerate(self.chains):
            chain.on_expire = None if fn is None else self._expired_of(t, fn)

    def _expired_of(self, t: int, fn: Expired) -> Expired:
        def report(keys: torch.Tensor, _tables: torch.Tensor) -> None:
            fn(self._raw(keys, t), torch.full_like(keys, t))  # xor: raw -> composite too

        return report

    def __len__(self) -> int:
        return sum(len(c) for c in self.chains)

    @property
    def num_tables(self) -> int:
        return len(self.chains)

    def _split(self, tables: Optional[torch.Tensor], n: int) -> list[torch.Tensor]:
        """Positions of each table's pairs ``[n_t]`` (ascending), in table order."""
        if tables is None:
            return [torch.arange(n, device=self.device)] + [
                torch.empty(0, dtype=torch.int64, device=self.device)
            ] * (self.num_tables - 1)
        order = torch.sort(tables, stable=True).indices
        counts = torch.bincount(tables, minlength=self.num_tables).tolist()
        return list(torch.split(order, counts))

    def _raw(self, keys: torch.Tensor, t: int) -> torch.Tensor:
        return keys ^ self.salts[t] if self.salts[t] else keys

    # -- slots -----------------------------------------------------------------------
    def _to_group(self, local: torch.Tensor, t: int) -> torch.Tensor:
        cap = self.chains[t].top.capacity
        pad = (local - cap) * self.num_tables + self.total + t
        out = torch.where(local < cap, local + self.base[t], pad)
        return torch.where(local < 0, local, out)  # -1 (not admitted) stays

    def _pad_parts(self, slots: torch.Tensor) -> Optional[list[tuple[int, Any, Any]]]:
        """None when every slot is a device slot; else ``(table, positions, local
        slots)`` of the scratch pad rows, per table that has some."""
        if not self._has_pad():
            return None
        pad = slots >= self.total
        if not bool(pad.any()):
            return None
        pos = pad.nonzero().squeeze(1)
        rel = slots[pos] - self.total
        tabs = rel % self.num_tables
        local = rel // self.num_tables + self._caps[tabs]
        parts = []
        for t in torch.unique(tabs).tolist():
            mine = (tabs == t).nonzero().squeeze(1)
            parts.append((t, pos[mine], local[mine]))
        return parts

    def read(self, slots: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
        src = self.storage if cols is None else self.storage[:, :cols]
        parts = self._pad_parts(slots)
        if parts is None:
            return src.index_select(0, slots)
        out = src.index_select(0, slots.clamp(max=self.total - 1))
        for t, pos, local in parts:
            out[pos] = self.chains[t].read(local, cols)
        return out

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        parts = self._pad_parts(slots)
        if parts is None:
            self.storage.index_copy_(0, slots, rows.to(self.storage.dtype))
            return
        dev = (slots < self.total).nonzero().squeeze(1)
        self.storage.index_copy_(0, slots[dev], rows[dev].to(self.storage.dtype))
        for t, pos, local in parts:
            self.chains[t].write(local, rows[pos])

    def update_rows(self, slots: torch.Tensor, grad: torch.Tensor, optimizer: Any) -> None:
        """One fused optimizer step: one launch over the device rows; scratch pad rows
        through their chains, at the same optimizer step."""
        parts = self._pad_parts(slots)
        if parts is None:
            optimizer.update_at(self.storage, slots, grad)
            return
        step = optimizer.step
        dev = (slots < self.total).nonzero().squeeze(1)
        optimizer.update_at(self.storage, slots[dev], grad[dev])
        for t, pos, local in parts:
            optimizer.step = step  # every part takes the same step
            self.chains[t].update_rows(local, grad[pos], optimizer)

    # -- per-table work ----------------------------------------------------------------
    def _each(
        self,
        keys: torch.Tensor,
        tables: Optional[torch.Tensor],
        work: Callable[[int, TierChain, torch.Tensor, torch.Tensor], Any],
    ) -> list[Any]:
        """``work(t, chain, positions, raw keys)`` for every table (also those without
        pairs here: a chain's step bookkeeping runs every step, as it would alone)."""
        return [
            work(t, chain, pos, self._raw(keys[pos], t))
            for t, (chain, pos) in enumerate(zip(self.chains, self._split(tables, keys.numel())))
        ]

    def prepare(
        self,
        keys: torch.Tensor,
        step: int,
        create: RowSource,
        tables: Optional[torch.Tensor] = None,
        admit: Optional[Admit] = None,
    ) -> torch.Tensor:
        """Each table's chain makes its pairs resident (``admit``, when given, is asked
        once per table with that table's absent pairs). The top tiers' lookups run
        first, and their misses are counted for all tables with one host sync: when
        every pair is resident, no chain walks its tiers."""
        pos, raw = self._parts(keys, tables)
        found = [c.top.lookup(r) for c, r in zip(self.chains, raw)]
        misses = torch.stack([(f < 0).sum() for f in found]).tolist()
        local = []
        for t, chain in enumerate(self.chains):
            sub_admit = None if admit is None else (lambda p, q=pos[t]: admit(q[p]))
            local.append(chain.prepare_found(
                raw[t], found[t], step, subset(create, pos[t]), sub_admit, misses=misses[t]))
        slots = torch.empty_like(keys)
        plain = not self._has_pad() and not any(misses)  # device slots only, none -1
        slots[torch.cat(pos)] = torch.cat([
            loc + self.base[t] if plain else self._to_group(loc, t) for t, loc in enumerate(local)
        ])
        return slots

    def _parts(
        self, keys: torch.Tensor, tables: Optional[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each table's positions ``[n_t]`` and raw keys ``[n_t]``, in table order."""
        pos = self._split(tables, keys.numel())
        if tables is None:
            return pos, [self._raw(keys, 0)] + [keys[p] for p in pos[1:]]
        order = torch.cat(pos)
        raw = (keys ^ self._salts[tables])[order]  # one gather for every table
        return pos, list(torch.split(raw, [p.numel() for p in pos]))

    def _has_pad(self) -> bool:
        """Whether some chain holds rows in its scratch pad (host state, no sync)."""
        return any(c.scratch is not None and len(c.scratch) > 0 for c in self.chains)

    def prefetch(
        self, keys: torch.Tensor, step: int, tables: Optional[torch.Tensor] = None
    ) -> bool:
        fitted = self._each(keys, tables, lambda t, c, pos, raw: c.prefetch(raw, step))
        return all(fitted)

    def lookup_rows(
        self,
        keys: torch.Tensor,
        tables: Optional[torch.Tensor] = None,
        fresh_from: Optional[int] = None,
        meta_out: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros(keys.numel(), self.row_width, device=self.device)
        found = torch.zeros(keys.numel(), dtype=torch.bool, device=self.device)

        def one(t: int, chain: TierChain, pos: torch.Tensor, raw: torch.Tensor) -> None:
            meta = None if meta_out is None else meta_out.new_zeros(pos.numel(), 2)
            out[pos], found[pos] = chain.lookup_rows(raw, fresh_from=fresh_from, meta_out=meta)
            if meta_out is not None:
                meta_out[pos.to(meta_out.device)] = meta

        self._each(keys, tables, one)
        return out, found

    def overwrite(
        self, keys: torch.Tensor, rows: torch.Tensor, step: int,
        tables: Optional[torch.Tensor] = None,
    ) -> int:
        made = self._each(keys, tables, lambda t, c, pos, raw: c.overwrite(raw, rows[pos], step))
        return sum(made)

    def export_table(
        self, table: int, fresh_from: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, rows = self.chains[table].export(fresh_from=fresh_from)
        return self._raw(keys, table), rows  # xor is its own inverse: composite keys

    def export_table_chunks(
        self, table: int, fresh_from: Optional[int] = None, chunk_rows: int = 1 << 18
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield self.export_table(table, fresh_from)  # (a chain dedups across its tiers)

    def rows_per_table(self, num_tables: int) -> list[int]:
        return [len(c) for c in self.chains]

    def persist(self) -> list[int]:
        return [t for t, c in enumerate(self.chains) if c.persist()]

    def cached_rows(self) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        return [c.cached_rows()[0] for c in self.chains]

    def load(
        self, keys: torch.Tensor, rows: torch.Tensor, step: int,
        tables: Optional[torch.Tensor] = None, from_bottom: Sequence[int] = (),
    ) -> None:
        self._each(keys, tables, lambda t, c, pos, raw: c.load(
            raw, rows[pos], step, from_bottom=[0] if t in from_bottom else []))

    def expire(self, step: int, force: bool = False) -> int:
        return sum(c.expire(step, force) for c in self.chains)

    def flush(self) -> None:
        for c in self.chains:
            c.flush()

    def stats(self) -> dict[str, float]:
        """The chains' counters and sizes summed over the tables (the SSD store's DB
        gauges, which every table of a rank shares, once)."""
        out: dict[str, float] = {}
        for c in self.chains:
            for k, v in c.stats().items():
                shared = "_db_" in k
                out[k] = max(out.get(k, v), v) if shared else out.get(k, 0.0) + v
        return out


"""A tier chain's reads and writes outside the training path.

What a k-step merge, an evaluation, a checkpoint and a restore do with a chain's rows
(``lookup_rows``, ``overwrite``, ``export``, ``load``), and its counters. Reads follow
the order a row's freshest copy is found in: the top tier, the scratch pad, then the
tiers below. :class:`~terarec.ps.store.chain.TierChain` (the training path) builds on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch

from terarec.ps.tiers.protocol import LAST, META_WIDTH, Cache, Tier
from terarec.ps.tiers.scratch import ScratchPad


class ChainAccess:
    """The non-training half of :class:`~terarec.ps.store.chain.TierChain` (its state
    is the chain's)."""

    tiers: list[Any]
    top: Cache
    caches: list[Cache]
    bottom: Tier
    scratch: Optional[ScratchPad]
    row_width: int
    created: int
    expired: int
    moved: dict[str, int]
    pad_hits: int
    prefetched: dict[str, int]

    def __len__(self) -> int:
        return self.created - self.expired

    def overwrite(
        self, keys: torch.Tensor, rows: torch.Tensor, step: int,
        tables: Optional[torch.Tensor] = None,
    ) -> int:
        """Sets the rows of unique ``keys`` ``[N]`` to ``rows [N, row_width]`` where their
        freshest copy lives (the top tier, the scratch pad, a lower tier: the order reads
        follow), in place: metadata, locks and positions are kept, older copies below
        stay older. Keys in no tier get a new row in the bottom tier (metadata
        ``(step, 0)``). A k-step merge writes back with it. Returns the rows created."""
        if keys.numel() == 0:
            return 0
        rows = rows.to(self.top.device, torch.float32)
        slots = self.top.lookup(keys.to(self.top.device))
        hit = (slots >= 0).to(keys.device)
        self.top.write(slots[slots >= 0], rows[hit.to(rows.device)])
        pending = (~hit).nonzero().squeeze(1)
        if self.scratch is not None and pending.numel() and len(self.scratch):
            s = self.scratch.lookup(keys[pending].to(self.top.device))
            h = (s >= 0).to(keys.device)
            self.scratch.write(s[s >= 0], rows[pending[h].to(rows.device)])
            pending = pending[~h]
        for tier in self.tiers[1:]:
            if pending.numel() == 0:
                break
            k = keys[pending]
            mine = rows[pending.to(rows.device)]
            if tier is not self.bottom:
                s = tier.lookup(k.to(tier.device))  # type: ignore[attr-defined]
                h = (s >= 0).to(keys.device)
                tier.write(s[s >= 0], mine[h.to(mine.device)].to(tier.device))  # type: ignore[attr-defined]
            else:  # the bottom tier: an upsert, with the row's own metadata
                got = torch.empty(k.numel(), self.row_width)
                meta = torch.empty(k.numel(), META_WIDTH, dtype=torch.int64)
                h = torch.ones(k.numel(), dtype=torch.bool, device=keys.device)
                h[tier.find(k, got, meta).to(keys.device)] = False
                if bool(h.any()):
                    tier.insert(k[h], mine[h.to(mine.device)], meta[h.cpu()])
            pending = pending[~h]
        if pending.numel() == 0:
            return 0
        meta = torch.tensor([step, 0], dtype=torch.int64).repeat(pending.numel(), 1)
        self.tiers[-1].insert(keys[pending], rows[pending.to(rows.device)], meta)
        self.created += pending.numel()
        return pending.numel()

    def lookup_rows(
        self,
        keys: torch.Tensor,
        tables: Optional[torch.Tensor] = None,
        fresh_from: Optional[int] = None,
        meta_out: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``keys`` ``[N]`` without promoting or creating them:
        ``(rows [N, row_width], found [N] bool)``. With ``fresh_from`` (TTL), rows not
        used since before that step read as absent. ``meta_out`` (int64 ``[N, 2]``,
        given): the found rows' metadata (a scratch pad row: used at this step)."""
        out = torch.zeros(keys.numel(), self.row_width, device=self.top.device)
        found = torch.zeros(keys.numel(), dtype=torch.bool, device=out.device)
        pending = torch.arange(keys.numel(), device=keys.device)
        for tier in self._read_order():
            if pending.numel() == 0:
                break
            got = torch.zeros(pending.numel(), self.row_width, device=out.device)
            hit = torch.ones(pending.numel(), dtype=torch.bool, device=out.device)
            got_meta = torch.zeros(pending.numel(), META_WIDTH, dtype=torch.int64)
            if tier is self.scratch:  # rows of the step being trained: fresh
                hit[tier.find(keys[pending], got)] = False
                fresh = hit
                got_meta[:, LAST] = self.step
            else:
                hit[tier.find(keys[pending], got, got_meta)] = False
                fresh = hit
                if fresh_from is not None:  # a stale copy: those below are older still
                    fresh = hit & (got_meta[:, LAST] >= fresh_from).to(hit.device)
            out[pending[fresh]] = got[fresh]
            found[pending[fresh]] = True
            if meta_out is not None:
                at = fresh.to(got_meta.device)
                meta_out[pending[fresh].to(meta_out.device)] = got_meta[at].to(meta_out.device)
            pending = pending[~hit]
        return out, found

    def export(
        self, with_meta: bool = False, fresh_from: Optional[int] = None
    ) -> tuple[torch.Tensor, ...]:
        """Every row once, the freshest copy: ``(keys [R], rows [R, row_width])``, plus
        ``meta [R, 2]`` with ``with_meta``; with ``fresh_from`` (TTL) rows not used since
        before that step are left out."""
        parts = [self._export_meta(t) for t in self._read_order()]
        dev = self.top.device
        keys = torch.cat([k.to(dev) for k, _, _ in parts])
        rows = torch.cat([r.to(dev) for _, r, _ in parts])
        meta = torch.cat([m.to(dev) for _, _, m in parts])
        if keys.numel():
            sorted_keys, order = torch.sort(keys, stable=True)  # upper tiers first
            first = torch.ones(keys.numel(), dtype=torch.bool, device=keys.device)
            first[1:] = sorted_keys[1:] != sorted_keys[:-1]
            pick = order[first]
            if fresh_from is not None:
                pick = pick[meta[pick, LAST] >= fresh_from]
            keys, rows, meta = keys[pick], rows[pick], meta[pick]
        return (keys, rows, meta) if with_meta else (keys, rows)

    def _export_meta(self, tier: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if tier is self.scratch:
            k, r = tier.export()
            return k, r, tier.export_meta()
        return tier.export(with_meta=True)

    def _read_order(self) -> list[Any]:
        """Where a row's freshest copy is looked for first: the top tier, the scratch
        pad, then the lower tiers."""
        if self.scratch is None:
            return list(self.tiers)
        return [self.top, self.scratch, *self.tiers[1:]]

    def export_table(
        self, table: int, fresh_from: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`export` of the chain's one table (``table`` 0)."""
        keys, rows = self.export(fresh_from=fresh_from)
        return keys, rows

    def export_table_chunks(
        self, table: int, fresh_from: Optional[int] = None, chunk_rows: int = 1 << 18
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One chunk: the export dedups the copies of a row across the tiers."""
        yield self.export_table(table, fresh_from)

    def rows_per_table(self, num_tables: int) -> list[int]:
        return [len(self)]

    def persist(self) -> list[int]:
        """Writes a copy of every row held above the bottom tier (the caches, the scratch
        pad) into the bottom tier, keeping it where it is, then flushes every tier: the
        bottom tier alone then holds the freshest copy of every row, so a snapshot of it
        is a checkpoint of the table. Host memory used: the cached rows (the budgets).
        Returns ``[0]`` when a cached row (a recently trained one) holds NaN/Inf, else
        ``[]``."""
        finite = True
        for keys, rows, meta in self.cached_rows()[0]:
            finite = finite and bool(torch.isfinite(rows).all())
            self.bottom.insert(keys.cpu(), rows.cpu(), meta.cpu())
        self.flush()
        return [] if finite else [0]

    def cached_rows(self) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """``[parts]``: the chain's one table's copies above the bottom tier, the
        freshest last (``SlotStore.cached_rows``)."""
        parts = []
        for tier in reversed(self._read_order()[:-1]):  # the freshest copies last
            keys, rows, meta = self._export_meta(tier)
            if keys.numel():
                parts.append((keys, rows, meta))
        return [parts]

    def load(
        self, keys: torch.Tensor, rows: torch.Tensor, step: int,
        tables: Optional[torch.Tensor] = None, from_bottom: Sequence[int] = (),
    ) -> None:
        """Replaces every row (checkpoint restore): all go to the bottom tier, as used
        at ``step`` (metadata ``(step, 0)``). With ``from_bottom = [0]`` the rows are
        what the bottom tier holds now (a restored snapshot, metadata as saved) and
        ``keys`` must be empty: the cached copies are forgotten."""
        if self.scratch is not None:
            self.scratch.drop_all()
        for cache in self.caches:
            cache.remove(cache.export()[0])
        if from_bottom:
            if keys.numel():
                raise ValueError("rows given for a table loaded from its bottom tier")
            self.created, self.expired = len(self.bottom), 0
            return
        old = self.bottom.export()[0]
        if old.numel():
            self.bottom.evict(old)
        meta = torch.tensor([step, 0], device=keys.device).repeat(keys.numel(), 1)
        self.bottom.insert(keys, rows, meta)
        self.created = keys.numel()
        self.expired = 0

    def flush(self) -> None:
        for t in self.tiers:
            t.flush()

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.tiers:
            for k, v in t.stats().items():
                out[f"{t.name}_{k}"] = v
            out[f"{t.name}_rows_in"] = float(self.moved[t.name])
        out["expired"] = float(self.expired)
        if self.scratch is not None:
            out["scratch_rows"] = float(len(self.scratch))
            out["scratch_peak"] = float(self.scratch.peak)
            out["scratch_hits"] = float(self.pad_hits)
            out["scratch_rows_in"] = float(self.moved["scratch"])
        for k, v in self.prefetched.items():
            out[f"prefetch_{k}"] = float(v)
        return out

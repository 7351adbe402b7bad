"""Tiers chained top to bottom: the device cache, the host tier, the SSD tier.

Training reads and updates rows only in the *top* tier (a :class:`CacheTier`), by slot,
exactly as an unbounded table does. :meth:`TierChain.prepare` makes a batch's unique
keys resident there first (HugeCTR's "fill what you have, pass the misses down"):

    top.lookup -> hits (locked for this step)
    misses -> each lower tier in turn fills what it has -> the rest are new rows
    top.admit(misses) -> evicted rows -> pushed into the next tier (and so on)

Caches are exclusive (a row taken up from a budgeted host tier leaves it); the bottom
tier (an unbounded host tier or the SSD tier) may keep an older copy, which a later
eviction overwrites. Reads always go top down, so the freshest copy wins, and every row
is in some tier at every moment: nothing is lost on eviction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from terarec.ps.cache_tier import CacheTier, TierFullError


class TierChain:
    """A top :class:`CacheTier` over lower tiers (``find``/``insert``), bottom unbounded.

    Args:
        tiers: top first; every tier but the last a :class:`CacheTier`; the last one
            unbounded (``HostTier`` or ``SSDTier``).
        table: table name for errors.
    """

    def __init__(self, tiers: list[Any], table: str) -> None:
        if len(tiers) < 2 or not all(isinstance(t, CacheTier) for t in tiers[:-1]):
            raise ValueError("a tier chain is caches over one unbounded bottom tier")
        if isinstance(tiers[-1], CacheTier):
            raise ValueError("the bottom tier must be unbounded (host without budget, or SSD)")
        for upper, lower in zip(tiers[:-2], tiers[1:-1]):
            if lower.capacity < upper.capacity:
                raise ValueError(
                    f"table {table}: the {lower.name} tier ({lower.capacity} rows) must hold "
                    f"at least as many rows as the {upper.name} tier above it "
                    f"({upper.capacity})"
                )
        self.tiers = tiers
        self.top: CacheTier = tiers[0]
        self.table = table
        self.row_width = self.top.row_width
        self.created = 0  # rows ever created (rows are never dropped: len of the table)
        self.moved = dict.fromkeys((t.name for t in tiers), 0)  # rows written into a tier
        # prefetch counters: batches, those skipped (no room), keys looked up, keys
        # already in the top tier, rows it brought up, keys it found in no tier
        self.prefetched = dict.fromkeys(
            ("batches", "skipped", "keys", "resident", "rows_in", "absent"), 0
        )

    def __len__(self) -> int:
        return self.created

    def prepare(
        self,
        keys: torch.Tensor,
        step: int,
        create: Callable[[torch.Tensor], torch.Tensor],
        lock_until: Optional[int] = None,
        admit: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Top-tier slots of unique ``keys`` ``[U]``, making them resident.

        Args:
            keys: int64 ``[U]`` unique.
            step: the step being trained: rows locked until ``step`` or later (this
                batch's, and a prefetched next batch's) are never evicted.
            create: ``create(positions [M]) -> rows [M, row_width]`` for absent keys.
            lock_until: keep these rows until this step (default ``step``; a prefetch of
                the next batch passes ``step + 1``).
            admit: ``admit(positions [M]) -> bool [M]``, called (at most once) with the
                keys absent from every tier: only those it returns True for are created;
                the others get slot -1 and go into no tier (admission, ``ps/admission.py``).
                Default: create all.
        Returns:
            int64 ``[U]`` slots; -1 only where ``admit`` declined.
        """
        lock_until = step if lock_until is None else lock_until
        slots = self.top.lookup(keys)
        hit = (slots >= 0).nonzero().squeeze(1)
        self.top.touch(slots[hit], lock_until)
        self.top.lock(slots[hit], lock_until)
        miss = (slots < 0).nonzero().squeeze(1)
        if miss.numel() == 0:
            return slots
        kmiss = keys[miss]
        if kmiss.numel() > self.top.room(step):  # check before any row leaves a lower tier
            self._too_small(keys, lock_until > step)
        rows = torch.empty(miss.numel(), self.row_width, device=self.top.device)
        pending = torch.arange(miss.numel(), device=keys.device)
        for tier in self.tiers[1:]:
            if pending.numel() == 0:
                break
            got = torch.empty(pending.numel(), self.row_width, device=rows.device)
            if isinstance(tier, CacheTier):
                missed = tier.take(kmiss[pending], got)
            else:
                missed = tier.find(kmiss[pending], got)
            found = torch.ones(pending.numel(), dtype=torch.bool, device=rows.device)
            found[missed] = False
            rows[pending[found]] = got[found].to(rows.device)
            pending = pending[missed]
        if pending.numel() and admit is not None:
            ok = admit(miss[pending])
            if not bool(ok.all()):
                keep = torch.ones(miss.numel(), dtype=torch.bool, device=keys.device)
                keep[pending[~ok]] = False
                miss, kmiss, rows = miss[keep], kmiss[keep], rows[keep]
                pending = (torch.cumsum(keep, 0) - 1)[pending[ok]]  # positions after the cut
        if pending.numel():
            rows[pending] = create(miss[pending]).to(rows.device)
            self.created += pending.numel()
        new_slots, ev_keys, ev_rows = self.top.admit(kmiss, rows, step, lock_until)
        self.moved[self.top.name] += kmiss.numel()
        self._push_down(ev_keys, ev_rows, 1, step)
        slots[miss] = new_slots
        return slots

    def prefetch(self, keys: torch.Tensor, step: int) -> bool:
        """Makes the *next* batch's unique ``keys`` ``[U]`` resident in the top tier,
        locked through ``step + 1``, while step ``step`` trains (e.g. on a background
        thread: it touches the tiers' maps, free slots and unlocked rows, never the rows
        of the batch being trained).

        It changes where rows are, never what the table holds: keys in no tier are left
        for the step that trains them to create (or, with admission, to decide on). When
        the batch does not fit beside the one being trained (``room``), it gives up
        before any row moves: the next step makes the batch resident itself.

        Returns:
            False when it gave up.
        """
        self.prefetched["batches"] += 1
        self.prefetched["keys"] += keys.numel()
        hits, moved = self.top.stats()["hits"], self.moved[self.top.name]
        try:
            slots = self.prepare(keys, step, _no_rows, lock_until=step + 1, admit=_admit_none)
            self.prefetched["absent"] += int((slots < 0).sum())
            done = True
        except TierFullError:
            self.prefetched["skipped"] += 1
            done = False
        self.prefetched["resident"] += int(self.top.stats()["hits"] - hits)
        self.prefetched["rows_in"] += self.moved[self.top.name] - moved
        return done

    def _too_small(self, keys: torch.Tensor, prefetch: bool) -> None:
        extra = " plus the unique keys of the batch being trained (prefetch holds both)"
        raise TierFullError(
            f"table {self.table}: this batch has {keys.numel()} unique keys but the "
            f"{self.top.name} tier holds {self.top.capacity} rows; give it at least "
            f"{keys.numel()} rows{extra if prefetch else ''}"
        )

    def _push_down(self, keys: torch.Tensor, rows: torch.Tensor, level: int, step: int) -> None:
        if keys.numel() == 0:
            return
        tier = self.tiers[level]
        self.moved[tier.name] += keys.numel()
        if isinstance(tier, CacheTier):
            ev_keys, ev_rows = tier.insert(keys, rows.to(tier.device), step)
            self._push_down(ev_keys, ev_rows, level + 1, step)
        else:
            tier.insert(keys, rows)

    def lookup_rows(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``keys`` ``[N]`` without promoting or creating them:
        ``(rows [N, row_width], found [N] bool)``."""
        out = torch.zeros(keys.numel(), self.row_width, device=self.top.device)
        pending = torch.arange(keys.numel(), device=keys.device)
        for tier in self.tiers:
            if pending.numel() == 0:
                break
            got = torch.zeros(pending.numel(), self.row_width, device=out.device)
            missed = tier.find(keys[pending], got)
            found = torch.ones(pending.numel(), dtype=torch.bool, device=out.device)
            found[missed] = False
            out[pending[found]] = got[found]
            pending = pending[missed]
        found = torch.ones(keys.numel(), dtype=torch.bool, device=out.device)
        found[pending] = False
        return out, found

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row once, the freshest copy: ``(keys [R], rows [R, row_width])``."""
        parts = [t.export() for t in self.tiers]
        keys = torch.cat([k.to(self.top.device) for k, _ in parts])
        rows = torch.cat([r.to(self.top.device) for _, r in parts])
        if keys.numel() == 0:
            return keys, rows
        sorted_keys, order = torch.sort(keys, stable=True)  # upper tiers first among equals
        first = torch.ones(keys.numel(), dtype=torch.bool, device=keys.device)
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        pick = order[first]
        return keys[pick], rows[pick]

    def load(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Replaces every row (checkpoint restore): all go to the bottom tier."""
        for tier in self.tiers[:-1]:
            k, _ = tier.export()
            tier.remove(k)
        bottom = self.tiers[-1]
        if hasattr(bottom, "load"):  # HostTier: replace wholesale
            bottom.load(keys, rows)
        else:
            old, _ = bottom.export()
            if old.numel():
                bottom.delete(old)
            bottom.insert(keys, rows)
        self.created = keys.numel()

    def flush(self) -> None:
        for t in self.tiers:
            t.flush()

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.tiers:
            for k, v in t.stats().items():
                out[f"{t.name}_{k}"] = v
            out[f"{t.name}_rows_in"] = float(self.moved[t.name])
        for k, v in self.prefetched.items():
            out[f"prefetch_{k}"] = float(v)
        return out


def _admit_none(pos: torch.Tensor) -> torch.Tensor:
    """Creates no row (a prefetch)."""
    return torch.zeros(pos.numel(), dtype=torch.bool, device=pos.device)


def _no_rows(pos: torch.Tensor) -> torch.Tensor:
    raise AssertionError("a prefetch creates no rows")  # pragma: no cover

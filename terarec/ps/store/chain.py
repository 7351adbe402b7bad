"""Tiers chained top to bottom: the device cache, the host tier, the SSD tier.

Training reads and updates rows only in the *top* tier (a cache), by slot,
exactly as an unbounded table does. :meth:`TierChain.prepare` makes a batch's unique
keys resident there first (HugeCTR's "fill what you have, pass the misses down"):

    top.lookup -> hits (locked for this step)
    misses -> each lower tier in turn fills what it has -> the rest are new rows
    top.admit(misses) -> evicted rows -> pushed into the next tier (and so on)

Caches are exclusive (a row taken up from a budgeted host tier leaves it); the bottom
tier (an unbounded host tier or the SSD tier) may keep an older copy, which a later
eviction overwrites. Reads always go top down, so the freshest copy wins, and every row
is in some tier at every moment: nothing is lost on eviction. A row's metadata
``(last_step, freq)`` travels with it (``meta`` beside the rows), so LRU/LFU order and
TTL see a row's whole history wherever it was.

TTL (``ttl_steps``): a row not used for more than ``ttl_steps`` steps is deleted from
every tier and created again by the initializer when next used, like a new key. Exact
at every step: a stale row found on the way up counts as absent (and its stale copies
are deleted); :meth:`TierChain.expire` sweeps every tier every ``max(1, ttl_steps // 4)``
steps to reclaim the space (memory tiers in one vectorised pass, the SSD tier in a
chunked scan), never touching rows locked for the current or next batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from terarec.ps.store.chain_access import ChainAccess
from terarec.ps.store.protocol import Admit, Expired, RowSource, sweep_every
from terarec.ps.tiers.protocol import FREQ, LAST, META_WIDTH, Cache, Rows, Tier, TierFullError
from terarec.ps.tiers.scratch import ScratchPad

__all__ = ["TierChain", "sweep_every"]


class TierChain(ChainAccess):
    """Caches over one unbounded tier; implements ``SlotStore`` (``ps/store/protocol.py``).

    A chain holds the rows of one table (``tables`` arguments are all table 0).

    Args:
        tiers: top first; every tier but the last a :class:`~terarec.ps.tiers.protocol.Cache`
            (the device tier, a budgeted host tier); the last one an unbounded
            :class:`~terarec.ps.tiers.protocol.Tier` (an unbounded host tier, the SSD tier).
        table: table name for errors.
        scratch_pad: rows of a batch that the top tier has no room for are trained from
            a :class:`~terarec.ps.tiers.scratch.ScratchPad` (and written back down after the
            step) instead of failing with :class:`TierFullError`.
        ttl_steps: delete rows not used for more than this many steps (None: never).
    """

    def __init__(
        self,
        tiers: list[Any],
        table: str,
        scratch_pad: bool = False,
        ttl_steps: Optional[int] = None,
    ) -> None:
        if len(tiers) < 2 or not all(isinstance(t, Cache) for t in tiers[:-1]):
            raise ValueError("a tier chain is caches over one unbounded bottom tier")
        if isinstance(tiers[-1], Cache) or not isinstance(tiers[-1], Tier):
            raise ValueError("the bottom tier must be unbounded (host without budget, or SSD)")
        self.tiers = tiers
        self.top: Cache = tiers[0]
        self.caches: list[Cache] = tiers[:-1]
        self.bottom: Tier = tiers[-1]
        self.scratch: Optional[ScratchPad] = (
            ScratchPad(self.top.row_width, self.top.capacity, self.top.device)
            if scratch_pad
            else None
        )
        self.table = table
        self.row_width = self.top.row_width
        self.created = 0  # rows ever created
        self.expired = 0  # rows deleted by TTL (len of the table: created - expired)
        self.ttl = ttl_steps
        self.on_expire: Optional[Expired] = None  # told the keys a TTL sweep deletes
        self.step = 0  # the latest step prepared (metadata of scratch pad rows)
        self.moved = dict.fromkeys((t.name for t in tiers), 0)  # rows written into a tier
        self.moved["scratch"] = 0
        self.pad_hits = 0
        # prefetch counters: batches, those skipped (no room), keys looked up, keys
        # already in the top tier, rows it brought up, keys it found in no tier
        self.prefetched = dict.fromkeys(
            ("batches", "skipped", "keys", "resident", "rows_in", "absent"), 0
        )
        self._prefetch_backoff = 0  # batches not tried after the last skip (doubling)
        self._prefetch_wait = 0  # of which still to pass
        self._prefetched_for = -1  # the step whose batch the last prefetch brought in

    @property
    def device(self) -> torch.device:
        return self.top.device

    def read(self, slots: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
        """Rows at top-tier (or scratch pad) ``slots`` ``[N, row_width]`` (a copy); the
        first ``cols`` columns only when given."""
        pad = self._pad_mask(slots)
        if pad is None:
            return self.top.read(slots, cols)
        width = self.row_width if cols is None else cols
        out = torch.empty(slots.numel(), width, device=self.top.device)
        cached, padded = (~pad).nonzero().squeeze(1), pad.nonzero().squeeze(1)
        out[cached] = self.top.read(slots[cached], cols)
        out[padded] = self.scratch.read(slots[padded], cols)  # type: ignore[union-attr]
        return out

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites the rows at unique top-tier (or scratch pad) ``slots``."""
        pad = self._pad_mask(slots)
        if pad is None:
            self.top.write(slots, rows)
            return
        cached, padded = (~pad).nonzero().squeeze(1), pad.nonzero().squeeze(1)
        self.top.write(slots[cached], rows[cached])
        self.scratch.write(slots[padded], rows[padded])  # type: ignore[union-attr]

    def update_rows(self, slots: torch.Tensor, grad: torch.Tensor, optimizer: Any) -> None:
        """One fused optimizer step on the rows at unique top-tier (or scratch pad)
        ``slots`` in place; ``grad [N, dim]``. The optimizer's step counter advances
        once even when the rows lie in both the cache and the pad."""
        pad = self._pad_mask(slots)
        if pad is None:
            self.top.update_rows(slots, grad, optimizer)
            return
        cached, padded = (~pad).nonzero().squeeze(1), pad.nonzero().squeeze(1)
        # Both parts take the same step: the counter is rewound before the pad's part.
        step = optimizer.step
        self.top.update_rows(slots[cached], grad[cached], optimizer)
        optimizer.step = step
        self.scratch.update_rows(slots[padded], grad[padded], optimizer)  # type: ignore[union-attr]

    def _pad_mask(self, slots: torch.Tensor) -> Optional[torch.Tensor]:
        if self.scratch is None or len(self.scratch) == 0:
            return None  # no row in the pad: no pad slot (host state, no sync)
        pad = slots >= self.top.capacity
        return pad if bool(pad.any()) else None

    def prepare(
        self,
        keys: torch.Tensor,
        step: int,
        create: RowSource,
        tables: Optional[torch.Tensor] = None,
        admit: Optional[Admit] = None,
        lock_until: Optional[int] = None,
    ) -> torch.Tensor:
        """Top-tier slots of unique ``keys`` ``[U]``, making them resident.

        Args:
            keys: int64 ``[U]`` unique.
            step: the step being trained: rows locked until ``step`` or later (this
                batch's, and a prefetched next batch's) are never evicted.
            create: ``create(positions [M]) -> rows [M, row_width]`` for absent keys.
            tables: all table 0 (or None).
            admit: ``admit(positions [M]) -> bool [M]``, called (at most once) with the
                keys absent from every tier: only those it returns True for are created;
                the others get slot -1 and go into no tier (admission, ``ps/admission.py``).
                Default: create all.
            lock_until: keep these rows until this step (default ``step``; a prefetch of
                the next batch passes ``step + 1``).
        Returns:
            int64 ``[U]`` slots; -1 only where ``admit`` declined.
        Raises:
            TierFullError: (with ``table`` set) the batch does not fit the top tier and
                there is no scratch pad.
        """
        return self.prepare_found(keys, self.top.lookup(keys), step, create, admit, lock_until)

    def needs_walk(self) -> bool:
        """Whether :meth:`prepare_found` has work beyond the top tier's hits even when
        every key is a hit (TTL checks, rows in the scratch pad): host state, no sync."""
        return self.ttl is not None or (self.scratch is not None and len(self.scratch) > 0)

    def prepare_found(
        self,
        keys: torch.Tensor,
        found: torch.Tensor,
        step: int,
        create: RowSource,
        admit: Optional[Admit] = None,
        lock_until: Optional[int] = None,
        misses: Optional[int] = None,
    ) -> torch.Tensor:
        """:meth:`prepare` after the top tier's lookup: ``found = top.lookup(keys)``
        ``[U]`` (used as the result, in place), ``misses`` its count of -1 when known
        (a group of chains counts them all with one host sync)."""
        try:
            return self._prepare(keys, found, step, create, admit, lock_until, misses)
        except TierFullError as e:
            e.table = e.table or self.table
            raise

    def _prepare(
        self,
        keys: torch.Tensor,
        slots: torch.Tensor,
        step: int,
        create: RowSource,
        admit: Optional[Admit],
        lock_until: Optional[int],
        misses: Optional[int],
    ) -> torch.Tensor:
        lock_until = step if lock_until is None else lock_until
        self.step = max(self.step, lock_until)
        if not self.needs_walk():
            if misses is None:
                misses = int((slots < 0).sum())
            if misses == 0:  # every row resident: one host sync, no index lists
                self.top.touch(slots, lock_until)
                self.top.lock(slots, lock_until)
                return slots
        stale_top = self._stale_top(keys, slots, lock_until)
        hit = (slots >= 0).nonzero().squeeze(1)
        self.top.touch(slots[hit], lock_until)
        self.top.lock(slots[hit], lock_until)
        miss = (slots < 0).nonzero().squeeze(1)
        done: Optional[Rows] = None  # pad rows no step from `step` on needs
        if self.scratch is not None:
            # After a prefetch of this batch, the pad rows only the last step used stay
            # until the next prefetch (on the pipeline's background thread) writes them
            # down: the training thread neither waits for nor holds the GIL over them.
            release = lock_until > step or self._prefetched_for != step
            miss, done = self._scratch_hits(keys, miss, slots, step, lock_until, release)
        if miss.numel() == 0:
            self._push_down_recent(done, None, step)
            return slots
        # The rows leaving the pad go down only after this batch's rows were taken from
        # the tiers below: pushed first, they would evict from the host tier the very rows
        # this batch was about to find there (to the SSD tier and back).
        try:
            evicted = self._bring_up(keys, miss, slots, step, lock_until, stale_top, create, admit)
        except BaseException:
            self._push_down_recent(done, None, step)  # never dropped, whatever happened
            raise
        self._push_down_recent(done, evicted, step)
        return slots

    def _bring_up(
        self,
        keys: torch.Tensor,
        miss: torch.Tensor,
        slots: torch.Tensor,
        step: int,
        lock_until: int,
        stale_top: Optional[torch.Tensor],
        create: RowSource,
        admit: Optional[Admit],
    ) -> Rows:
        """:meth:`prepare` for the positions ``miss`` found in neither the top tier nor
        the pad: fills their ``slots``; returns the rows the top tier evicted."""
        kmiss = keys[miss]
        room = self.top.room(step)
        if kmiss.numel() > room and self.scratch is None:
            self._too_small(keys, lock_until > step)  # before any row leaves a lower tier
        rows = torch.empty(miss.numel(), self.row_width, device=self.top.device)
        meta = torch.empty(miss.numel(), META_WIDTH, dtype=torch.int64, device=rows.device)
        # TTL: rows found stale (not used since before `fresh_from`) count as absent
        fresh_from = None if self.ttl is None else lock_until - self.ttl
        gone = torch.zeros(miss.numel(), dtype=torch.bool, device=keys.device)
        if stale_top is not None:
            gone |= stale_top[miss]
        pending = torch.arange(miss.numel(), device=keys.device)
        for tier in self.tiers[1:]:
            if pending.numel() == 0:
                break
            got = torch.empty(pending.numel(), self.row_width, device=rows.device)
            got_meta = torch.empty(
                pending.numel(), META_WIDTH, dtype=torch.int64, device=rows.device
            )
            if tier is self.bottom:
                missed = tier.find(kmiss[pending], got, got_meta)
            else:  # caches are exclusive: the row moves up
                missed = tier.take(kmiss[pending], got, got_meta)
            found = torch.ones(pending.numel(), dtype=torch.bool, device=rows.device)
            found[missed] = False
            if fresh_from is not None:
                stale = found & (got_meta[:, LAST] < fresh_from)
                if bool(stale.any()):
                    old = pending[stale]
                    gone[old] = True
                    if tier is self.bottom:  # take removed it from a cache
                        tier.evict(kmiss[old])
                    found &= ~stale
                    missed = (~found).nonzero().squeeze(1)
            rows[pending[found]] = got[found].to(rows.device)
            meta[pending[found]] = got_meta[found]
            pending = pending[missed]
        if fresh_from is not None:
            self.expired += int(gone.sum())
        if pending.numel() and admit is not None:
            ok = admit(miss[pending])
            if not bool(ok.all()):
                keep = torch.ones(miss.numel(), dtype=torch.bool, device=keys.device)
                keep[pending[~ok]] = False
                miss, kmiss, rows, meta = miss[keep], kmiss[keep], rows[keep], meta[keep]
                pending = (torch.cumsum(keep, 0) - 1)[pending[ok]]  # positions after the cut
        if pending.numel():
            rows[pending] = create(miss[pending]).to(rows.device)
            meta[pending] = torch.tensor([-1, 0], device=meta.device)  # never used yet
            self.created += pending.numel()
        if kmiss.numel() > room:  # the rest of the batch trains from the scratch pad
            # the most used rows take the cache's room; the others stay for this step
            order = torch.argsort(meta[:, FREQ], descending=True, stable=True)
            miss, kmiss, rows, meta = miss[order], kmiss[order], rows[order], meta[order]
            over = slice(room, None)
            pad = self.scratch
            assert pad is not None
            slots[miss[over]] = pad.add(kmiss[over], rows[over], lock_until, meta[over])
            self.moved["scratch"] += kmiss.numel() - room
            miss, kmiss, rows = miss[:room], kmiss[:room], rows[:room]
            meta = meta[:room]
        new_slots, evicted = self.top.admit(kmiss, rows, step, lock_until, meta=meta)
        self.top.touch(new_slots, lock_until)
        self.moved[self.top.name] += kmiss.numel()
        slots[miss] = new_slots
        return evicted

    def _push_down_recent(self, done: Optional[Rows], evicted: Optional[Rows], step: int) -> None:
        """Writes the rows leaving the scratch pad (``done``) and the top tier
        (``evicted``) into the tier below, least recently then least often used first:
        when they are more than it holds, the ones it keeps are the likeliest to be used
        again (the others go straight on down). None of them is a key of the batch being
        prepared."""
        parts = [r for r in (evicted, done) if r is not None and r.keys.numel()]
        if not parts:
            return
        out = parts[0] if len(parts) == 1 else Rows(*(torch.cat(f) for f in zip(*parts)))
        if out.keys.numel() > 1:
            # (last, freq) ascending: one sort of last * 2**32 + freq (last >= -1; a
            # freq past 2**32 - 1 only blurs the tie-break)
            score = (out.meta[:, LAST] + 1) * (1 << 32) + out.meta[:, FREQ].clamp(max=(1 << 32) - 1)
            order = torch.sort(score, stable=True).indices
            out = Rows(out.keys[order], out.rows[order], out.meta[order])
        self._push_down(out.keys, out.rows, 1, step, out.meta)

    def _stale_top(
        self, keys: torch.Tensor, slots: torch.Tensor, lock_until: int
    ) -> Optional[torch.Tensor]:
        """TTL: top-tier hits not used since before ``lock_until - ttl`` leave the top
        tier (their slots become -1: misses). Returns bool ``[U]`` marking them, or None."""
        if self.ttl is None:
            return None
        hit = (slots >= 0).nonzero().squeeze(1)
        if hit.numel() == 0:
            return None
        old = self.top.read_meta(slots[hit])[:, LAST] < lock_until - self.ttl
        if not bool(old.any()):
            return None
        pos = hit[old]
        self.top.remove(keys[pos])  # a stale row is never locked: locks come with a use
        slots[pos] = -1
        stale = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
        stale[pos] = True
        return stale

    def expire(self, step: int, force: bool = False) -> int:
        """The TTL sweep, run by the owner as ``step`` starts (before :meth:`prepare`);
        does its work every :func:`sweep_every` steps. Deletes, tier by tier from the
        top, the rows not used since before ``step - ttl_steps`` (never rows locked for
        this step or the next), and their stale copies in the tiers below; a bottom-tier
        copy of a row held above is left alone (it is just an older copy). Returns the
        number of rows deleted."""
        if self.ttl is None or (step % sweep_every(self.ttl) and not force):
            return 0
        before = step - self.ttl
        n = 0
        for i, tier in enumerate(self.tiers):
            gone = tier.expire(before, self._held_above(i) if i else None)
            if gone.numel():
                for lower in self.tiers[i + 1 :]:
                    lower.evict(gone)
                if self.on_expire is not None:
                    self.on_expire(gone, torch.zeros_like(gone))
            n += gone.numel()
        self.expired += n
        return n

    def _held_above(self, level: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``keys -> bool``: held by a tier above ``level`` (or the scratch pad)."""

        def held(keys: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
            for t in self.caches[:level]:
                out |= t.contains(keys)
            if self.scratch is not None and len(self.scratch):
                out |= (self.scratch.lookup(keys.to(self.top.device)) >= 0).to(keys.device)
            return out

        return held

    def _scratch_hits(
        self,
        keys: torch.Tensor,
        miss: torch.Tensor,
        slots: torch.Tensor,
        step: int,
        lock_until: int,
        release: bool = True,
    ) -> tuple[torch.Tensor, Optional[Rows]]:
        """Keys already in the scratch pad keep their pad slot (locked on); pad rows no
        step from ``step`` on needs leave the pad (unless not ``release``). Returns the
        positions still missing and the rows that left (for :meth:`_push_down_recent`)."""
        pad = self.scratch
        assert pad is not None
        if miss.numel() and len(pad):
            found = pad.lookup(keys[miss])
            inpad = found >= 0
            if bool(inpad.any()):
                pad.lock(found[inpad], lock_until)
                slots[miss[inpad]] = found[inpad]
                self.pad_hits += int(inpad.sum())
                miss = miss[~inpad]
        return miss, Rows(*pad.release(step)) if release else None

    def prefetch(
        self, keys: torch.Tensor, step: int, tables: Optional[torch.Tensor] = None
    ) -> bool:
        """Makes the *next* batch's unique ``keys`` ``[U]`` resident in the top tier,
        locked through ``step + 1``, while step ``step`` trains (e.g. on a background
        thread: it touches the tiers' maps, free slots and unlocked rows, never the rows
        of the batch being trained).

        It changes where rows are, never what the table holds: keys in no tier are left
        for the step that trains them to create (or, with admission, to decide on). When
        the batch does not fit beside the one being trained (``room``), it gives up
        before any row moves: the next step makes the batch resident itself. After
        a batch that did not fit, the next 1, then 2, 4, ... up to 64 batches are not
        tried (each attempt costs a lookup of the whole batch), until one fits again.

        Returns:
            False when it gave up (or did not try).
        """
        self.prefetched["batches"] += 1
        if self._prefetch_wait:
            self._prefetch_wait -= 1
            self.prefetched["skipped"] += 1
            return False
        self.prefetched["keys"] += keys.numel()
        hits, moved = self.top.stats()["hits"], self.moved[self.top.name]
        try:
            slots = self.prepare(keys, step, _no_rows, lock_until=step + 1, admit=_admit_none)
            self.prefetched["absent"] += int((slots < 0).sum())
            self._prefetch_backoff = 0
            self._prefetched_for = step + 1
            done = True
        except TierFullError:
            self.prefetched["skipped"] += 1
            self._prefetch_backoff = min(2 * self._prefetch_backoff or 1, 64)
            self._prefetch_wait = self._prefetch_backoff
            done = False
        self.prefetched["resident"] += int(self.top.stats()["hits"] - hits)
        self.prefetched["rows_in"] += self.moved[self.top.name] - moved
        return done

    def _too_small(self, keys: torch.Tensor, prefetch: bool) -> None:
        extra = " plus the unique keys of the batch being trained (prefetch holds both)"
        raise TierFullError(
            f"table {self.table}: this batch has {keys.numel()} unique keys but the "
            f"{self.top.name} tier holds {self.top.capacity} rows; give it at least "
            f"{keys.numel()} rows{extra if prefetch else ''}, or let the rows that do not "
            "fit train from a scratch pad (scratch_pad: true)",
            table=self.table,
            tier=self.top.name,
        )

    def _push_down(
        self,
        keys: torch.Tensor,
        rows: torch.Tensor,
        level: int,
        step: int,
        meta: Optional[torch.Tensor] = None,
    ) -> None:
        """Writes rows (and their metadata; None: used at ``step``, a scratch pad's
        write-back) into tier ``level``; what it evicts goes on down."""
        if keys.numel() == 0:
            return
        if meta is None:
            meta = torch.tensor([step, 1], device=keys.device).repeat(keys.numel(), 1)
        tier = self.tiers[level]
        if tier is self.bottom:
            self.moved[tier.name] += keys.numel()
            tier.insert(keys, rows, meta)
            return
        skipped = None
        if keys.numel() > tier.capacity:
            # more rows than the cache holds (a scratch pad's write-back): the oldest
            # go straight to the tier below; none of them is in this cache (exclusive)
            skip = keys.numel() - tier.capacity
            dev = tier.device
            skipped = Rows(keys[:skip].to(dev), rows[:skip].to(dev), meta[:skip].to(dev))
            keys, rows, meta = keys[skip:], rows[skip:], meta[skip:]
        self.moved[tier.name] += keys.numel()
        ev = tier.insert(keys, rows.to(tier.device), meta, step)
        if skipped is not None:  # one write into the tier below, not two
            ev = Rows(*(torch.cat(f) for f in zip(skipped, ev)))
        self._push_down(ev.keys, ev.rows, level + 1, step, ev.meta)


def _admit_none(pos: torch.Tensor) -> torch.Tensor:
    """Creates no row (a prefetch)."""
    return torch.zeros(pos.numel(), dtype=torch.bool, device=pos.device)


def _no_rows(pos: torch.Tensor) -> torch.Tensor:
    raise AssertionError("a prefetch creates no rows")  # pragma: no cover

"""Sharded lookups: table groups whose rows are spread over the ranks of a shard group.

:class:`ShardedLookup` is what ``HierarchicalEmbeddingBagCollection`` runs instead of
its local lookup when it has a ``process_group``. Each rank holds the rows it *owns*
(``ps/shard/exchange.py``: ``owner_of``) in its own :class:`~terarec.ps.group.TableGroup`
(tiers, eviction, admission, TTL as on one rank); one lookup, for all table groups at
once::

    requester: unique (table, key) pairs per group [U_g] --route--> owner-major blocks
    counts  a2a -> keys a2a -> owner: dedup again [V_g] (pairs several ranks asked for)
      (replicas, sync on: all_gather the owners' pairs -> union [V'_g], same everywhere)
    owner:  slots_for(union) (find or create, tiers) -> rows [V'_g, width]
    rows    a2a: weights [U_g, D_g] back to the requester -> pooled there (autograd)
    backward: grad [U_g, D_g] -> grads a2a -> owner sums per pair [V'_g, D_g]
      (replicas: all_reduce over the union) -> / contributing ranks -> fused optimizer

**Gradient scale.** Each rank's loss is the mean over its *local* batch, and
``DistributedDataParallel`` averages dense gradients over its ranks; the row gradients
get the same treatment: the owner divides the per-key sum by the number of ranks that
contributed (the shard group's size, times the replica group's with sync on). With equal
local batches this is the gradient of the mean over the global batch, as one process
computes it (``docs/distributed.md``).

**Lockstep.** Every rank of the shard group must run the same sequence of lookups
(training forwards, their backwards, eval forwards, prefetches), a rank with no samples
included (with an empty batch): owners serve the others inside these collectives, and
every owner advances its groups' steps and optimizer counters once per training step,
whether or not it was asked for a key, exactly as one process does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from terarec.ps.group import TableGroup
from terarec.ps.shard.exchange import (
    Awaitable,
    ShardExchange,
    Splits,
    check_same_layout,
    owner_of,
    pack_blocks,
    unpack_blocks,
)


@dataclass
class Pairs:
    """Unique ``(table, key)`` pairs of a list ``[R]`` that may repeat them.

    ``keys``/``tables`` ``[V]`` are sorted by composite key (then table), so equal
    composite values are adjacent, as :meth:`TableGroup.slots_for` wants; ``inverse``
    ``[R]`` maps each input to its pair.
    """

    keys: torch.Tensor
    tables: torch.Tensor
    inverse: torch.Tensor


def dedup_pairs(comp: torch.Tensor, tables: torch.Tensor, multi: bool) -> Pairs:
    """Unique pairs of ``(comp [R], tables [R])``; ``multi=False``: one table (ignored)."""
    if not multi:
        keys, inverse = torch.unique(comp, sorted=True, return_inverse=True)
        return Pairs(keys, torch.zeros_like(keys), inverse)
    by_table = torch.sort(tables, stable=True)[1]
    order = by_table[torch.sort(comp[by_table], stable=True)[1]]
    sc, st = comp[order], tables[order]
    starts = torch.ones(comp.numel(), dtype=torch.bool, device=comp.device)
    if comp.numel() > 1:
        starts[1:] = (sc[1:] != sc[:-1]) | (st[1:] != st[:-1])
    inverse = torch.empty_like(order)
    inverse[order] = torch.cumsum(starts, 0) - 1
    first = starts.nonzero().squeeze(1)
    return Pairs(sc[first], st[first], inverse)


@dataclass
class Request:
    """A requester's side of one lookup.

    Attributes:
        orders: per group, int64 ``[U_g]``: the group's local pairs in send order
            (by owner, stable), i.e. block position -> local position.
        send: int64 ``[W, G]`` (CPU) pairs per owner and group.
        packed: int64 1-D, the packed pairs in block layout (``cols`` per pair).
    """

    orders: list[torch.Tensor]
    send: torch.Tensor
    packed: torch.Tensor


@dataclass
class Served:
    """An owner's side of one lookup (kept for the backward of a training lookup).

    Attributes:
        inverse: per group, int64 ``[R_g]``: received pair -> row position (union).
        slots: per group, int64 ``[V'_g]`` (training only).
        rows: per group, the rows ``[V'_g, width]`` read in forward (training only).
        versions: the groups' versions when read (stale rows are read again).
        replicated: the gradients are summed over the replica group.
        response: float 1-D, the weights for the requesters in block layout.
    """

    inverse: list[torch.Tensor]
    slots: list[torch.Tensor] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    replicated: bool = False
    response: Optional[torch.Tensor] = None


_GROUP_FIELDS = ("dim", "row width", "tables")


def _layout_field(i: int) -> str:
    """The name of value ``i`` of :class:`ShardedLookup`'s layout check."""
    if i < 2:
        return ("shard group size", "pair columns (3 with admission)")[i]
    return f"table group {(i - 2) // 3} {_GROUP_FIELDS[(i - 2) % 3]}"


class ShardedLookup:
    """Lookups and row updates of ``groups`` sharded over ``group``'s ranks.

    Args:
        groups: this rank's table groups (its shard of every table).
        device: the compute device (CUDA for NCCL, CPU for gloo).
        group: the shard group.
        replica_group: the ranks holding the same shard in other shard groups, or None.
        prefetch_group: a group with ``group``'s members for prefetches made on another
            thread, or None (prefetches then do nothing).
    """

    def __init__(
        self,
        groups: Sequence[TableGroup],
        device: torch.device,
        group: dist.ProcessGroup,
        replica_group: Optional[dist.ProcessGroup] = None,
        prefetch_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        self.groups = list(groups)
        self.device = device
        self.exchange = ShardExchange(group, device, replica_group)
        self.dims = [g.dim for g in self.groups]
        # occurrence counts travel with the keys only when admission needs them
        self.cols = 3 if any(g.admission is not None for g in self.groups) else 2
        layout = [self.exchange.world, self.cols]
        layout += [v for g in self.groups for v in (g.dim, g.row_width, g.num_tables)]
        # replicas must split keys the same way: one check over both groups, so that
        # every rank raises the same error together (none waits in a later collective)
        over = [group] if replica_group is None else [group, replica_group]
        check_same_layout(over, device, layout, "the sharded table layout", _layout_field)
        self.prefetcher: Optional[ShardExchange] = None
        if prefetch_group is not None:
            self.prefetcher = ShardExchange(prefetch_group, device)
            # local facts, no collective: the members' global ranks in group-rank order
            # (owner_of numbers owners by group rank, so these must be equal)
            members = dist.get_process_group_ranks(group)
            pre = dist.get_process_group_ranks(prefetch_group)
            if pre != members:
                raise ValueError(
                    f"prefetch_group has the global ranks {pre}, the shard group {members}: "
                    "it must have the same members"
                )

    @property
    def world(self) -> int:
        return self.exchange.world

    @property
    def rank(self) -> int:
        return self.exchange.rank

    def owned(self, comp: torch.Tensor) -> torch.Tensor:
        """bool ``[N]``: the composite keys this rank owns."""
        return owner_of(comp, self.world) == self.rank

    # -- the synchronous path ----------------------------------------------------------
    def lookup(
        self,
        keys: Sequence[torch.Tensor],
        tables: Sequence[torch.Tensor],
        counts: Sequence[Optional[torch.Tensor]],
        train: bool,
        sync_replicas: bool = True,
    ) -> list[torch.Tensor]:
        """The weights of every group's unique local pairs, the phases run in a row.

        Args:
            keys: per group, int64 ``[U_g]`` unique composite keys.
            tables: per group, int64 ``[U_g]`` their tables.
            counts: per group, int64 ``[U_g]`` occurrences (groups with admission) or None.
            train: a training lookup: owners find or create rows, and the weights carry
                a backward that updates them (through the owners' fused optimizer).
            sync_replicas: sum the row gradients over the replica group (k = 1).
        Returns:
            Per group ``[U_g, D_g]``, in the order of ``keys``.
        """
        req = self.route(keys, tables, counts)
        splits = self.send_counts(req).wait()
        received = self.send_keys(req, splits).wait()
        served = self.serve(received, splits, train, sync_replicas)
        rows = self.send_rows(served, splits).wait()
        return self.unpack(req, splits, rows, served if train else None)

    # -- phases ------------------------------------------------------------------------
    def route(
        self,
        keys: Sequence[torch.Tensor],
        tables: Sequence[torch.Tensor],
        counts: Sequence[Optional[torch.Tensor]],
        cols: Optional[int] = None,
    ) -> Request:
        """Local: every pair's owner and the packed pairs in block layout (no traffic)."""
        cols = self.cols if cols is None else cols
        orders, parts, per_owner = [], [], []
        for k, t, c in zip(keys, tables, counts):
            owner = owner_of(k, self.world)
            order = torch.sort(owner, stable=True)[1]
            per_owner.append(torch.bincount(owner, minlength=self.world))
            fields = [k, t] if cols == 2 else [k, t, torch.ones_like(k) if c is None else c]
            parts.append(torch.stack(fields, 1)[order])
            orders.append(order)
        send = torch.stack(per_owner, 1).cpu() if per_owner else torch.zeros(self.world, 0)
        return Request(orders, send.to(torch.int64), pack_blocks(parts, send))

    def send_counts(
        self, req: Request, exchange: Optional[ShardExchange] = None
    ) -> Awaitable[Splits]:
        """Phase 1: the pair counts (``[W, G]``) to every owner."""
        return (exchange or self.exchange).send_counts(req.send)

    def send_keys(
        self,
        req: Request,
        splits: Splits,
        exchange: Optional[ShardExchange] = None,
        cols: Optional[int] = None,
    ) -> Awaitable[torch.Tensor]:
        """Phase 2: the packed pairs to their owners."""
        c = self.cols if cols is None else cols
        n = splits.send.shape[1]
        return (exchange or self.exchange).send_to_owners(req.packed, splits, [c] * n)

    def serve(
        self, received: torch.Tensor, splits: Splits, train: bool, sync_replicas: bool = True
    ) -> Served:
        """Phase 3 (owner): the rows of the pairs received, made resident (training) or
        looked up (eval), and the weights to send back. With replicas and sync on, the
        union over the replica group is made resident (one all_gather)."""
        parts = unpack_blocks(received, splits.recv, [self.cols] * len(self.groups))
        if self.world == 1:  # the requester's own pairs: unique and sorted already
            pairs = [
                Pairs(p[:, 0], p[:, 1], torch.arange(p.shape[0], device=p.device))
                for p in parts
            ]
        else:
            pairs = [
                dedup_pairs(p[:, 0], p[:, 1], g.num_tables > 1)
                for g, p in zip(self.groups, parts)
            ]
        occ: list[Optional[torch.Tensor]] = [None] * len(self.groups)
        if self.cols == 3:
            occ = [
                torch.zeros(q.keys.numel(), dtype=torch.int64, device=q.keys.device)
                .index_add_(0, q.inverse, p[:, 2])
                for p, q in zip(parts, pairs)
            ]
        inverse = [q.inverse for q in pairs]
        replicated = train and sync_replicas and self.exchange.replicas > 1
        if replicated:
            pairs, occ, inverse = self._union(pairs, occ)
        served = Served(inverse, replicated=replicated)
        weights = []
        for g, q, o in zip(self.groups, pairs, occ):
            if train:
                slots = g.slots_for(q.keys, q.tables, counts=o if g.admission else None)
                rows = g.read(slots)  # zeros where admission left a pair out
                g.record_touched(q.keys, q.tables, slots, rows)  # k-step merging
                served.slots.append(slots)
                served.rows.append(rows)
                served.versions.append(g.version)
            else:
                rows, _ = g.lookup_rows(q.keys, q.tables)
            weights.append(rows[:, : g.dim])
        served.response = pack_blocks(
            [w[i] for w, i in zip(weights, inverse)], splits.recv
        ) if weights else torch.empty(0, device=self.device)
        return served

    def _union(
        self, pairs: list[Pairs], occ: list[Optional[torch.Tensor]]
    ) -> tuple[list[Pairs], list[Optional[torch.Tensor]], list[torch.Tensor]]:
        """The union of every replica's pairs (same order on every replica) and the map
        from this owner's received pairs to it."""
        n_groups = len(self.groups)
        fields = []
        for q, o in zip(pairs, occ):
            f = [q.keys, q.tables] + ([o] if self.cols == 3 else [])
            fields.append(torch.stack(f, 1))
        packed = torch.cat(fields) if fields else torch.empty(0, self.cols)
        counts = torch.tensor([q.keys.numel() for q in pairs], dtype=torch.int64)
        rows, per = self.exchange.gather_replicas(packed, counts).wait()
        starts = torch.cumsum(per, 1) - per  # [P, G] offset of group g in replica p's rows
        me = self.exchange.replica_rank
        out_pairs, out_occ, out_inv = [], [], []
        for g in range(n_groups):
            chunks = [
                rows[p, int(starts[p, g]) : int(starts[p, g] + per[p, g])]
                for p in range(self.exchange.replicas)
            ]
            allp = torch.cat(chunks)
            u = dedup_pairs(allp[:, 0], allp[:, 1], self.groups[g].num_tables > 1)
            mine_from = int(per[:me, g].sum())
            mine = u.inverse[mine_from : mine_from + int(per[me, g])]
            out_pairs.append(Pairs(u.keys, u.tables, u.inverse))
            out_inv.append(mine[pairs[g].inverse])
            if self.cols == 3:
                out_occ.append(
                    torch.zeros(u.keys.numel(), dtype=torch.int64, device=u.keys.device)
                    .index_add_(0, u.inverse, allp[:, 2])
                )
            else:
                out_occ.append(None)
        return out_pairs, out_occ, out_inv

    def send_rows(self, served: Served, splits: Splits) -> Awaitable[torch.Tensor]:
        """Phase 4: the weights back to the requesters."""
        assert served.response is not None
        return self.exchange.send_to_requesters(served.response, splits, self.dims)

    def unpack(
        self,
        req: Request,
        splits: Splits,
        rows: torch.Tensor,
        served: Optional[Served],
    ) -> list[torch.Tensor]:
        """Phase 5 (requester): per group ``[U_g, D_g]`` in local order. With ``served``
        (a training lookup) the weights carry the backward: their gradient goes to the
        owners, which update the rows (:meth:`apply_gradients`)."""
        if served is not None:
            rows.requires_grad_(True)
            rows.register_hook(_Backward(self, splits, served))
        parts = unpack_blocks(rows, splits.send, self.dims)
        return [_Permute.apply(p, order) for p, order in zip(parts, req.orders)]

    def apply_gradients(self, grad: torch.Tensor, splits: Splits, served: Served) -> None:
        """Backward: row gradients to the owners, summed per pair (and over replicas),
        scaled to the mean over contributing ranks, applied by the fused optimizer once
        per pair. Every owner steps every group, with or without gradients."""
        owned = self.exchange.send_to_owners(grad.detach(), splits, self.dims).wait()
        parts = unpack_blocks(owned, splits.recv, self.dims)
        sums = [
            torch.zeros(s.numel(), g.dim, dtype=grad.dtype, device=grad.device).index_add_(
                0, i, p
            )
            for g, s, i, p in zip(self.groups, served.slots, served.inverse, parts)
        ]
        ranks = self.world
        if served.replicated:
            flat = torch.cat([s.reshape(-1) for s in sums]) if sums else grad.new_empty(0)
            self.exchange.reduce_replicas(flat).wait()
            sizes = [s.numel() for s in sums]
            sums = [f.view(-1, g.dim) for f, g in zip(flat.split(sizes), self.groups)]
            ranks *= self.exchange.replicas
        for g, slots, s, rows, version in zip(
            self.groups, served.slots, sums, served.rows, served.versions
        ):
            if ranks > 1:
                s.div_(ranks)
            g.apply_gradients(slots, s, rows if g.version == version else None)

    # -- prefetch ------------------------------------------------------------------
    def prefetch(
        self, which: Sequence[int], keys: Sequence[torch.Tensor], tables: Sequence[torch.Tensor]
    ) -> list[bool]:
        """Routes the next batch's unique pairs of groups ``which`` (tiered ones) to
        their owners over the prefetch group; each owner makes those it holds resident
        (:meth:`TableGroup.prefetch`). Returns per group whether it fitted here (True
        for all without a prefetch group: nothing is done)."""
        ex = self.prefetcher
        if ex is None or not which:
            return [True] * len(which)
        req = self.route(keys, tables, [None] * len(which), cols=2)
        splits = self.send_counts(req, ex).wait()
        received = self.send_keys(req, splits, ex, cols=2).wait()
        parts = unpack_blocks(received, splits.recv, [2] * len(which))
        out = []
        for i, p in zip(which, parts):
            g = self.groups[i]
            q = dedup_pairs(p[:, 0], p[:, 1], g.num_tables > 1)
            out.append(g.prefetch(q.keys, q.tables))
        return out


class _Permute(torch.autograd.Function):
    """``out[order] = rows``: rows in send order back to local order. A permutation's
    adjoint is the inverse gather, so the backward is one ``index_select`` (autograd's
    ``index_select`` backward would zero a buffer and scatter-add into it)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(order)
        return torch.empty_like(rows).index_copy_(0, order, rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None


class _Backward:
    """Hook on the rows a training lookup received: runs :meth:`apply_gradients`."""

    def __init__(self, lookup: ShardedLookup, splits: Splits, served: Served) -> None:
        self.lookup = lookup
        self.splits = splits
        self.served: Optional[Served] = served

    def __call__(self, grad: torch.Tensor) -> None:
        if self.served is None:
            raise RuntimeError("a sharded lookup's backward ran twice (retain_graph?)")
        self.lookup.apply_gradients(grad, self.splits, self.served)
        self.served = None
        return None

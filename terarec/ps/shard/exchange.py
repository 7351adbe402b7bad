"""Key ownership and the collectives of the sharded embedding exchange.

Inside a shard group (a fast group of ``W`` ranks) every ``(table, key)`` pair has one
owner rank, which holds its row in its own tiers (``docs/distributed.md``)::

    owner(c) = fastrange(mix64(c ^ OWNER_SALT), W)       c = key ^ salt[table]

``fastrange(x, W) = (x >>> 32) * W >> 32`` takes the *top* 32 bits of the mix: the hash
indexes of the tiers bucket a key by the *low* bits of ``mix64(c)``, so the two never
correlate (an owner's keys still fill every bucket), and sequential or skewed ids spread
evenly over the owners (``tests/ps/test_exchange_owner.py``).

A lookup moves data in blocks: a rank's unique pairs of every table group go to their
owners in one all-to-all, laid out *owner-major, group-minor* (the block of group ``g``
for owner ``d`` holds ``counts[d, g]`` pairs), and every later message (rows back,
gradients to the owners) uses the same block layout with group ``g``'s width ``D_g``,
so one all-to-all per phase serves every group. :class:`ShardExchange` runs these
collectives; each call returns an :class:`Awaitable` (``async_op=True``), so a
pipeline can overlap them with compute; ``.wait()`` at once is the synchronous path.

The phases of one training step (``ps/shard/sharded.py`` drives them)::

    counts   all_to_all [W, G] pair counts                    (sizes the next messages)
    keys     all_to_all packed (key, table[, occurrences]) rows
    union    replicas: all_gather of the owners' unique pairs (every replica creates and
             updates the union, so replicas stay identical)
    rows     all_to_all weights [D_g] per pair, owner -> requester
    grads    all_to_all row gradients, requester -> owner (backward)
    reduce   replicas: all_reduce of the owners' per-key gradients over the union
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

import torch
import torch.distributed as dist

from terarec.hashing import mix64_torch, salt_for

T = TypeVar("T")

OWNER_SALT = salt_for("terarec-owner")
_LOW32 = (1 << 32) - 1


def owner_of(comp: torch.Tensor, world: int) -> torch.Tensor:
    """Owner rank of every composite key.

    Args:
        comp: int64 ``[N]`` composite keys (``key ^ salt[table]``).
        world: ranks in the shard group.
    Returns:
        int64 ``[N]`` in ``[0, world)``.
    """
    if world == 1:
        return torch.zeros_like(comp)
    hi = (mix64_torch(comp ^ OWNER_SALT) >> 32) & _LOW32
    return (hi * world) >> 32


class Awaitable(Generic[T]):
    """The result of collectives in flight: :meth:`wait` finishes them and returns it.

    Args:
        works: the ``dist.Work`` handles to wait for (None entries: already done).
        result: builds the result once they are done.
    """

    def __init__(self, works: Sequence[Optional[Any]], result: Callable[[], T]) -> None:
        self._works = list(works)
        self._result: Optional[Callable[[], T]] = result
        self._value: Optional[T] = None

    @classmethod
    def done(cls, value: T) -> Awaitable[T]:
        return cls([], lambda: value)

    def wait(self) -> T:
        if self._result is not None:
            for w in self._works:
                if w is not None:
                    w.wait()
            self._value = self._result()
            self._result = None
            self._works = []
        return self._value  # type: ignore[return-value]


def pack_blocks(parts: Sequence[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
    """Flattens per-group rows into the rank-major, group-minor block layout.

    Args:
        parts: per group ``g`` a ``[n_g, D_g]`` tensor whose rows are ordered by rank
            (``counts[0, g]`` rows for rank 0, then rank 1, ...).
        counts: int64 ``[W, G]`` (CPU) rows per rank and group.
    Returns:
        1-D ``[sum_g n_g * D_g]``: for rank 0 the rows of group 0, then group 1, ...,
        then rank 1, and so on. Example, two ranks, groups of widths 1 and 2, counts
        ``[[1, 1], [2, 0]]``: ``[a0 | b0 b0' | a1 a2]``.
    """
    world, n_groups = counts.shape
    if n_groups == 1:  # rank-major is already the layout
        return parts[0].reshape(-1)
    pieces = [p.split(counts[:, g].tolist()) for g, p in enumerate(parts)]
    flat = [pieces[g][r].reshape(-1) for r in range(world) for g in range(n_groups)]
    if not flat:
        return parts[0].new_empty(0) if parts else torch.empty(0)
    return torch.cat(flat)


def unpack_blocks(
    flat: torch.Tensor, counts: torch.Tensor, widths: Sequence[int]
) -> list[torch.Tensor]:
    """Inverse of :func:`pack_blocks`: per group ``[n_g, D_g]``, rows ordered by rank.

    Differentiable (split, view and cat), so autograd carries gradients from the groups'
    rows back to ``flat`` in one buffer.
    """
    world, n_groups = counts.shape
    if n_groups == 1:
        return [flat.view(-1, widths[0])]
    sizes = (counts * torch.tensor(widths, dtype=torch.int64)).reshape(-1).tolist()
    blocks = flat.split(sizes)
    out = []
    for g in range(n_groups):
        mine = [blocks[r * n_groups + g].view(-1, widths[g]) for r in range(world)]
        out.append(torch.cat(mine) if world > 1 else mine[0])
    return out


@dataclass
class Splits:
    """Who sends how many pairs to whom in one lookup.

    Attributes:
        send: int64 ``[W, G]`` (CPU): this rank's unique pairs per owner and group.
        recv: int64 ``[W, G]`` (CPU): pairs this rank owns, per requesting rank and group.
    """

    send: torch.Tensor
    recv: torch.Tensor

    def widths(self, widths: Sequence[int]) -> tuple[list[int], list[int]]:
        """Elements per rank ``(sent to each, received from each)`` of a requester ->
        owner message with ``widths[g]`` elements per pair of group ``g``."""
        w = torch.tensor(widths, dtype=torch.int64)
        return (self.send * w).sum(1).tolist(), (self.recv * w).sum(1).tolist()


class ShardExchange:
    """The collectives of the exchange over one shard group (and its replica group).

    Args:
        group: the shard group (``None``: the default group).
        device: where the messages live (CUDA for NCCL, CPU for gloo).
        replica_group: the ranks holding the same shard elsewhere, or None.
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        device: torch.device,
        replica_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        self.group = group
        self.device = device
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.replica_group = replica_group
        self.replicas = 1 if replica_group is None else dist.get_world_size(replica_group)
        self.replica_rank = 0 if replica_group is None else dist.get_rank(replica_group)
        # bytes this rank sent to its replica group (k = 1 sync), under ring collectives:
        # all_gather of m bytes per rank sends (P - 1) m, all_reduce of n sends 2 (P - 1) n / P
        self.replica_bytes = 0

    # -- requester <-> owner ---------------------------------------------------------
    def send_counts(self, send: torch.Tensor) -> Awaitable[Splits]:
        """Phase 1: pair counts ``send [W, G]`` to every owner; the result knows what
        every rank will send here."""
        if self.world == 1:
            return Awaitable.done(Splits(send.cpu(), send.cpu()))
        out = torch.empty_like(send, device=self.device)
        work = dist.all_to_all_single(
            out, send.to(self.device), group=self.group, async_op=True
        )
        return Awaitable([work], lambda: Splits(send.cpu(), out.cpu()))

    def send_to_owners(
        self, flat: torch.Tensor, splits: Splits, widths: Sequence[int]
    ) -> Awaitable[torch.Tensor]:
        """Requester -> owner: ``flat`` in owner-major block layout (``widths[g]``
        elements per pair of group ``g``); the result is what this rank owns, in
        requester-major block layout (keys in forward, gradients in backward)."""
        send, recv = splits.widths(widths)
        return self._all_to_all(flat, send, recv)

    def send_to_requesters(
        self, flat: torch.Tensor, splits: Splits, widths: Sequence[int]
    ) -> Awaitable[torch.Tensor]:
        """Owner -> requester, the reverse of :meth:`send_to_owners` (rows)."""
        send, recv = splits.widths(widths)
        return self._all_to_all(flat, recv, send)

    def _all_to_all(
        self, flat: torch.Tensor, send: list[int], recv: list[int]
    ) -> Awaitable[torch.Tensor]:
        out = flat.new_empty(sum(recv))
        if self.world == 1:
            out.copy_(flat)
            return Awaitable.done(out)
        work = dist.all_to_all_single(
            out, flat.contiguous(), recv, send, group=self.group, async_op=True
        )
        return Awaitable([work], lambda: out)

    # -- replicas --------------------------------------------------------------------
    def gather_replicas(
        self, packed: torch.Tensor, counts: torch.Tensor
    ) -> Awaitable[tuple[torch.Tensor, torch.Tensor]]:
        """All replicas' unique pairs, so that every replica can form the same union.

        Args:
            packed: int64 ``[V, C]`` this owner's pairs, groups one after the other.
            counts: int64 ``[G]`` pairs per group.
        Returns:
            ``(rows [P, V_max, C], counts [P, G])`` of every replica in replica rank
            order (rows padded to the largest ``V``).
        """
        group, n = self.replica_group, self.replicas
        mine = counts.to(self.device)
        all_counts = [torch.empty_like(mine) for _ in range(n)]
        dist.all_gather(all_counts, mine, group=group)
        per = torch.stack(all_counts).cpu()  # [P, G]
        v_max = int(per.sum(1).max())
        if v_max == 0:
            return Awaitable.done((packed.new_zeros(n, 0, packed.shape[1]), per))
        padded = packed.new_zeros(v_max, packed.shape[1])
        padded[: packed.shape[0]] = packed
        self.replica_bytes += (n - 1) * (
            padded.numel() * padded.element_size() + mine.numel() * mine.element_size()
        )
        rows = [torch.empty_like(padded) for _ in range(n)]
        work = dist.all_gather(rows, padded, group=group, async_op=True)
        return Awaitable([work], lambda: (torch.stack(rows), per))

    def reduce_replicas(self, flat: torch.Tensor) -> Awaitable[torch.Tensor]:
        """Sums ``flat`` (the owners' per-key gradients over the union) over the replica
        group, in place; every replica gets the same bits."""
        n = self.replicas
        self.replica_bytes += 2 * (n - 1) * flat.numel() * flat.element_size() // n
        work = dist.all_reduce(flat, group=self.replica_group, async_op=True)
        return Awaitable([work], lambda: flat)


def check_same_layout(
    groups: Sequence[Optional[dist.ProcessGroup]],
    device: torch.device,
    layout: Sequence[int],
    what: str,
    field: Callable[[int], str] = lambda i: f"value {i}",
) -> None:
    """Every rank reachable through ``groups`` must hold the same ``layout`` (small ints,
    e.g. the shard group's size and the table groups' widths).

    The layouts are gathered over the groups in turn, each stage passing on every layout
    the last one gathered (a shard group, then its replica group: every rank of a shard
    group x replica grid then holds every rank's layout). Nothing is raised between the
    stages, so every rank runs the same collectives and then raises the same error: no
    rank is left waiting in a collective another rank has left.

    Args:
        groups: the groups in order (``None``: the default group).
        device: where the messages live (CUDA for NCCL, CPU for gloo).
        layout: this rank's layout.
        what: what the layout describes (starts the error message).
        field: the name of the layout's value ``i`` (for the error message).
    Raises:
        ValueError: naming the ranks of each layout and the values that differ from the
            lowest rank's.
    """
    # one row per rank: [global rank, length, layout..., zero padding]
    rows = torch.tensor([[dist.get_rank(), len(layout), *layout]], dtype=torch.int64)
    for group in groups:
        n = dist.get_world_size(group)
        shape = torch.tensor(rows.shape, dtype=torch.int64, device=device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=group)
        padded = torch.zeros(*shape.tolist(), dtype=torch.int64)
        padded[:, 0] = -1  # rows of no rank
        padded[: rows.shape[0], : rows.shape[1]] = rows
        got = [torch.empty_like(padded, device=device) for _ in range(n)]
        dist.all_gather(got, padded.to(device), group=group)
        rows = torch.cat(got).cpu()
    seen = {int(r[0]): tuple(r[2 : 2 + int(r[1])].tolist()) for r in rows if r[0] >= 0}
    by_layout: dict[tuple[int, ...], list[int]] = {}
    for rank in sorted(seen):
        by_layout.setdefault(seen[rank], []).append(rank)
    if len(by_layout) == 1:
        return
    (ref, ref_ranks), *others = by_layout.items()
    parts = [f"{_ranks(ref_ranks)} have {list(ref)}"]
    for other, ranks in others:
        diff = _differences(ref, other, field)
        parts.append(f"{_ranks(ranks)} {'have' if len(ranks) > 1 else 'has'} "
                     f"{list(other)} ({diff})")
    raise ValueError(f"{what} differs between ranks: " + "; ".join(parts))


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {list(ranks)}"


def _differences(ref: Sequence[int], other: Sequence[int], field: Callable[[int], str]) -> str:
    """``field value vs ref_value, ...`` for the first few values that differ."""
    out = []
    for i in range(max(len(ref), len(other))):
        if i >= len(other):
            out.append(f"no {field(i)} (vs {ref[i]})")
        elif i >= len(ref):
            out.append(f"{field(i)} {other[i]} (vs none)")
        elif other[i] != ref[i]:
            out.append(f"{field(i)} {other[i]} vs {ref[i]}")
    shown = ", ".join(out[:6])
    return shown + (f", and {len(out) - 6} more" if len(out) > 6 else "")

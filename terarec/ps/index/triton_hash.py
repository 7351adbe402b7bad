"""Triton kernels for the device (HBM) hash tables: one thread per key, linear probing.

The tables are the ``[cap, 2]`` int64 (mixed key, value) layout of the ``fbgemm``
backend of :class:`~terarec.ps.index.hash_index.HashIndex` and
:class:`~terarec.ps.index.key_map.KeyMap`:
a bucket is empty while its key word is -1, keys are ``mix64`` of the user's ids (so the
home bucket is just the low bits), and the one key whose mix is -1 lives on the side
(callers handle it; the kernels treat it as absent).

Two kernels, each a single launch for the whole batch (no per-round host syncs):

* :func:`probe` finds each key: its value (-1 if absent), and the bucket holding it
  (or the empty bucket that ends its chain).
* :func:`probe_or_claim` finds each key or claims an empty bucket for it with an atomic
  compare-and-swap on the key word; the caller writes the values of claimed buckets.
  Keys must be unique (two lanes never claim for the same key).

``atomic_cas`` has no mask, so lanes that must not claim issue ``cas(ptr, k, k)``: a
no-op whatever the bucket holds. Under ``TRITON_INTERPRET=1`` the same kernels run on
CPU tensors (the tests do that); production CPU tables use FBGEMM's kernels.
"""

from __future__ import annotations

import torch

from terarec.optim.triton_rows import available, tl, triton  # one optional-triton switch

__all__ = ["available", "probe", "probe_or_claim"]

_BLOCK = 256


if triton is not None:

    @triton.jit
    def _probe_kernel(
        keys_ptr,
        table_ptr,
        val_ptr,
        bucket_ptr,
        new_ptr,
        n,
        mask,
        CLAIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        k = tl.load(keys_ptr + offs, mask=live, other=-1)
        active = live & (k != -1)  # the -1 key is the caller's (empty marker)
        pos = k & mask
        val = tl.full([BLOCK], -1, tl.int64)
        bucket = tl.full([BLOCK], -1, tl.int64)
        new = tl.zeros([BLOCK], tl.int8)
        left = tl.sum(active.to(tl.int32), axis=0)
        while left > 0:
            cur = tl.load(table_ptr + 2 * pos, mask=active, other=0)
            empty = active & (cur == -1)
            if CLAIM:
                old = tl.atomic_cas(table_ptr + 2 * pos, tl.where(empty, -1, k), k)
                won = empty & (old == -1)
                cur = tl.where(empty & ~won, old, cur)  # lost the race: see the winner
                hit = active & (cur == k) & ~won
                new = tl.where(won, 1, new)
                done = hit | won
                stop = done
            else:
                hit = active & (cur == k)
                done = hit | empty
                stop = done
            v = tl.load(table_ptr + 2 * pos + 1, mask=hit, other=-1)
            val = tl.where(hit, v, val)
            bucket = tl.where(done, pos, bucket)
            pos = tl.where(active & ~stop, (pos + 1) & mask, pos)
            active = active & ~stop
            left = tl.sum(active.to(tl.int32), axis=0)
        tl.store(val_ptr + offs, val, mask=live)
        tl.store(bucket_ptr + offs, bucket, mask=live)
        tl.store(new_ptr + offs, new, mask=live)


def _launch(
    mixed: torch.Tensor, table: torch.Tensor, claim: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = mixed.numel()
    val = torch.empty(n, dtype=torch.int64, device=mixed.device)
    bucket = torch.empty(n, dtype=torch.int64, device=mixed.device)
    new = torch.empty(n, dtype=torch.int8, device=mixed.device)
    if n:
        cap = table.shape[0]
        grid = (triton.cdiv(n, _BLOCK),)
        _probe_kernel[grid](
            mixed.contiguous(), table, val, bucket, new, n, cap - 1, CLAIM=claim, BLOCK=_BLOCK
        )
    return val, bucket, new.bool()


def probe(mixed: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Looks up mixed keys.

    Args:
        mixed: int64 ``[N]`` mixed keys (duplicates allowed; -1 reads as absent).
        table: int64 ``[cap, 2]`` (key, value), ``cap`` a power of two, never full.
    Returns:
        ``(value [N], bucket [N])``: the stored value (-1 where absent) and the bucket
        holding the key or ending its probe chain (-1 for the key -1).
    """
    val, bucket, _ = _launch(mixed, table, claim=False)
    return val, bucket


def probe_or_claim(
    mixed: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Finds unique mixed keys, claiming an empty bucket (key word set) for absent ones.

    Args:
        mixed: int64 ``[N]`` unique mixed keys (the key -1 is skipped: bucket -1).
        table: int64 ``[cap, 2]``; must have more empty buckets than ``N``.
    Returns:
        ``(value [N], bucket [N], claimed [N] bool)``: claimed buckets have value -1
        until the caller writes ``table[bucket, 1]``.
    """
    return _launch(mixed, table, claim=True)

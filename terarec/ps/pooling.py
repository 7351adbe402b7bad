"""Pooling of a batch's bags over the unique rows it gathered, and the dedup behind it.

One forward of a table group (``HierarchicalEmbeddingBagCollection``)::

    values [N] --dedup (table, key)--> keys [U], inverse [N], order [N]
    rows of the keys [U, D] --Pool--> pooled [B, F*D]   (sum, mean, or weighted sum)
    backward: one summed gradient per unique key [U, D]

:class:`Pool` is an autograd function whose backward is itself an ``embedding_bag``
over the bag gradients (no scatter, no second sort); :func:`dedup` makes the unique
keys (pairs of several tables) with a stable sort, so a key's gradient sums its
occurrences in the same order whatever the group layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["Dedup", "Pool", "batch_major_order", "batch_major_pays", "dedup", "kjt_offsets"]


@dataclass
class Dedup:
    """Unique keys of a flat value list and the maps between the two.

    For ``values = [7, 3, 7]``: ``keys = [3, 7]``, ``inverse = [1, 0, 1]`` (value ->
    unique key), ``order = [1, 0, 2]`` (values grouped by key), ``key_offsets = [0, 1, 3]``.
    With several tables, a unique entry is a ``(table, key)`` pair and ``tables`` holds
    each pair's table.
    """

    keys: torch.Tensor  # [U] sorted
    tables: torch.Tensor  # [U]
    inverse: torch.Tensor  # [N]
    order: torch.Tensor  # [N]
    key_offsets: torch.Tensor  # [U + 1]


def dedup(values: torch.Tensor, tables: Optional[torch.Tensor] = None) -> Dedup:
    """Dedup of ``values`` ``[N]``, or of ``(tables, values)`` pairs when ``tables`` is
    given. Pairs need one stable sort: ``tables`` must be non-decreasing along the input
    (values laid out table by table), so equal values stay ordered by table. The sort is
    stable either way: a key's occurrences keep their order, so its gradient sums them in
    the same order whether its table trains alone or in a group (bitwise equal results;
    a stable sort costs what an unstable one does here, CPU and CUDA)."""
    n = values.numel()
    if tables is None:
        sorted_vals, order = torch.sort(values, stable=True)
        keys, counts = torch.unique_consecutive(sorted_vals, return_counts=True)
        key_tables = torch.zeros(keys.numel(), dtype=torch.int64, device=values.device)
        key_offsets = torch.zeros(keys.numel() + 1, dtype=torch.int64, device=values.device)
        torch.cumsum(counts, 0, out=key_offsets[1:])
    else:
        sorted_vals, order = torch.sort(values, stable=True)
        sorted_tab = tables[order]
        starts = torch.ones(n, dtype=torch.bool, device=values.device)
        if n > 1:
            starts[1:] = (sorted_vals[1:] != sorted_vals[:-1]) | (
                sorted_tab[1:] != sorted_tab[:-1]
            )
        first = starts.nonzero().squeeze(1)
        keys, key_tables = sorted_vals[first], sorted_tab[first]
        key_offsets = torch.cat([first, torch.tensor([n], device=values.device)])
        counts = key_offsets[1:] - key_offsets[:-1]
    inverse = torch.empty_like(order)
    inverse[order] = torch.repeat_interleave(
        torch.arange(keys.numel(), device=values.device), counts, output_size=n
    )
    return Dedup(keys, key_tables, inverse, order, key_offsets)


def kjt_offsets(kjt: KeyedJaggedTensor) -> torch.Tensor:
    """The KJT's value offsets ``[F*B + 1]``; computed with torch when it only has
    lengths (torchrec would call FBGEMM's CUDA cumsum, which GPU runs need not have)."""
    offsets = kjt.offsets_or_none()
    if offsets is not None:
        return offsets
    lengths = kjt.lengths()
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


class Pool(torch.autograd.Function):
    """Bag pooling over the gathered unique rows, with a sort-free backward, straight
    into the batch-major layout ``[B, F*D]`` the model consumes.

    The KJT's bags are feature-major (bag ``f*B + b``); pooling them in that order and
    transposing ``[F, B, D] -> [B, F, D]`` costs two full copies of the pooled output
    (forward and backward). Instead the values are visited bag by bag in batch-major
    order (``b*F + f``: a gather of the ``[N]`` int64 value indices), so
    ``embedding_bag`` writes ``[B*F, D] = [B, F*D]`` directly; each bag sums the same
    values in the same order, so the result is bitwise the transposed one. (On CUDA;
    see :func:`batch_major_pays`.)

    The gradient of unique row ``u`` is the sum of the bag gradients of every value that
    maps to ``u``. With the values already grouped by key (``Dedup.order``), that is
    itself an ``embedding_bag`` over the bag gradients: one bag per unique key. It gives
    the fused row optimizer exactly what it needs (one summed gradient per key) without
    ``embedding_bag``'s dense backward, which sorts again and scatters.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        weights: torch.Tensor,
        dedup: Dedup,
        offsets: torch.Tensor,
        mean: bool,
        n_feat: int,
        batch: int,
        value_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """weights ``[U, D]``, offsets ``[F*B + 1]`` into the feature-major values,
        ``value_weights`` (a weighted KJT's per-value weights ``[N]``, sum pooling;
        constants: no gradient flows to them) -> pooled ``[B, F*D]``."""
        mode = "mean" if mean else "sum"
        dim = weights.shape[1]
        reorder = n_feat > 1 and batch > 1 and batch_major_pays(weights)
        ctx.dedup = dedup
        ctx.save_for_backward(offsets, value_weights)
        ctx.mean = mean
        ctx.shape = (n_feat, batch, reorder)
        index, bag_offsets, psw = dedup.inverse, offsets, value_weights
        if reorder:
            pos, bag_offsets = batch_major_order(offsets, n_feat, batch, index.numel())
            index = index[pos]
            psw = None if psw is None else psw[pos]
        out = F.embedding_bag(index, weights, bag_offsets, mode=mode, include_last_offset=True,
                              per_sample_weights=psw)
        if reorder:
            return out.view(batch, n_feat * dim)
        return out.view(n_feat, batch, dim).transpose(0, 1).reshape(batch, n_feat * dim)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        offsets, value_weights = ctx.saved_tensors
        d: Dedup = ctx.dedup
        n_feat, batch, reorder = ctx.shape
        lengths = offsets[1:] - offsets[:-1]
        bag_of_value = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=lengths.device),
            lengths,
            output_size=d.inverse.numel(),
        )
        bag_sorted = bag_of_value[d.order]  # feature-major bag of each key-sorted value
        psw = None
        if ctx.mean:
            psw = (1.0 / lengths.clamp(min=1).to(grad_out.dtype))[bag_sorted]
        elif value_weights is not None:
            psw = value_weights[d.order].to(grad_out.dtype)
        dim = grad_out.shape[1] // max(n_feat, 1)
        if reorder:  # the bag's row in the batch-major gradient: f*B + b -> b*F + f
            bag_sorted = (bag_sorted % batch) * n_feat + bag_sorted // batch
            grad_bags = grad_out.contiguous().view(-1, dim)
        else:  # [B, F*D] -> feature-major bags [F*B, D]
            grad_bags = grad_out.view(batch, n_feat, dim).transpose(0, 1).reshape(-1, dim)
        grad_w = F.embedding_bag(
            bag_sorted,
            grad_bags,
            d.key_offsets,
            mode="sum",
            per_sample_weights=psw,
            include_last_offset=True,
        )
        return grad_w, None, None, None, None, None, None


def batch_major_pays(weights: torch.Tensor) -> bool:
    """Pool in batch-major order on CUDA, where the two transposes it saves are ~1 ms of
    a ~4 ms step (H100, 16384 x 26 ids, dim 128); on CPU the reorder of the value
    indices costs about what the transposes do (A/B within noise), so the CPU path keeps
    the transpose. Both give bitwise the same result (tests force each path)."""
    return weights.is_cuda


def batch_major_order(
    offsets: torch.Tensor, n_feat: int, batch: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature-major bags -> batch-major bags.

    Args:
        offsets: ``[F*B + 1]`` bag offsets into the ``N = n`` values (feature-major bags).
    Returns:
        the positions ``[N]`` that reorder the values bag by bag into batch-major order
        (``values[pos]``), and the new bag offsets ``[B*F + 1]``.
    """
    lengths = (offsets[1:] - offsets[:-1]).view(n_feat, batch).t().reshape(-1)
    starts = offsets[:-1].view(n_feat, batch).t().reshape(-1)
    new_offsets = torch.zeros_like(offsets)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    shift = torch.repeat_interleave(starts - new_offsets[:-1], lengths, output_size=n)
    return torch.arange(n, device=offsets.device) + shift, new_offsets

"""Feature layout of a batch: torch-only operations on ``KeyedJaggedTensor``."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["permute_features"]


def permute_features(kjt: KeyedJaggedTensor, perm: list[int]) -> KeyedJaggedTensor:
    """``kjt.permute(perm)`` in torch ops: FBGEMM's permute kernel exists only in its
    CUDA build, and a GPU run with the CPU wheel of FBGEMM must work too. The result
    carries its offsets and per-key sizes, so no later step computes them on the device
    (``length_per_key`` is read from ``kjt``: cached when the batch was made on the host,
    else one sync).

    Args:
        kjt: ``F`` keys, stride ``B``; values laid out key by key.
        perm: the new order, ``F`` indices into ``kjt.keys()``.
    """
    keys, b = kjt.keys(), kjt.stride()
    per_key = kjt.length_per_key()
    starts = [0]
    for n in per_key:
        starts.append(starts[-1] + n)
    dev = kjt.values().device
    idx = torch.cat([torch.arange(starts[p], starts[p + 1], device=dev) for p in perm])
    lengths = kjt.lengths().view(len(keys), b)[perm].reshape(-1)
    offsets = torch.zeros(lengths.numel() + 1, dtype=lengths.dtype, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    new_per_key = [per_key[p] for p in perm]
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(
        keys=[keys[p] for p in perm],
        values=kjt.values()[idx],
        weights=None if weights is None else weights[idx],
        lengths=lengths,
        offsets=offsets,
        stride=b,
        length_per_key=new_per_key,
        offset_per_key=[0] + [sum(new_per_key[: i + 1]) for i in range(len(perm))],
    )

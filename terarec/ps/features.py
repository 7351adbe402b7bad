"""Feature layout of a batch: torch-only operations on ``KeyedJaggedTensor``."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["expand_variable_batch", "permute_features"]


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


def expand_variable_batch(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """A variable-batch KJT (VBE: each key has its own number of bags,
    ``stride_per_key()``, and ``inverse_indices()`` maps the ``B`` samples to them) as
    a regular KJT of stride ``B``: sample ``b`` of key ``f`` gets a copy of bag
    ``inverse[f, b]``. Pooling it gives what TorchRec's ``EmbeddingBagCollection``
    gives for the VBE KJT (pooled per bag, then expanded by the inverse indices); each
    row's gradient sums over the copies, as autograd does through that expansion.

    Raises:
        ValueError: the KJT has no inverse indices, or they name other keys.
    """
    inv = kjt.inverse_indices_or_none()
    keys = kjt.keys()
    if inv is None:
        raise ValueError("a variable-batch (VBE) KJT needs inverse_indices to map its "
                         "bags to the batch's samples")
    if list(inv[0]) != list(keys):
        raise ValueError(f"VBE KJT: inverse_indices name keys {list(inv[0])}, the KJT has "
                         f"{list(keys)}")
    idx = inv[1].to(torch.int64)  # [F, B]
    strides = kjt.stride_per_key()
    dev = kjt.values().device
    lengths = kjt.lengths().to(torch.int64)
    first_bag = torch.tensor([0] + strides, device=dev).cumsum(0)[:-1]  # [F]
    bags = (idx.to(dev) + first_bag[:, None]).reshape(-1)  # [F*B] feature-major
    starts = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=dev)
    torch.cumsum(lengths, 0, out=starts[1:])
    new_lengths = lengths[bags]
    n = int(new_lengths.sum())
    new_offsets = torch.zeros(new_lengths.numel() + 1, dtype=torch.int64, device=dev)
    torch.cumsum(new_lengths, 0, out=new_offsets[1:])
    shift = torch.repeat_interleave(starts[bags] - new_offsets[:-1], new_lengths,
                                    output_size=n)
    pos = torch.arange(n, device=dev) + shift
    weights = kjt.weights_or_none()
    b = idx.shape[1]
    per_key = new_lengths.view(len(keys), b).sum(1).tolist()
    return KeyedJaggedTensor(
        keys=list(keys),
        values=kjt.values()[pos],
        weights=None if weights is None else weights[pos],
        lengths=new_lengths.to(kjt.lengths().dtype),
        offsets=new_offsets,
        stride=b,
        length_per_key=per_key,
        offset_per_key=[0] + [sum(per_key[: i + 1]) for i in range(len(keys))],
    )

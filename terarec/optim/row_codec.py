"""How the rows' deltas travel in a k-step merge (``sync.sparse_dtype``, docs/kstep.md).

A merge all-gathers, per replica, one message per touched row: its key and the change
of the merged columns since the last merge (the weights; with ``delta+m`` Adam's first
moment after them; with ``delta+moments`` all the optimizer state). :class:`RowCodec`
turns those deltas ``[n, cols]`` float32 into bytes ``[n, nbytes]`` uint8 and back:

=========  =============================================  ==========================
dtype      weights' delta (and ``delta+m``'s first        other optimizer state's
           moment: ``int8_cols`` leading columns)         delta
=========  =============================================  ==========================
``fp32``   float32 (exact)                                float32
``bf16``   bfloat16 (round to nearest even)               bfloat16
``fp16``   float16 (an error on overflow)                 float16
``int8``   int8, symmetric absmax per block of ``dim``    bfloat16
           columns: ``q = round(x / s)``, ``s = max|x|
           / 127`` rounded up to bfloat16 (2 bytes),
           ``x ~ q * s``
=========  =============================================  ==========================

Per row of dim 16: 64 bytes (fp32), 32 (bf16/fp16), 18 (int8); ``delta+m`` as int8: 36
(two blocks, a scale each: the first moment is far smaller than the weights' change).
The int8 scale is stored as bfloat16 rounded *up* (so ``|x / s| <= 127``, no clipping):
an fp32 scale would make it 20 bytes, ~1/7 of the message, for a precision (2^-8
relative) that the int8 step (1/254 of the block's largest change) does not use.
Adam's second moment (and Adagrad's accumulator) is never int8: it spans orders of
magnitude within a row, so a per-row absmax step would round its small entries to zero
or below, and ``m / (sqrt(v) + eps)`` would explode there; bfloat16 keeps a relative
precision per entry and the exponent range of float32. The first moment is signed and
scaled like the gradients, as the weights' change is: int8 with its own scale suits it.

Every replica decodes the same gathered bytes with the same ops, so the merged rows
stay identical everywhere; a sender uses the decoded (not its exact) delta too.

Example::

    codec = RowCodec(WireDtype.INT8, cols=16, dim=16)   # codec.nbytes == 18
    wire = codec.encode(delta)                          # [n, 18] uint8
    delta_hat = codec.decode(wire)                      # [n, 16] float32
    RowCodec(WireDtype.INT8, cols=32, dim=16, int8_cols=32).nbytes   # delta+m: 36
"""

from __future__ import annotations

import torch

from terarec.config import WireDtype

_HALF = {WireDtype.BF16: torch.bfloat16, WireDtype.FP16: torch.float16}


class RowCodec:
    """Encodes ``[n, cols]`` float32 row deltas as ``[n, nbytes]`` uint8 (see module).

    Args:
        dtype: the wire format.
        cols: merged columns per row (``dim`` for ``delta``, ``2 dim`` for ``delta+m``,
            the whole row for ``delta+moments``).
        dim: the embedding dim: the first ``dim`` columns are the weights.
        int8_cols: with ``int8``, the leading columns quantised (blocks of ``dim``, a
            scale each: the weights, and with ``delta+m`` Adam's first moment); the
            rest travel as bfloat16. Default (0): ``dim``.
    """

    def __init__(self, dtype: WireDtype, cols: int, dim: int, int8_cols: int = 0) -> None:
        int8_cols = int8_cols or dim
        if not 0 < dim <= cols:
            raise ValueError(f"RowCodec: need 0 < dim <= cols, got dim {dim}, cols {cols}")
        if int8_cols % dim or not dim <= int8_cols <= cols:
            raise ValueError(
                f"RowCodec: int8_cols must be a multiple of dim {dim} in [dim, {cols}], "
                f"got {int8_cols}"
            )
        self.dtype = WireDtype(dtype)
        self.cols = cols
        self.dim = dim
        self.int8_cols = int8_cols

    @property
    def nbytes(self) -> int:
        """Bytes per row on the wire."""
        if self.dtype == WireDtype.FP32:
            return 4 * self.cols
        if self.dtype == WireDtype.INT8:
            q = self.int8_cols
            return q + 2 * (q // self.dim) + 2 * (self.cols - q)
        return 2 * self.cols

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, cols]`` float32 -> ``[n, nbytes]`` uint8."""
        x = x.to(torch.float32)
        if self.dtype == WireDtype.FP32:
            return _bytes(x)
        if self.dtype in _HALF:
            return _bytes(_to_half(x, _HALF[self.dtype]))
        n, q, d = x.shape[0], self.int8_cols, self.dim
        w = x[:, :q].reshape(n, q // d, d)  # blocks of dim columns, a scale each
        scale = _round_up_bf16(w.abs().amax(dim=2, keepdim=True) / 127.0)
        qw = torch.where(scale > 0, w / scale, torch.zeros_like(w))
        qw = qw.round_().clamp_(-127, 127).to(torch.int8).reshape(n, q)
        parts = [_bytes(qw), _bytes(scale.reshape(n, q // d).to(torch.bfloat16))]
        if self.cols > q:
            parts.append(_bytes(_to_half(x[:, q:], torch.bfloat16)))
        return torch.cat(parts, dim=1)

    def decode(self, b: torch.Tensor) -> torch.Tensor:
        """``[n, nbytes]`` uint8 -> ``[n, cols]`` float32 (the same on every replica)."""
        if b.shape[1] != self.nbytes:
            raise ValueError(f"RowCodec: expected {self.nbytes} bytes per row, got {b.shape[1]}")
        b = b.contiguous()
        if self.dtype == WireDtype.FP32:
            return b.view(torch.float32).clone()
        if self.dtype in _HALF:
            return b.view(_HALF[self.dtype]).to(torch.float32)
        n, q, d = b.shape[0], self.int8_cols, self.dim
        blocks = q // d
        qw = b[:, :q].contiguous().view(torch.int8).to(torch.float32).reshape(n, blocks, d)
        scale = bytes_as(b[:, q : q + 2 * blocks], torch.bfloat16).to(torch.float32)
        w = (qw * scale.unsqueeze(2)).reshape(n, q)
        if self.cols == q:
            return w
        state = bytes_as(b[:, q + 2 * blocks :], torch.bfloat16).to(torch.float32)
        return torch.cat([w, state], dim=1)


def bytes_as(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``b [n, c]`` (any slice) reinterpreted as ``dtype`` ``[n, c / itemsize]``: a
    fresh contiguous copy first (a slice's offset or row stride need not be a multiple
    of the item size)."""
    return b.clone(memory_format=torch.contiguous_format).view(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A ``[n, c]`` tensor's bytes as ``[n, c * itemsize]`` uint8 (native byte order:
    every replica of a cluster runs on the same architecture)."""
    n, c = t.shape
    return t.contiguous().view(torch.uint8).view(n, c * t.element_size())  # n may be 0


def _to_half(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    h = x.to(dtype)
    if dtype == torch.float16 and bool(torch.isinf(h).any()) and not bool(torch.isinf(x).any()):
        raise ValueError(
            "k-step merge: a row delta exceeds the float16 range (65504); use "
            "sync.sparse_dtype: bf16"
        )
    return h


def _round_up_bf16(s: torch.Tensor) -> torch.Tensor:
    """Non-negative finite float32 -> the nearest bfloat16 value >= it (as float32):
    add 0xFFFF to the bits and drop the low 16 (no overflow: s < 2^128)."""
    bits = s.contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)

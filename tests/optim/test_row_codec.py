"""The wire formats of k-step row deltas (``optim/row_codec.py``) against plain torch."""

from __future__ import annotations

import pytest
import torch

from terarec.config import WireDtype
from terarec.optim.row_codec import RowCodec


def _round_up_bf16(s: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value >= s, by torch's own rounding and nextafter."""
    b = s.to(torch.bfloat16)
    up = torch.nextafter(b, torch.full_like(b, float("inf")))
    return torch.where(b.float() < s, up, b).float()


def _deltas(n: int = 64, cols: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) * torch.logspace(-6, -1, n).unsqueeze(1)
    x[3] = 0.0  # an untouched-looking row: scale 0
    return x


@pytest.mark.parametrize("dtype, cols, nbytes", [
    ("fp32", 16, 64), ("bf16", 16, 32), ("fp16", 16, 32), ("int8", 16, 18),
    ("fp32", 48, 192), ("bf16", 48, 96), ("int8", 48, 16 + 2 + 64),
])
def test_bytes_per_row(dtype: str, cols: int, nbytes: int) -> None:
    codec = RowCodec(WireDtype(dtype), cols=cols, dim=16)
    assert codec.nbytes == nbytes
    wire = codec.encode(_deltas(cols=cols))
    assert wire.dtype == torch.uint8 and wire.shape == (64, nbytes)


def test_fp32_is_exact() -> None:
    x = _deltas()
    codec = RowCodec(WireDtype.FP32, cols=48, dim=16)
    assert torch.equal(codec.decode(codec.encode(x)), x)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16),
                                                 ("fp16", torch.float16)])
def test_half_formats_are_a_plain_cast(dtype: str, torch_dtype: torch.dtype) -> None:
    x = _deltas()
    codec = RowCodec(WireDtype(dtype), cols=48, dim=16)
    assert torch.equal(codec.decode(codec.encode(x)), x.to(torch_dtype).float())


def test_fp16_overflow_is_an_error() -> None:
    x = torch.zeros(2, 4)
    x[1, 2] = 1e5
    with pytest.raises(ValueError, match="float16 range.*bf16"):
        RowCodec(WireDtype.FP16, cols=4, dim=4).encode(x)


def test_int8_is_absmax_per_row_with_a_bf16_scale_and_bf16_state() -> None:
    x = _deltas()
    d = 16
    codec = RowCodec(WireDtype.INT8, cols=48, dim=d)
    y = codec.decode(codec.encode(x))
    # the hand-computed quantisation of the weights' delta
    absmax = x[:, :d].abs().amax(dim=1, keepdim=True)
    scale = absmax / 127
    s_bf = _round_up_bf16(scale)
    assert bool((s_bf >= scale).all()) and bool((s_bf <= scale * (1 + 2.0**-7)).all())
    q = torch.where(s_bf > 0, x[:, :d] / s_bf, torch.zeros_like(x[:, :d])).round()
    assert bool((q.abs() <= 127).all())  # ... so nothing is clipped
    assert torch.equal(y[:, :d], q * s_bf)
    assert bool(((y[:, :d] - x[:, :d]).abs() <= s_bf / 2 + 1e-12).all())
    assert torch.equal(y[3], torch.zeros(48))  # scale 0: exactly zero
    # the largest entry of every row is reproduced to the scale's rounding
    top = x[:, :d].abs().argmax(dim=1)
    rows = torch.arange(64)
    assert bool(((y[rows, top] - x[rows, top]).abs() <= x[rows, top].abs() * 2.0**-7).all())
    # the optimizer state travels as bf16: small entries keep their relative precision
    assert torch.equal(y[:, d:], x[:, d:].to(torch.bfloat16).float())


def test_int8_weights_only_row() -> None:
    x = torch.tensor([[0.5, -0.25, 0.125, 0.0]])
    codec = RowCodec(WireDtype.INT8, cols=4, dim=4)
    y = codec.decode(codec.encode(x))
    s_bf = _round_up_bf16(torch.tensor(0.5) / 127)
    assert torch.equal(y, torch.round(x / s_bf) * s_bf)
    assert y[0, 0].item() == pytest.approx(0.5, rel=2.0**-7)


def test_decode_checks_the_width() -> None:
    with pytest.raises(ValueError, match="expected 18 bytes per row"):
        RowCodec(WireDtype.INT8, cols=16, dim=16).decode(torch.zeros(2, 20, dtype=torch.uint8))


def test_int8_blocks_weights_and_first_moment() -> None:
    """``delta+m``: the weights and Adam's first moment each quantised with their own
    scale (the first moment is ~100x smaller than the weights' change here: one shared
    scale would round it to zero), the second moment as bfloat16."""
    dim = 16
    x = _deltas(cols=3 * dim)
    x[:, dim : 2 * dim] *= 0.01
    codec = RowCodec(WireDtype.INT8, 3 * dim, dim, int8_cols=2 * dim)
    assert codec.nbytes == 2 * (dim + 2) + 2 * dim
    got = codec.decode(codec.encode(x))
    for b in (0, dim):
        blk = x[:, b : b + dim]
        s = _round_up_bf16(blk.abs().amax(dim=1, keepdim=True) / 127)
        q = torch.where(s > 0, torch.round(blk / s), torch.zeros_like(blk))
        assert torch.equal(got[:, b : b + dim], q * s)
        assert bool(((got[:, b : b + dim] - blk).abs() <= s / 2 + 1e-12).all())
    assert torch.equal(got[:, 2 * dim :], x[:, 2 * dim :].to(torch.bfloat16).float())
    assert bool((got[:, dim : 2 * dim] != 0).any(dim=1)[x[:, dim] != 0].all())
    with pytest.raises(ValueError, match="int8_cols must be a multiple of dim 16"):
        RowCodec(WireDtype.INT8, 3 * dim, dim, int8_cols=20)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_no_rows(dtype: str) -> None:
    """A replica that trained no rows sends an empty message."""
    codec = RowCodec(WireDtype(dtype), 48, 16)
    wire = codec.encode(torch.empty(0, 48))
    assert wire.shape == (0, codec.nbytes) and wire.dtype == torch.uint8
    assert codec.decode(wire).shape == (0, 48)

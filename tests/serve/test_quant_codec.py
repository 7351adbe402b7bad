"""The torch int8 row codec (where FBGEMM has no kernel) against FBGEMM's fused 8-bit
row-wise ops: the same scales and biases, codes equal but at rounding ties; dequantize
within the rounding of one float32 multiply-add (FBGEMM may fuse it)."""

from __future__ import annotations

import pytest
import torch

from terarec.serve.quant import _fbgemm, dequantize, quantize

EPS = torch.finfo(torch.float32).eps


@pytest.mark.numerics
@pytest.mark.parametrize("dim", [1, 4, 16, 33, 130])
def test_torch_int8_codec_matches_fbgemm(dim: int) -> None:
    if _fbgemm("FloatToFused8BitRowwiseQuantized") is None:
        pytest.skip("FBGEMM's CPU ops are not loadable here")
    g = torch.Generator().manual_seed(dim)
    rows = torch.randn(500, dim, generator=g) * torch.logspace(-3, 2, 500).unsqueeze(1)
    rows[:5] = 0.25  # constant rows: scale 0
    rows[5:10] -= 40.0  # all-negative rows
    ours, theirs = quantize(rows, "int8", use_fbgemm=False), quantize(rows, "int8")
    assert torch.equal(ours[:, dim:], theirs[:, dim:])  # scale and bias: the same bits
    # a code may differ by one where (w - bias) / scale lands on a rounding tie (the two
    # compute it with another float32 rounding)
    diff = ours[:, :dim].int() - theirs[:, :dim].int()
    assert diff.abs().max() <= 1
    scale = ours[:, dim:].contiguous().view(torch.float32)[:, :1].double()
    exact = (rows.double() - ours[:, dim:].contiguous().view(torch.float32)[:, 1:].double()
             ) / scale.where(scale > 0, torch.ones_like(scale))
    tie = ((exact - exact.floor()) - 0.5).abs() <= 255 * 8 * EPS  # codes up to 255, a few roundings
    assert (tie | (diff == 0)).all()
    a, b = dequantize(ours, "int8", dim, use_fbgemm=False), dequantize(ours, "int8", dim)
    tail = ours[:, dim:].contiguous().view(torch.float32).double()
    product = ours[:, :dim].double() * tail[:, :1]
    # w = code * scale + bias, rounded once (fused) or twice: at most one float32
    # rounding of the product and one of the sum apart
    bound = EPS * (product.abs() + b.double().abs())
    assert ((a.double() - b.double()).abs() <= bound).all()
    # and both decode each row within half a step (scale / 2) of the original
    half_step = tail[:, :1] / 2 + EPS * rows.abs().double()
    assert ((b.double() - rows.double()).abs() <= half_step + bound).all()

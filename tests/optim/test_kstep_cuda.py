"""The k-step merge's messages on CUDA are the CPU's, byte for byte (a replica on a GPU
and one on a CPU decode the same rows), and the bf16 dense merge runs on CUDA tensors.

Skips without CUDA (CI); run on a GPU machine:
``python -m pytest tests/optim/test_kstep_cuda.py`` (passed on an H100, 2026-11-23).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from terarec.config import SyncConfig, WireDtype
from terarec.optim.kstep import KStepMerger, _decode_rows, _encode_rows, _split_known
from terarec.optim.row_codec import RowCodec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", list(WireDtype))
def test_messages_on_cuda_equal_the_cpu_ones(dtype: WireDtype) -> None:
    g = torch.Generator().manual_seed(0)
    prev = torch.unique(torch.randint(0, 1 << 40, (5000,), generator=g))
    prev_t = torch.zeros_like(prev)
    comp = torch.cat([prev[torch.randperm(prev.numel(), generator=g)[:3000]],
                      torch.randint(1 << 41, 1 << 42, (500,), generator=g)])
    tables = torch.zeros_like(comp)
    codec = RowCodec(dtype, 48, 16, 32 if dtype == WireDtype.INT8 else 0)
    delta = torch.randn(comp.numel(), 48, generator=g) * 1e-3
    outs = []
    for dev in ("cpu", "cuda"):
        c, t, p, pt, x = (v.to(dev) for v in (comp, tables, prev, prev_t, delta))
        known, order = _split_known(c, t, p, pt)
        msg, nk = _encode_rows(codec, x[order], c[order], t[order], known, p, False)
        keys, _, got = _decode_rows(codec, msg, (nk, c.numel() - max(nk, 0)), p, pt, False)
        outs.append((msg.cpu(), keys.cpu(), got.cpu(), nk))
    (m0, k0, g0, n0), (m1, k1, g1, n1) = outs
    assert n0 == n1 == 3000
    assert torch.equal(m0, m1) and torch.equal(k0, k1) and torch.equal(g0, g1)


def test_bf16_dense_merge_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import terarec.optim.kstep as kstep

    sent: list[torch.Tensor] = []

    def all_reduce(t: torch.Tensor, group: Any = None) -> None:
        sent.append(t.clone())
        t.mul_(2)  # two identical replicas

    monkeypatch.setattr(kstep.dist, "all_reduce", all_reduce)
    w = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    m = KStepMerger(SyncConfig(k=2, dense_dtype="bf16"), [w], torch.optim.SGD([w], lr=1.0),
                    [], None, 2)
    anchor = w.detach().clone()
    with torch.no_grad():
        w.add_(torch.randn(1000, device="cuda") * 1e-3)
    exact = w.detach() - anchor
    m.merge()
    assert sent[-1].is_cuda and torch.equal(sent[-1], exact.to(torch.bfloat16))
    assert torch.equal(m._residual, exact - exact.to(torch.bfloat16).float())
    assert torch.equal(w.detach(), anchor + exact.to(torch.bfloat16).float())

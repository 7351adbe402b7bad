"""Bag pooling straight into the batch-major layout (the CUDA path) equals the
transpose path (the CPU path) bitwise: forward values, row gradients, trained rows."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import Pooling, SparseOptimConfig, TableConfig
from terarec.ps import embedding as emb
from terarec.ps import pooling


def _kjt(batch: int, feats: list[str], seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(feats) * batch,), generator=g)  # empty bags too
    ids = torch.randint(0, 40, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(feats, ids, lengths)


@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
def test_batch_major_values_matches_transpose(mode: str) -> None:
    feats = ["a", "b", "c"]
    kjt = _kjt(5, feats, 0)
    dedup = pooling.dedup(kjt.values())
    offsets = pooling.kjt_offsets(kjt)
    vw = torch.rand(kjt.values().numel()) if mode == "weighted" else None
    weights = torch.randn(dedup.keys.numel(), 4)
    out, grads = {}, {}
    for reorder in (False, True):
        w = weights.clone().requires_grad_(True)
        orig = pooling.batch_major_pays
        pooling.batch_major_pays = lambda _w, r=reorder: r  # type: ignore[assignment]
        try:
            pooled = pooling.Pool.apply(w, dedup, offsets, mode == "mean", len(feats), 5, vw)
            pooled.backward(torch.arange(pooled.numel(), dtype=torch.float32).view_as(pooled))
        finally:
            pooling.batch_major_pays = orig  # type: ignore[assignment]
        out[reorder], grads[reorder] = pooled.detach(), w.grad
    assert out[True].shape == (5, 3 * 4)
    assert torch.equal(out[True], out[False])
    assert torch.equal(grads[True], grads[False])


def test_training_is_bitwise_the_same_in_both_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    feats = ["f0", "f1", "f2"]
    tables = [
        TableConfig(name="a", dim=8, features=["f0", "f1"], device_rows=64),
        TableConfig(name="b", dim=4, features=["f2"], pooling=Pooling.MEAN),
    ]
    rows = {}
    for reorder in (False, True):
        monkeypatch.setattr(pooling, "batch_major_pays", lambda _w, r=reorder: r)
        ebc = emb.HierarchicalEmbeddingBagCollection(tables, feats, SparseOptimConfig(), seed=1)
        losses = []
        for step in range(6):
            loss = (ebc(_kjt(7, feats, step)).values() ** 2).sum()
            loss.backward()
            losses.append(loss.item())
        rows[reorder] = (losses, [ebc.tables[t].group.export_table(ebc.tables[t].index)
                                  for t in range(2)])
    assert rows[True][0] == rows[False][0]
    for (k0, r0), (k1, r1) in zip(rows[False][1], rows[True][1]):
        assert torch.equal(k0, k1) and torch.equal(r0, r1)

"""DeepFM and Wide & Deep: the logit equals its formula over the rows ``[w | v]``
(float64), every part gets gradients, the row layout is checked, and the export keeps
them as one program equal to the model."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from terarec.config import ModelConfig, ModelKind
from terarec.models import DeepFM, WideDeep, build_model
from terarec.models.fm import fm_pairs
from terarec.models.split import split_model

B, F, D, NUM_DENSE = 5, 3, 4, 2
NAMES = ["a", "b", "c"]
TOL = 1e-12  # float64 sums in another order


class _Bags(nn.Module):
    """One ``nn.EmbeddingBag`` (sum) per feature: KJT in, KeyedTensor out, in the
    model's dtype (float64 here)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bags = nn.ModuleDict({f: nn.EmbeddingBag(20, width, mode="sum") for f in NAMES})
        self.width = width

    def forward(self, feats: KeyedJaggedTensor) -> KeyedTensor:
        pooled = [self.bags[f](feats[f].values(), feats[f].offsets()[:-1]) for f in NAMES]
        return KeyedTensor(keys=NAMES, length_per_key=[self.width] * F,
                           values=torch.cat(pooled, 1))


def ebc(width: int = D + 1) -> nn.Module:
    return _Bags(width)


def kjt(seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (F * B,), generator=g)  # multi-hot and empty bags
    values = torch.randint(0, 20, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(NAMES, values, lengths)


def by_hand(model: nn.Module, dense: torch.Tensor, feats: KeyedJaggedTensor,
            fm: bool) -> torch.Tensor:
    """The formula, pair by pair, from the pooled rows ``[w | v]``."""
    pooled = model.embedding(feats).to_dict()
    w = sum(pooled[f][:, 0] for f in NAMES)
    v = [pooled[f][:, 1:] for f in NAMES]
    wide = model.bias + w + (dense @ model.dense_linear.weight.t()).squeeze(-1)
    deep = model.deep.dense_module(torch.cat([*v, dense], 1)).squeeze(-1)
    pairs = sum((v[i] * v[j]).sum(1) for i, j in itertools.combinations(range(F), 2))
    return wide + deep + (pairs if fm else 0)


@pytest.mark.numerics
@pytest.mark.parametrize("cls", [DeepFM, WideDeep])
def test_logit_is_the_formula(cls: type) -> None:
    torch.manual_seed(0)
    model = cls(ebc(), NAMES, [D + 1] * F, NUM_DENSE, [8]).double()
    dense = torch.randn(B, NUM_DENSE, dtype=torch.double)
    feats = kjt()
    got = model(dense, feats)
    assert got.shape == (B,)
    assert torch.allclose(got, by_hand(model, dense, feats, cls is DeepFM), rtol=0, atol=TOL)
    got.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.numerics
def test_fm_pairs_is_the_sum_over_feature_pairs() -> None:
    v = torch.randn(7, 5, 3, dtype=torch.double)
    want = sum((v[:, i] * v[:, j]).sum(1) for i, j in itertools.combinations(range(5), 2))
    assert torch.allclose(fm_pairs(v), want, rtol=0, atol=TOL)


def test_row_layout_errors_and_factory() -> None:
    with pytest.raises(ValueError, match=r"deepfm: every feature needs one row width D \+ 1"):
        DeepFM(ebc(1), NAMES, [1] * F, NUM_DENSE, [8])
    with pytest.raises(ValueError, match="wide_deep: every feature needs one row width"):
        WideDeep(ebc(), NAMES, [5, 5, 3], NUM_DENSE, [8])
    for kind, cls in ((ModelKind.DEEPFM, DeepFM), (ModelKind.WIDE_DEEP, WideDeep)):
        m = build_model(ModelConfig(kind=kind, top_mlp=[8]), ebc(), NAMES, [D + 1] * F, 0)
        m = m.float()
        assert isinstance(m, cls) and m.dense_linear is None and m.embedding_dim == D
        assert m(torch.zeros(B, 0), kjt()).shape == (B,)


@pytest.mark.numerics
@pytest.mark.parametrize("cls", [DeepFM, WideDeep])
def test_export_split_is_one_program_equal_to_the_model(cls: type) -> None:
    torch.manual_seed(1)
    model = cls(ebc(), NAMES, [D + 1] * F, NUM_DENSE, [8, 4]).double()
    dense = torch.randn(B, NUM_DENSE, dtype=torch.double)
    feats = kjt(3)
    sp = split_model(model, ["a"], True)
    assert sp.mode == "single" and "deep MLP mixes every feature" in sp.shared
    pooled = model.embedding(feats).values()
    assert torch.allclose(sp.candidate(dense, pooled), model(dense, feats), rtol=0, atol=TOL)

"""The request-centric split equals the model's own forward (float64, every variant)."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor, KeyedTensor

from terarec.models.dcn import DCNv2
from terarec.models.dlrm import DLRM
from terarec.models.split import SplitError, split_model

F, D, B = 6, 8, 5
NAMES = [f"C{i}" for i in range(F)]
# float64 sums in another order: a few ulps of the logit's magnitude (~1) per term
TOL = 1e-12


class _Emb(torch.nn.Module):
    """One shared ``nn.Embedding``; one id per feature: KJT in, KeyedTensor out (float64
    when the model is)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(50, D)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        rows = [self.table(kjt[f].values()) for f in NAMES]
        return KeyedTensor(keys=NAMES, length_per_key=[D] * F, values=torch.cat(rows, 1))


def _ebc() -> torch.nn.Module:
    return _Emb()


def _model_forward(model: torch.nn.Module, dense: torch.Tensor, ids: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own logits on one id per feature, and the pooled rows ``[B, F, D]``."""
    kjt = KeyedJaggedTensor.from_lengths_sync(NAMES, ids.t().reshape(-1),
                                              torch.ones(F * B, dtype=torch.int32))
    pooled = model.embedding(kjt).values().view(B, F, -1)
    return model(dense, kjt), pooled


@pytest.mark.numerics
@pytest.mark.parametrize("num_dense,user_dense,top", [
    (4, True, [16]), (4, False, [16, 8]), (0, False, []), (4, True, [])])
@pytest.mark.parametrize("user", [["C0", "C2", "C3"], ["C1"], NAMES[:-1]])
@pytest.mark.parametrize("fold", [False, True])
def test_dlrm_split_equals_the_model(num_dense: int, user_dense: bool, top: list[int],
                                     user: list[str], fold: bool) -> None:
    torch.manual_seed(0)
    model = DLRM(_ebc(), NAMES, D, num_dense, [16, D], top).double()
    dense = torch.randn(B, num_dense, dtype=torch.double)
    ref, pooled = _model_forward(model, dense, torch.randint(0, 50, (B, F)))
    sp = split_model(model, user, user_dense, fold)
    assert sp.mode == "split" and sp.folded == fold
    ui = [NAMES.index(f) for f in sp.user_features]
    ci = [NAMES.index(f) for f in sp.candidate_features]
    du = dense if user_dense else dense[:, :0]
    dc = dense[:, :0] if user_dense else dense
    state, partial = sp.user(du, pooled[:, ui])  # every sample its own user
    got = torch.cat([sp.candidate(state[i: i + 1], partial[i: i + 1], dc[i: i + 1],
                                  pooled[i: i + 1][:, ci]) for i in range(B)])
    assert torch.allclose(got, ref, rtol=0, atol=TOL)
    # one user, many candidates: the user's part broadcast
    many = sp.candidate(state[:1], partial[:1], dc, pooled[:, ci])
    one = torch.cat([sp.candidate(state[:1], partial[:1], dc[i: i + 1],
                                  pooled[i: i + 1][:, ci]) for i in range(B)])
    assert torch.allclose(many, one, rtol=0, atol=TOL)


def test_dcn_and_unsplit_models_are_one_program() -> None:
    torch.manual_seed(0)
    dcn = DCNv2(_ebc(), NAMES, [D] * F, 4, [16], 2, 4).double()
    dense = torch.randn(B, 4, dtype=torch.double)
    ref, pooled = _model_forward(dcn, dense, torch.randint(0, 50, (B, F)))
    sp = split_model(dcn, ["C0"], True)
    assert sp.mode == "single" and sp.user is None and "DCN" in sp.shared
    assert torch.allclose(sp.candidate(dense, pooled.reshape(B, -1)), ref, rtol=0, atol=TOL)
    dlrm = DLRM(_ebc(), NAMES, D, 4, [16, D], [16]).double()
    assert split_model(dlrm, [], False).mode == "single"


def test_split_errors_name_the_field() -> None:
    model = DLRM(_ebc(), NAMES, D, 4, [16, D], [16])
    with pytest.raises(SplitError, match="model.user_features.*C9"):
        split_model(model, ["C9"], True)
    with pytest.raises(SplitError, match="every input is user-side"):
        split_model(model, NAMES, True)

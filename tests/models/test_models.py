"""DLRM / DCN-v2 over a torchrec EmbeddingBagCollection: shapes, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from terarec.config import ModelConfig, ModelKind
from terarec.models import DLRM, DCNv2, build_model
from terarec.models.dlrm import concat_pooled

B = 5
NUM_DENSE = 4


def make_ebc(dims: dict[str, int]) -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=d, num_embeddings=20, feature_names=[f])
        for f, d in dims.items()
    ]
    return EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))


def make_kjt(features: list[str], seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (len(features) * B,), generator=g)  # empty bags too
    values = torch.randint(0, 20, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(keys=features, values=values, lengths=lengths)


def grad_check(model: nn.Module, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> None:
    """Every parameter, and the embedding output, receives a non-zero gradient."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _inp: object, out: object) -> None:
        vals = out.values()  # type: ignore[attr-defined]
        vals.retain_grad()
        captured["pooled"] = vals

    handle = model.embedding.register_forward_hook(keep)
    logits = model(dense, kjt)
    handle.remove()
    labels = (torch.arange(logits.numel()) % 3 == 0).float()
    nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
    assert captured["pooled"].grad is not None
    assert captured["pooled"].grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if not name.startswith("embedding."):  # rows not looked up get zero grads
            assert p.grad.abs().sum() > 0, name


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_dlrm_shapes_and_gradients() -> None:
    feats = ["f0", "f1", "f2"]
    model = DLRM(make_ebc(dict.fromkeys(feats, 8)), feats, 8, NUM_DENSE, [16, 8], [16, 8])
    dense = torch.randn(B, NUM_DENSE)
    out = model(dense, make_kjt(feats))
    assert out.shape == (B,)
    assert out.dtype == torch.float32
    grad_check(model, dense, make_kjt(feats))


def test_dlrm_without_dense_features() -> None:
    feats = ["f0", "f1"]
    model = DLRM(make_ebc(dict.fromkeys(feats, 4)), feats, 4, 0, [64, 16], [8])
    assert model.dense_arch is None
    dense = torch.zeros(B, 0)
    assert model(dense, make_kjt(feats)).shape == (B,)
    grad_check(model, dense, make_kjt(feats))


def test_dlrm_single_feature_and_empty_top_mlp() -> None:
    model = DLRM(make_ebc({"f0": 4}), ["f0"], 4, NUM_DENSE, [4], [])
    assert isinstance(model.over_arch, nn.Linear)
    dense = torch.randn(B, NUM_DENSE)
    assert model(dense, make_kjt(["f0"])).shape == (B,)
    grad_check(model, dense, make_kjt(["f0"]))


def test_dlrm_logit_has_no_activation() -> None:
    model = DLRM(make_ebc({"f0": 4, "f1": 4}), ["f0", "f1"], 4, NUM_DENSE, [4], [8])
    with torch.no_grad():
        model.over_arch.model[-1].bias.fill_(-50.0)  # type: ignore[index]
    out = model(torch.randn(B, NUM_DENSE), make_kjt(["f0", "f1"]))
    assert (out < -10).all()  # a ReLU/sigmoid on the logit would clip this


def test_concat_pooled_follows_model_order() -> None:
    kt = KeyedTensor.from_tensor_list(["a", "b"], [torch.ones(B, 2), 2 * torch.ones(B, 3)])
    out = concat_pooled(kt, ["b", "a"], [3, 2])
    assert torch.equal(out, torch.cat([2 * torch.ones(B, 3), torch.ones(B, 2)], dim=1))
    assert concat_pooled(kt, ["a", "b"], [2, 3]) is kt.values()  # fast path, no copy


def test_dlrm_errors() -> None:
    ebc = make_ebc({"f0": 8, "f1": 8})
    with pytest.raises(
        ValueError,
        match=r"bottom_mlp: the last size \(16\) must equal the "
        r"embedding dim \(8\)",
    ):
        DLRM(ebc, ["f0", "f1"], 8, NUM_DENSE, [32, 16], [8])
    with pytest.raises(ValueError, match="duplicate"):
        DLRM(ebc, ["f0", "f0"], 8, NUM_DENSE, [8], [8])
    with pytest.raises(ValueError, match="at least one sparse feature"):
        DLRM(ebc, [], 8, NUM_DENSE, [8], [8])
    model = DLRM(ebc, ["f0", "f1"], 8, NUM_DENSE, [8], [8])
    with pytest.raises(ValueError, match=r"dense: expected shape \[B, 4\], got \[5, 3\]"):
        model(torch.randn(B, 3), make_kjt(["f0", "f1"]))
    wrong = DLRM(ebc, ["f0", "nope"], 8, NUM_DENSE, [8], [8])
    with pytest.raises(ValueError, match="no feature 'nope'"):
        wrong(torch.randn(B, NUM_DENSE), make_kjt(["f0", "f1"]))
    mismatched = DLRM(make_ebc({"f0": 8, "f1": 4}), ["f0", "f1"], 8, NUM_DENSE, [8], [8])
    with pytest.raises(
        ValueError, match="'f1': embedding output dim is 4, the model was built for 8"
    ):
        mismatched(torch.randn(B, NUM_DENSE), make_kjt(["f0", "f1"]))


@pytest.mark.parametrize("low_rank", [0, 3])
def test_dcn_shapes_and_gradients_mixed_dims(low_rank: int) -> None:
    dims = {"f0": 4, "f1": 8, "f2": 2}
    feats = list(dims)
    model = DCNv2(make_ebc(dims), feats, list(dims.values()), NUM_DENSE, [16, 8], 2, low_rank)
    assert model.in_features == NUM_DENSE + 14
    kind = "LowRankCrossNet" if low_rank else "CrossNet"
    assert type(model.crossnet).__name__ == kind
    dense = torch.randn(B, NUM_DENSE)
    assert model(dense, make_kjt(feats)).shape == (B,)
    grad_check(model, dense, make_kjt(feats))


def test_dcn_no_dense_no_deep() -> None:
    model = DCNv2(make_ebc({"f0": 4, "f1": 3}), ["f0", "f1"], [4, 3], 0, [], 1, 2)
    dense = torch.zeros(B, 0)
    assert model(dense, make_kjt(["f0", "f1"])).shape == (B,)
    grad_check(model, dense, make_kjt(["f0", "f1"]))


def test_dcn_errors() -> None:
    ebc = make_ebc({"f0": 4})
    with pytest.raises(ValueError, match="num_layers"):
        DCNv2(ebc, ["f0"], [4], NUM_DENSE, [8], 0, 2)
    with pytest.raises(ValueError, match="feature_dims: 2 dims for 1 features"):
        DCNv2(ebc, ["f0"], [4, 4], NUM_DENSE, [8], 1, 2)


def test_build_model_switches_on_kind() -> None:
    feats = ["f0", "f1"]
    ebc = make_ebc(dict.fromkeys(feats, 8))
    dlrm = build_model(
        ModelConfig(kind=ModelKind.DLRM, bottom_mlp=[16, 8]), ebc, feats, [8, 8], NUM_DENSE
    )
    dcn = build_model(
        ModelConfig(kind=ModelKind.DCN, dcn_layers=2, dcn_low_rank=0), ebc, feats, [8, 8], NUM_DENSE
    )
    assert isinstance(dlrm, DLRM) and isinstance(dcn, DCNv2)
    assert dcn.crossnet.__class__.__name__ == "CrossNet"
    dense, kjt = torch.randn(B, NUM_DENSE), make_kjt(feats)
    assert dlrm(dense, kjt).shape == dcn(dense, kjt).shape == (B,)


def test_build_model_dlrm_rejects_mixed_dims() -> None:
    ebc = make_ebc({"f0": 8, "f1": 4})
    with pytest.raises(ValueError, match="must share one embedding dim.*model.kind: dcn"):
        build_model(
            ModelConfig(kind=ModelKind.DLRM, bottom_mlp=[8]), ebc, ["f0", "f1"], [8, 4], NUM_DENSE
        )


def test_models_import_only_torch_and_torchrec() -> None:
    import ast
    import pathlib

    import terarec.models as pkg

    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
            elif isinstance(node, ast.Import):
                mod = node.names[0].name
            else:
                continue
            top = mod.split(".")[0]
            assert top in {"torch", "torchrec", "terarec", "__future__", "collections", "typing",
                           "copy", "dataclasses"}, (
                path.name,
                mod,
            )
            assert not mod.startswith(("terarec.ps", "terarec.trainer", "terarec.data")), (
                path.name,
                mod,
            )

"""terarec's collection against ``torchrec.EmbeddingBagCollection`` with the same rows:
the same pooled values and key order for the KJTs TorchRec users send (shared and
per-feature tables, interleaved dims, empty bags, int32 and int64 ids, weighted KJTs,
variable batch per feature)."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import InitConfig, Pooling, SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection

V = 50  # ids per table: 0 .. V-1
FEATURES = ["a", "b", "c", "d", "e"]
# t0 (dim 4) is shared by a and b; t1 (dim 8) and t2 (dim 4) are per-feature; t3 (dim 8)
# pools by mean. terarec batches t0 with t2 and t1 with t3 (same dim and pooling), so
# its groups interleave the tables: the output must still be in TorchRec's order.
LAYOUT = [("t0", 4, ["a", "b"], "sum"), ("t1", 8, ["c"], "sum"), ("t2", 4, ["d"], "sum"),
          ("t3", 8, ["e"], "mean")]


def collections(weighted: bool, layout=LAYOUT) -> tuple[HierarchicalEmbeddingBagCollection,
                                                       EmbeddingBagCollection]:
    """terarec's and TorchRec's collections over the same tables, with the same rows."""
    torch.manual_seed(0)
    ref = EmbeddingBagCollection([
        EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=V, feature_names=fs,
                           pooling=PoolingType.SUM if p == "sum" else PoolingType.MEAN)
        for n, d, fs, p in layout], is_weighted=weighted)
    ours = HierarchicalEmbeddingBagCollection(
        [TableConfig(name=n, dim=d, features=fs, init=InitConfig(kind="zeros"),
                     pooling=Pooling.SUM if p == "sum" else Pooling.MEAN)
         for n, d, fs, p in layout],
        [f for _, _, fs, _ in layout for f in fs], SparseOptimConfig(kind="sgd"))
    for table in ours.tables:
        w = ref.embedding_bags[table.name].weight.detach()
        extra = torch.zeros(V, table.row_width - w.shape[1])
        table.insert_rows(torch.arange(V), torch.cat([w, extra], 1))
    return ours, ref


def kjt(seed: int, dtype: torch.dtype, weighted: bool, batch: int = 6,
        keys: list[str] = FEATURES) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)  # empty bags too
    lengths[:batch] = 0  # one feature empty in every sample
    values = torch.randint(0, V, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, values.to(dtype), lengths.to(dtype),
                                               weights=weights)


def assert_same(ours: HierarchicalEmbeddingBagCollection, ref: EmbeddingBagCollection,
                features: KeyedJaggedTensor) -> None:
    got, want = ours(features), ref(features)
    assert got.keys() == want.keys()
    assert got.length_per_key() == want.length_per_key()
    # the same rows summed in the same order by the same kernel: equal bit for bit
    assert torch.equal(got.values(), want.values().detach())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("train", [True, False])
def test_pooled_values_and_key_order_match_torchrec(dtype: torch.dtype, train: bool) -> None:
    ours, ref = collections(weighted=False)
    ours.train(train)
    for seed in range(3):
        assert_same(ours, ref, kjt(seed, dtype, weighted=False))
    # the KJT's keys in another order: the output order is the tables' all the same
    assert_same(ours, ref, kjt(7, dtype, False, keys=["e", "d", "c", "b", "a"]))


def test_weighted_kjt_scales_each_row_as_torchrec() -> None:
    layout = [t for t in LAYOUT if t[3] == "sum"]
    ours, ref = collections(weighted=True, layout=layout)
    feats = [f for _, _, fs, _ in layout for f in fs]
    for seed in range(3):
        assert_same(ours, ref, kjt(seed, torch.int64, weighted=True, keys=feats))


def test_weighted_kjt_with_mean_pooling_is_an_error() -> None:
    ours, _ = collections(weighted=False)
    with pytest.raises(ValueError, match=r"t3.*weighted KJT.*sum pooling"):
        ours(kjt(0, torch.int64, weighted=True))


def test_weights_reach_the_row_gradients() -> None:
    """One SGD step on a weighted KJT: each row moves by lr x its weighted gradient."""
    layout = [("t0", 4, ["a", "b"], "sum")]
    ours, ref = collections(weighted=True, layout=layout)
    features = kjt(3, torch.int64, weighted=True, keys=["a", "b"])
    before = ours.tables[0].lookup(torch.arange(V))[:, :4].clone()
    ours(features).values().sum().backward()
    ref(features).values().sum().backward()
    lr = SparseOptimConfig(kind="sgd").lr
    grad = ref.embedding_bags["t0"].weight.grad
    after = ours.tables[0].lookup(torch.arange(V))[:, :4]
    torch.testing.assert_close(after, before - lr * grad, rtol=0, atol=4 * torch.finfo(
        torch.float32).eps * (1 + float(grad.abs().max()) * lr))


def test_variable_batch_per_feature_is_expanded_as_torchrec() -> None:
    """VBE: feature a has 2 bags, b has 3 (one per sample), 3 samples; both collections
    pool per bag and expand by the inverse indices."""
    layout = [("t0", 4, ["a", "b"], "sum")]
    ours, ref = collections(weighted=False, layout=layout)
    vbe = KeyedJaggedTensor(
        keys=["a", "b"], values=torch.tensor([1, 2, 7, 3, 4, 5, 5]),
        lengths=torch.tensor([2, 1, 1, 0, 3]), stride_per_key_per_rank=[[2], [3]],
        inverse_indices=(["a", "b"], torch.tensor([[0, 1, 0], [0, 1, 2]])))
    assert_same(ours, ref, vbe)


def test_missing_feature_is_an_error_naming_it() -> None:
    ours, ref = collections(weighted=False)
    features = kjt(0, torch.int64, False, keys=["a", "b", "c", "d"])
    with pytest.raises(KeyError):
        ref(features)
    with pytest.raises(ValueError, match=r"missing \['e'\]"):
        ours(features)

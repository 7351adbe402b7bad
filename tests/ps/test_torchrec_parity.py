"""terarec's collection against ``torchrec.EmbeddingBagCollection`` with the same rows:
the same pooled values and key order for the KJTs TorchRec users send (shared and
per-feature tables, interleaved dims, empty bags, int32 and int64 ids, weighted KJTs,
variable batch per feature); state dicts that hold the rows, and converters to and from
TorchRec's state dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import InitConfig, Pooling, SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.state import (
    RowsNotInStateDict,
    dense_state_only,
    from_tbe,
    from_torchrec,
    to_tbe,
    to_torchrec,
)

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


# -- state dicts -------------------------------------------------------------------------
def test_state_dict_holds_the_rows_and_loads_them_back(tmp_path: Path) -> None:
    """``torch.save(model.state_dict())`` keeps every row of in-memory tables (it used
    to keep none); a fresh collection loaded from it pools exactly alike."""
    ours, _ = collections(weighted=False)
    features = kjt(1, torch.int64, weighted=False)
    ours(features).values().sum().backward()  # one step: rows and optimizer state move
    sd = ours.state_dict()
    assert {f"tables.{n}.{k}" for n, *_ in LAYOUT for k in ("keys", "rows", "optimizer_step")
            } <= sd.keys()
    torch.save(sd, tmp_path / "sd.pt")
    fresh, _ = collections(weighted=False)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    ours.eval(), fresh.eval()
    assert torch.equal(fresh(features).values(), ours(features).values())
    for a, b in zip(ours.tables, fresh.tables):
        ka, ra = a.export()
        kb, rb = b.export()
        oa, ob = torch.argsort(ka), torch.argsort(kb)
        assert torch.equal(ka[oa], kb[ob]) and torch.equal(ra[oa], rb[ob])
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in sd.items() if not k.startswith("tables.t1")})


def test_tiered_tables_are_not_put_in_a_state_dict_and_say_what_to_use() -> None:
    ebc = HierarchicalEmbeddingBagCollection(
        [TableConfig(name="big", dim=4, device_rows=64)], ["a"], SparseOptimConfig())
    with pytest.raises(RowsNotInStateDict, match=r"table big is tiered.*checkpoint"):
        ebc.state_dict()
    with dense_state_only(ebc):
        assert ebc.state_dict() == {}


def test_terarec_checkpoints_keep_rows_out_of_the_dense_state(tmp_path: Path) -> None:
    from terarec.config import config_from_dict
    from terarec.trainer.loop import train

    cfg = config_from_dict({
        "name": "sd", "data": {"kind": "synthetic", "batch_size": 16,
                               "synthetic": {"num_dense": 2, "num_sparse": 2,
                                             "vocab_size": 20, "eval_samples": 64}},
        "tables": [{"name": "sparse", "dim": 4}],
        "model": {"kind": "dlrm", "bottom_mlp": [4], "top_mlp": [4]},
        "train": {"steps": 3, "device": "cpu", "threads": 1, "progress": False,
                  "runs_dir": str(tmp_path)}}, "<sd>")
    train(cfg)
    dense = torch.load(tmp_path / "sd" / "checkpoint" / "dense.pt", weights_only=True)
    assert dense["model"] and not any("tables." in k for k in dense["model"])


def test_torchrec_state_dict_converters_round_trip() -> None:
    """terarec -> TorchRec (weights + the key vocabulary) -> a TorchRec collection pools
    the remapped ids exactly as terarec pools the keys; and back into a fresh terarec
    collection."""
    layout = [("t0", 4, ["a", "b"], "sum"), ("t1", 8, ["c"], "sum")]
    ours, _ = collections(weighted=False, layout=layout)
    keys = torch.arange(V) * 7919 - 2**40  # arbitrary int64 keys
    for t in ours.tables:
        t.insert_rows(keys, torch.randn(V, t.row_width))
    state, vocab = to_torchrec(ours)
    ref = EmbeddingBagCollection([
        EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=vocab[n].numel(),
                           feature_names=fs) for n, d, fs, _ in layout])
    ref.load_state_dict(state)
    feats = ["a", "b", "c"]
    ids = kjt(2, torch.int64, False, keys=feats)
    as_keys = KeyedJaggedTensor.from_lengths_sync(feats, keys[ids.values()], ids.lengths())
    ours.eval()
    assert torch.equal(ours(as_keys).values(), ref(ids).values().detach())
    back, _ = collections(weighted=False, layout=layout)
    from_torchrec(back, state, vocab)
    back.eval()
    assert torch.equal(back(as_keys).values(), ours(as_keys).values())


def test_fbgemm_tbe_weight_converters_round_trip() -> None:
    """terarec -> FBGEMM TBE weights (split_embedding_weights, the TBE's table order) ->
    the TBE pools the remapped ids exactly as terarec pools the keys; and back."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    layout = [("t0", 4, ["a", "b"], "sum"), ("t1", 8, ["c"], "sum")]
    ours, _ = collections(weighted=False, layout=layout)
    keys = torch.arange(V) * 104729 - 2**50  # before the keys the tables hold: ids 0..V-1
    for t in ours.tables:
        t.insert_rows(keys, torch.randn(V, t.row_width))
    order = ["t1", "t0"]  # the TBE's own table order
    weights, vocab = to_tbe(ours, order)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(vocab[n].numel(), w.shape[1], EmbeddingLocation.HOST, ComputeDevice.CPU)
         for n, w in zip(order, weights)],
        feature_table_map=[1, 1, 0], pooling_mode=PoolingMode.SUM)  # a, b: t0; c: t1
    for dst, w in zip(tbe.split_embedding_weights(), weights):
        dst.detach().copy_(w)
    feats = ["a", "b", "c"]
    ids = kjt(3, torch.int64, False, keys=feats)
    as_keys = KeyedJaggedTensor.from_lengths_sync(feats, keys[ids.values()], ids.lengths())
    ours.eval()
    got = tbe(ids.values(), ids.offsets()).detach()  # [B, 4 + 4 + 8] in feature order
    assert torch.equal(ours(as_keys).values(), got)
    back, _ = collections(weighted=False, layout=layout)
    from_tbe(back, [w.detach() for w in tbe.split_embedding_weights()], order, vocab)
    back.eval()
    assert torch.equal(back(as_keys).values(), ours(as_keys).values())
    with pytest.raises(ValueError, match="not tables of the collection"):
        to_tbe(ours, ["t9"])

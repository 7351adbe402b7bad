"""Training parity with TorchRec's kernels: 50 steps of terarec's collection against
FBGEMM's table-batched embedding (TBE, the fused kernel behind TorchRec's EBC) with the
same rows, KJTs and loss, for SGD, Adagrad and row-wise Adagrad; Adam, which FBGEMM
runs on GPUs only, against torch's ``SparseAdam``, and the one intended difference from
FBGEMM's Adam (where eps is added) tested as such."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    EmbeddingLocation,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import InitConfig, SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from tests.numerics import assert_close, train_tol

V = 40  # ids per table
STEPS = 50
BATCH = 16
FEATURES = ["a", "b", "c"]
TABLES = [("t0", 4, ["a", "b"]), ("t1", 8, ["c"])]  # t0 shared by a and b
LR = {"sgd": 0.05, "adagrad": 0.05, "rowwise_adagrad": 0.05, "adam": 0.01}
FBGEMM = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
          "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}


def batches(seed: int) -> list[tuple[KeyedJaggedTensor, torch.Tensor]]:
    """KJTs (empty bags and repeated ids included) and the loss coefficients ``[B, 16]``
    of each step: loss = sum(pooled * coef), so every column gets its own gradient."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        lengths = torch.randint(0, 4, (len(FEATURES) * BATCH,), generator=g)
        values = torch.randint(0, V, (int(lengths.sum()),), generator=g)
        coef = torch.randn(BATCH, 16, generator=g)
        out.append((KeyedJaggedTensor.from_lengths_sync(FEATURES, values, lengths), coef))
    return out


def ours_and_rows(kind: str, eps: float = 1e-8
                  ) -> tuple[HierarchicalEmbeddingBagCollection, list[torch.Tensor]]:
    torch.manual_seed(0)
    ours = HierarchicalEmbeddingBagCollection(
        [TableConfig(name=n, dim=d, features=fs, init=InitConfig(kind="zeros"))
         for n, d, fs in TABLES], FEATURES, SparseOptimConfig(kind=kind, lr=LR[kind], eps=eps))
    rows = []
    for table, (_, d, _) in zip(ours.tables, TABLES):
        w = torch.rand(V, d) - 0.5
        table.insert_rows(torch.arange(V), torch.cat([w, torch.zeros(V, table.row_width - d)], 1))
        rows.append(w)
    return ours, rows


def weights(ours: HierarchicalEmbeddingBagCollection) -> list[torch.Tensor]:
    return [t.lookup(torch.arange(V))[:, :d] for t, (_, d, _) in zip(ours.tables, TABLES)]


def train_ours(ours: HierarchicalEmbeddingBagCollection, data: list) -> None:
    for kjt, coef in data:
        (ours(kjt).values() * coef).sum().backward()


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad"])
def test_fifty_steps_match_fbgemm_tbe(kind: str) -> None:
    ours, rows = ours_and_rows(kind)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(V, d, EmbeddingLocation.HOST, ComputeDevice.CPU) for _, d, _ in TABLES],
        feature_table_map=[0, 0, 1], optimizer=FBGEMM[kind], learning_rate=LR[kind],
        eps=1e-8, pooling_mode=PoolingMode.SUM)
    for i, w in enumerate(rows):
        tbe.split_embedding_weights()[i].copy_(w)
    data = batches(1)
    train_ours(ours, data)
    for kjt, coef in data:
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(kjt.lengths())
        (tbe(kjt.values(), offsets) * coef).sum().backward()  # the update is fused
    # each step rounds a row of size <= 1 and moves it by lr x an update whose gradient
    # sums up to BATCH x 3 ids x |coef| (<= 5) terms in another order
    grad = 5.0 * BATCH * 3
    tol = train_tol(LR[kind], STEPS, terms=BATCH * 3, magnitude=1.0,
                    grad=grad if kind == "sgd" else 1.0)
    for got, want, start, (name, _, _) in zip(weights(ours), tbe.split_embedding_weights(),
                                              rows, TABLES):
        assert not torch.equal(want, start)  # it trained
        assert_close(got, want, tol, f"{kind} {name}")


@pytest.mark.numerics
def test_fifty_adam_steps_match_torch_sparse_adam() -> None:
    """terarec's Adam is torch's SparseAdam: lazy (a row's moments move when it is
    touched), bias correction by the global step, eps added to sqrt(v)."""
    ours, rows = ours_and_rows("adam")
    bags = [nn.EmbeddingBag(V, d, mode="sum", sparse=True, _weight=w.clone())
            for w, (_, d, _) in zip(rows, TABLES)]
    opt = torch.optim.SparseAdam([b.weight for b in bags], lr=LR["adam"], eps=1e-8)
    data = batches(2)
    train_ours(ours, data)
    table_of = {"a": 0, "b": 0, "c": 1}
    for kjt, coef in data:
        opt.zero_grad()
        pooled = [bags[table_of[f]](kjt[f].values(), kjt[f].offsets()[:-1])
                  for f in FEATURES]
        (torch.cat(pooled, 1) * coef).sum().backward()
        opt.step()
    tol = train_tol(LR["adam"], STEPS, terms=BATCH * 3, magnitude=1.0)
    for got, b, (name, _, _) in zip(weights(ours), bags, TABLES):
        assert_close(got, b.weight, tol, f"adam {name}")


def fbgemm_adam_step(w: torch.Tensor, g: torch.Tensor, lr: float, eps: float,
                     beta1: float = 0.9, beta2: float = 0.999) -> torch.Tensor:
    """FBGEMM's Adam (``EmbOptimType.ADAM``, GPU only) on fresh moments, one step in
    float64: ``w - lr * m_hat / (sqrt(v_hat) + eps)`` with bias-corrected moments."""
    w, g = w.double(), g.double()
    m_hat = (1 - beta1) * g / (1 - beta1)
    v_hat = (1 - beta2) * g * g / (1 - beta2)
    return w - lr * m_hat / (v_hat.sqrt() + eps)


@pytest.mark.numerics
def test_adam_eps_is_added_to_sqrt_v_not_to_its_bias_corrected_root() -> None:
    """The intended difference from FBGEMM's Adam: terarec (as torch's SparseAdam) adds
    eps to sqrt(v); FBGEMM to sqrt(v / (1 - beta2^t)). At step t terarec with eps
    equals FBGEMM with eps / sqrt(1 - beta2^t): one step, where it is largest."""
    eps = 0.05  # large, so the placement shows
    ours, rows = ours_and_rows("adam", eps=eps)
    kjt = KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.tensor([3, 5, 7]),
                                              torch.tensor([1] + [0] * 15 + [1] + [0] * 15
                                                           + [1] + [0] * 15))
    coef = torch.zeros(BATCH, 16)
    coef[0] = torch.linspace(-1, 1, 16)
    (ours(kjt).values() * coef).sum().backward()
    got = weights(ours)[0][3]
    g = coef[0, :4]  # feature a, row 3 of t0: its gradient is a's coefficients
    lr = LR["adam"]
    same = fbgemm_adam_step(rows[0][3], g, lr, eps / (1 - 0.999) ** 0.5)
    other = fbgemm_adam_step(rows[0][3], g, lr, eps)
    assert_close(got, same, train_tol(lr, 1, magnitude=1.0), "adam vs FBGEMM, rescaled eps")
    assert float((got.double() - other).abs().max()) > 100 * train_tol(lr, 1)

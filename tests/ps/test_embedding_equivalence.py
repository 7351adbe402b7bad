"""The embedding collection + fused row optimizers against a plain dense reference.

Reference: one ``nn.EmbeddingBag(sparse=True)`` per table whose row ``i`` starts as the
first-touch initial row of the i-th smallest key, trained by the torch optimizer with
the same semantics (row-wise Adagrad has no torch twin and is written densely here).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import InitConfig, Pooling, SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from tests.numerics import assert_close, loss_tol, max_grad, train_tol

FEATURES = ["f1", "f2", "f3"]
STEPS = 200
BATCH = 16
MAX_BAG = 3  # ids per bag: lengths are drawn from [0, 4)


def make_batches(seed: int, vocab: int = 60) -> list[KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        lengths = torch.randint(0, MAX_BAG + 1, (len(FEATURES) * BATCH,), generator=g)  # empty too
        raw = torch.randint(0, vocab, (int(lengths.sum()),), generator=g)
        values = raw * 7919 - 2**40  # arbitrary int64 ids, negative ones included
        out.append(KeyedJaggedTensor.from_lengths_sync(FEATURES, values, lengths))
    return out


class RowwiseAdagradRef(torch.optim.Optimizer):
    """Row-wise Adagrad written densely over a coalesced sparse gradient."""

    def __init__(self, params, lr: float, eps: float, init: float) -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "init": init})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad.coalesce()
                idx, val = g.indices()[0], g.values()
                st = self.state[p].setdefault(
                    "sum", torch.full((p.shape[0], 1), group["init"], dtype=p.dtype)
                )
                st[idx] += val.pow(2).mean(dim=1, keepdim=True)
                p[idx] -= group["lr"] * val / (st[idx].sqrt() + group["eps"])


def reference_dtype(kind: str) -> torch.dtype:
    """The dense reference's precision (tests/numerics.py).

    float64 where it can be: then a bound only has to cover the float32 rounding of
    the code under test, which grows with the steps (SGD and both Adagrads).

    Adam's stays float32: float32 Adam drifts from exact arithmetic far more than
    ``eps`` per step (m / sqrt(v) turns a rounding of a near-cancelling gradient into a
    change of ~lr times its relative size, and the changes compound: 4e-4 in the loss
    after 800 steps of ``test_tiers_equivalence`` against a float64 reference). Two
    float32 runs of the same formula in the same operation order (``RowAdam`` follows
    ``torch.optim.SparseAdam``) round alike except in the sums whose order differs,
    the bags' pooling and each key's gradient, which is what ``train_tol`` bounds.
    """
    return torch.float32 if kind == "adam" else torch.float64


def reference_optimizer(cfg: SparseOptimConfig, params):
    if cfg.kind == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    if cfg.kind == "adagrad":
        return torch.optim.Adagrad(
            params, lr=cfg.lr, eps=cfg.eps, initial_accumulator_value=cfg.initial_accumulator_value
        )
    if cfg.kind == "adam":
        return torch.optim.SparseAdam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return RowwiseAdagradRef(params, lr=cfg.lr, eps=cfg.eps, init=cfg.initial_accumulator_value)


def layout_tables(layout: str, pooling: str) -> list[TableConfig]:
    if layout == "mixed":  # two groups: dims and initializers differ
        return [
            TableConfig(name="t1", dim=8, features=["f1"], pooling=Pooling(pooling)),
            TableConfig(
                name="t23",
                dim=4,
                features=None,
                pooling=Pooling(pooling),
                init=InitConfig(kind="normal", scale=0.1),
            ),
        ]
    # one group of three tables over overlapping raw ids: namespaces must stay apart
    return [
        TableConfig(name=f"t{i}", dim=4, features=[f"f{i}"], pooling=Pooling(pooling))
        for i in (1, 2, 3)
    ]


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["mixed", "grouped"])
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_matches_dense_reference(kind: str, pooling: str, layout: str) -> None:
    torch.manual_seed(0)
    opt_cfg = SparseOptimConfig(kind=kind, lr=0.05, initial_accumulator_value=0.1)
    tables = layout_tables(layout, pooling)
    ebc = HierarchicalEmbeddingBagCollection(tables, FEATURES, opt_cfg, seed=3)
    assert len(ebc.groups) == (2 if layout == "mixed" else 1)
    batches = make_batches(1)
    dtype = reference_dtype(kind)

    # Dense reference over the keys each table will ever see, in float64 but for Adam
    # (reference_dtype).
    groups = ebc.table_features
    ref_keys, ref_bags = [], nn.ModuleList()
    for t, feats in zip(ebc.tables, groups):
        keys = torch.unique(torch.cat([b[f].values() for b in batches for f in feats]))
        bag = nn.EmbeddingBag(keys.numel(), t.dim, mode=pooling, sparse=True, dtype=dtype)
        with torch.no_grad():
            bag.weight.copy_(t.initial_weights(keys))
        ref_keys.append(keys)
        ref_bags.append(bag)
    ref_opt = reference_optimizer(opt_cfg, ref_bags.parameters())

    head = torch.randn(sum(t.dim * len(fs) for t, fs in zip(ebc.tables, groups)), 1)
    labels = torch.randint(0, 2, (STEPS, BATCH)).float()

    def loss_of(pooled: torch.Tensor, step: int) -> torch.Tensor:
        logits = torch.tanh(pooled) @ head.to(pooled.dtype)
        return nn.functional.binary_cross_entropy_with_logits(
            logits.squeeze(1), labels[step].to(pooled.dtype)
        )

    grad = 0.0  # the largest |gradient entry| (SGD's update is lr * g)
    for step, kjt in enumerate(batches):
        loss = loss_of(ebc(kjt).values(), step)
        loss.backward()

        outs = []
        for keys, bag, feats in zip(ref_keys, ref_bags, groups):
            for f in feats:
                jt = kjt[f]
                idx = torch.searchsorted(keys, jt.values())
                outs.append(bag(idx, jt.offsets()[:-1]))
        ref_loss = loss_of(torch.cat(outs, dim=1), step)
        ref_opt.zero_grad()
        ref_loss.backward()
        grad = max(grad, max_grad(ref_bags.parameters()))
        ref_opt.step()
        # the loss: a mean over the batch (tests/numerics.py)
        assert_close(loss.item(), ref_loss.item(), loss_tol(ref_loss.item(), step, BATCH),
                     f"loss at step {step}")

    # Rows: STEPS updates, each rounding the row and adding an update computed from a
    # gradient that sums at most every value of a batch (Adam and Adagrad normalise it
    # to ~lr, SGD scales it by lr * |g|).
    values = len(FEATURES) * BATCH * MAX_BAG
    for t, keys, bag in zip(ebc.tables, ref_keys, ref_bags):
        got_keys, rows = t.export()
        assert torch.equal(torch.sort(got_keys).values, keys)
        order = torch.argsort(got_keys)
        want = bag.weight.detach()
        tol = train_tol(opt_cfg.lr, STEPS, values, float(want.abs().max()),
                        grad=grad if kind == "sgd" else 1.0)
        assert_close(rows[order, : t.dim], want, tol, f"rows of {t.name}")


def test_eval_mode_does_not_create_rows() -> None:
    ebc = HierarchicalEmbeddingBagCollection(
        [TableConfig(name="t", dim=4)], ["f1"], SparseOptimConfig(kind="sgd")
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(["f1"], torch.tensor([5, 6]), torch.tensor([1, 1]))
    ebc.eval()
    with torch.no_grad():
        out = ebc(kjt).values()
    assert torch.count_nonzero(out) == 0 and ebc.num_rows() == {"t": 0}
    ebc.train()
    ebc(kjt).values().sum().backward()
    assert ebc.num_rows() == {"t": 2}


def test_state_dict_round_trip() -> None:
    tables = [TableConfig(name="t", dim=4)]
    a = HierarchicalEmbeddingBagCollection(tables, ["f1"], SparseOptimConfig(kind="adam"))
    for kjt in make_batches(2)[:5]:
        a(
            KeyedJaggedTensor.from_lengths_sync(["f1"], kjt["f1"].values(), kjt["f1"].lengths())
        ).values().sum().backward()
    b = HierarchicalEmbeddingBagCollection(tables, ["f1"], SparseOptimConfig(kind="adam"))
    b.load_tables_state_dict(a.tables_state_dict())
    ka, ra = a.tables[0].export()
    kb, rb = b.tables[0].export()
    assert torch.equal(ka, kb) and torch.equal(ra, rb)
    assert b.tables[0].optimizer.step == 5
    probe = KeyedJaggedTensor.from_lengths_sync(["f1"], ka[:3], torch.tensor([3]))
    a.eval(), b.eval()
    assert torch.equal(a(probe).values(), b(probe).values())


def test_unknown_and_unassigned_features_are_errors() -> None:
    with pytest.raises(ValueError, match="not in the data"):
        HierarchicalEmbeddingBagCollection(
            [TableConfig(name="t", dim=4, features=["zz"])], ["f1"], SparseOptimConfig()
        )
    with pytest.raises(ValueError, match="in no table"):
        HierarchicalEmbeddingBagCollection(
            [TableConfig(name="t", dim=4, features=["f1"])], ["f1", "f2"], SparseOptimConfig()
        )

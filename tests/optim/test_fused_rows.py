"""The fused (triton) row optimizers against the torch reference path.

Triton runs on CPU tensors only under its interpreter: run with
``TRITON_INTERPRET=1`` (and triton importable) to exercise these; on CUDA they run
natively. Elsewhere they skip.
"""

from __future__ import annotations

import pytest
import torch

from terarec.config import SparseOptimConfig, SparseOptimKind, TableConfig
from terarec.optim import triton_rows
from terarec.optim.sparse import build_row_optimizer
from terarec.ps.group import TableGroup
from tests.numerics import EPS32, assert_close, f32_tol

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.skipif(
        not triton_rows.available(DEVICE),
        reason="needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed",
    ),
    pytest.mark.numerics,
]
KINDS = list(SparseOptimKind)
# Rounded operations per element in one optimizer step (Adam's: m and v updates, sqrt,
# + eps, the division, the step size, the add: 12; the others fewer). The fused kernel
# and the torch path round the same operations, but a GPU contracts pairs of them into
# fused multiply-adds: each of them may round differently on the two paths.
STEP_OPS = 12


def fused_bound(ref: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-element bound after ``steps`` steps: ``STEP_OPS`` roundings per step, each
    relative to the operands' size: the value itself plus O(1) for the updates (random
    rows in [0, 1), N(0, 1) gradients, lr 0.05, state of the same order). Adam's m/sqrt(v)
    does not amplify more here: the gradients are the same on both paths, only the
    moments' rounding differs, by a few eps relative, and v >= (1 - beta2) g^2."""
    return EPS32 * steps * STEP_OPS * (1.0 + ref.abs())


def _cfg(kind: SparseOptimKind) -> SparseOptimConfig:
    return SparseOptimConfig(kind=kind, lr=0.05, initial_accumulator_value=0.1)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize("dim", [8, 12])
def test_update_at_matches_torch_path(kind: SparseOptimKind, dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    ref_opt, fused_opt = build_row_optimizer(_cfg(kind), dim), build_row_optimizer(_cfg(kind), dim)
    width = dim + ref_opt.state_width
    storage = torch.rand(50, width, generator=g).to(DEVICE)
    fused = storage.clone()
    for _ in range(3):  # several steps: Adam's bias correction moves
        slots = torch.randperm(50, generator=g)[:17].to(DEVICE)
        grad = torch.randn(17, dim, generator=g).to(DEVICE)
        storage.index_copy_(0, slots, ref_opt.update(storage.index_select(0, slots), grad))
        fused_opt.update_at(fused, slots, grad)
    assert fused_opt.step == ref_opt.step == 3
    assert_close(fused, storage, fused_bound(storage, 3), "rows")


def test_skipped_slots_and_empty_batch() -> None:
    opt = build_row_optimizer(_cfg(SparseOptimKind.ADAM), 4)
    storage = torch.rand(6, 12).to(DEVICE)
    before = storage.clone()
    opt.update_at(storage, torch.tensor([-1, 2], device=DEVICE), torch.ones(2, 4, device=DEVICE))
    untouched = [0, 1, 3, 4, 5]
    assert torch.equal(storage[untouched], before[untouched])
    assert not torch.equal(storage[2], before[2])
    opt.update_at(storage, torch.empty(0, dtype=torch.int64, device=DEVICE),
                  torch.empty(0, 4, device=DEVICE))


def test_fused_demanded_where_it_cannot_run() -> None:
    opt = build_row_optimizer(_cfg(SparseOptimKind.SGD), 4)
    if triton_rows.triton is None:
        with pytest.raises(ValueError, match="fused row optimizer"):
            opt.fused_on(torch.device("cpu"), True)
    assert opt.fused_on(torch.device("cpu"), False) is False


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_tiered_group_fused_equals_torch_path(kind: SparseOptimKind) -> None:
    """A tiered group (device cache of 16 rows, a scratch pad for what does not fit,
    host tier) trained 12 steps: the fused path keeps the same rows as the torch path."""
    table = TableConfig(name="t", dim=8, device_rows=16, host_rows=None, scratch_pad=True)
    groups = [
        TableGroup([table], _cfg(kind), DEVICE, seed=1, fused=f) for f in (False, True)
    ]
    assert groups[1].fused and not groups[0].fused
    g = torch.Generator().manual_seed(1)
    padded = 0
    for _ in range(12):
        keys = torch.unique(torch.randint(0, 60, (24,), generator=g)).to(DEVICE)
        tables = torch.zeros_like(keys)
        grad = torch.randn(keys.numel(), 8, generator=g).to(DEVICE)
        for grp in groups:
            slots = grp.slots_for(keys, tables)
            padded += int((slots >= grp.store.top.capacity).sum())  # type: ignore[union-attr]
            grp.apply_gradients(slots, grad, grp.read(slots))
    assert padded > 0  # the scratch pad's part of the step ran too
    (k0, r0), (k1, r1) = (grp.export_table(0) for grp in groups)
    o0, o1 = torch.argsort(k0), torch.argsort(k1)
    assert torch.equal(k0[o0], k1[o1])
    # 12 steps: on a GPU the kernel's fused multiply-adds round differently from torch's
    # separate passes (2e-6 seen on an H100 with Adam)
    assert_close(r1[o1], r0[o0], fused_bound(r0[o0], 12), "rows")


def test_collection_training_fused_equals_torch_path() -> None:
    """HEBC forward (weights gathered alone) + backward (rows updated in place) on a
    tiered and an unbounded table: same losses and rows as the torch path."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from terarec.ps.embedding import HierarchicalEmbeddingBagCollection

    tables = [
        TableConfig(name="a", dim=8, features=["f0"], device_rows=16, scratch_pad=True),
        TableConfig(name="b", dim=4, features=["f1"]),
    ]
    cfg = _cfg(SparseOptimKind.ADAM)
    ebcs = [
        HierarchicalEmbeddingBagCollection(tables, ["f0", "f1"], cfg, device=DEVICE, seed=3)
        for _ in range(2)
    ]
    for grp in ebcs[1].groups:
        grp.fused = True
    g = torch.Generator().manual_seed(2)
    for step in range(8):
        ids = torch.randint(0, 50, (2 * 12,), generator=g)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            ["f0", "f1"], ids, torch.full((2 * 6,), 2, dtype=torch.int64)
        ).to(DEVICE)
        target = torch.randn(6, 12, generator=g).to(DEVICE)
        losses = []
        for ebc in ebcs:
            loss = ((ebc(kjt).values() - target) ** 2).mean()
            loss.backward()
            losses.append(loss.item())
        # the forward passes are the same; the rows under them drift by one rounding of
        # the loss's size per step at most
        assert_close(losses[1], losses[0], f32_tol(max(1.0, abs(losses[0])), step + 1), "loss")
    for t in range(2):
        (k0, r0), (k1, r1) = (e.tables[t].group.export_table(e.tables[t].index) for e in ebcs)
        o0, o1 = torch.argsort(k0), torch.argsort(k1)
        assert torch.equal(k0[o0], k1[o1])
        assert_close(r1[o1], r0[o0], fused_bound(r0[o0], 8), f"table {t} rows")

"""Tiered tables (device cache -> host -> SSD) train exactly like unbounded ones.

The issue's acceptance check: 1,000 steps over ~5,000 distinct keys with a device tier
of 64 rows and a host tier of 256 rows, which forces every eviction path (device -> host,
host -> SSD, and back up). Three models train in lockstep on the same batches:

* the tiered collection, and the same collection without budgets: rows move between
  tiers bit for bit, so losses and final rows must be **identical** (bitwise);
* the dense reference (``nn.EmbeddingBag`` + the torch optimizer, in float64 but for
  Adam): the loss of every step and the final rows within bounds derived from float32
  rounding (``tests/numerics.py``: the loss's own sum plus one rounding per step of
  drift; the rows' rounding and the updates' over the 1,000 steps).
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import InitConfig, SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.ssd import SSDStore, SSDTierConfig
from tests.numerics import assert_close, loss_tol, max_grad, train_tol
from tests.ps.test_embedding_equivalence import reference_dtype, reference_optimizer

FEATS = ["a", "b"]
BATCH = 8
VOCAB = 5000
VALUES = len(FEATS) * BATCH * 3  # the most values a batch holds: bags of up to 3 ids


def batches(steps: int) -> list[KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, 4, (len(FEATS) * BATCH,), generator=g)  # <= 48 values
        # a hot head (hits) and a long uniform tail (misses down to the SSD tier)
        hot = torch.randint(0, 40, (int(lengths.sum()),), generator=g)
        cold = torch.randint(0, VOCAB, (int(lengths.sum()),), generator=g)
        pick = torch.rand(int(lengths.sum()), generator=g) < 0.3
        ids = torch.where(pick, hot, cold) * 104729 - 3 * 2**40
        out.append(KeyedJaggedTensor.from_lengths_sync(FEATS, ids, lengths))
    return out


@pytest.mark.numerics
@pytest.mark.parametrize(
    "kind,host_rows,policy,prefetch",
    [
        ("sgd", 256, "lru", False),
        ("sgd", 256, "lru", True),
        ("rowwise_adagrad", 256, "lfu", False),
        ("adam", 256, "lru", False),
        ("adam", 256, "lfu", True),
        ("adam", None, "lru", False),  # device cache over an unbounded host tier
    ],
)
def test_tiered_training_matches_dense_reference(
    tmp_path, kind: str, host_rows: int | None, policy: str, prefetch: bool
) -> None:
    steps = 1000
    data = batches(steps)
    opt = SparseOptimConfig(kind=kind, lr=0.05, initial_accumulator_value=0.1)
    table = TableConfig(
        name="t",
        dim=4,
        init=InitConfig(kind="uniform", scale=0.1),
        device_rows=64,
        host_rows=host_rows,
        cache_policy=policy,
    )
    store = SSDStore(tmp_path / "ssd", SSDTierConfig(path=str(tmp_path / "ssd")))
    ebc = HierarchicalEmbeddingBagCollection([table], FEATS, opt, seed=5, ssd_store=store)
    plain_table = TableConfig(name="t", dim=4, init=InitConfig(kind="uniform", scale=0.1))
    plain = HierarchicalEmbeddingBagCollection([plain_table], FEATS, opt, seed=5)
    group = ebc.groups[0]
    assert group.tiered and len(group.store.tiers) == (3 if host_rows else 2)

    keys = torch.unique(torch.cat([b.values() for b in data]))
    assert keys.numel() > 3000
    dtype = reference_dtype(kind)
    bag = nn.EmbeddingBag(keys.numel(), 4, mode="sum", sparse=True, dtype=dtype)
    with torch.no_grad():
        bag.weight.copy_(ebc.tables[0].initial_weights(keys))
    ref_opt = reference_optimizer(opt, bag.parameters())
    head = torch.linspace(-1, 1, 8).unsqueeze(1)
    skipped: list[str] = []  # the last prefetch's tables that did not fit
    fitted = 0
    grad = 0.0  # the largest |gradient entry| (SGD's update is lr * g)
    for step, kjt in enumerate(data):
        misses_before, rows_before = group.stats()["device_misses"], len(ebc.tables[0])
        loss = (torch.tanh(ebc(kjt).values()) @ head).square().sum()
        if prefetch and step > 0 and not skipped:
            # the prefetch made every key with a row resident: the forward misses only
            # the keys it creates (a prefetch creates no row)
            misses = group.stats()["device_misses"] - misses_before
            assert misses == len(ebc.tables[0]) - rows_before, step
            fitted += 1
        worker = None
        if prefetch and step + 1 < steps:  # the next batch, while this one trains
            skipped.clear()
            worker = threading.Thread(
                target=lambda b, out=skipped: out.extend(ebc.prefetch(b)),
                args=(data[step + 1],),
            )
            worker.start()
        loss.backward()
        if worker is not None:
            worker.join()
        plain_loss = (torch.tanh(plain(kjt).values()) @ head).square().sum()
        plain_loss.backward()
        assert loss.item() == plain_loss.item(), f"step {step}: tiers changed the math"
        outs = [
            bag(torch.searchsorted(keys, kjt[f].values()), kjt[f].offsets()[:-1]) for f in FEATS
        ]
        ref_loss = (torch.tanh(torch.cat(outs, dim=1)) @ head.to(dtype)).square().sum()
        ref_opt.zero_grad()
        ref_loss.backward()
        grad = max(grad, max_grad(bag.parameters()))
        ref_opt.step()
        assert_close(loss.item(), ref_loss.item(), loss_tol(ref_loss.item(), step, BATCH),
                     f"loss at step {step}")

    stats = group.stats()
    assert stats["device_evictions"] > 0
    if prefetch:  # every batch that fitted beside the one training was prefetched
        assert fitted == steps - 1 - stats["prefetch_skipped"] and fitted > steps // 2
        assert stats["prefetch_batches"] == steps - 1 and stats["prefetch_rows_in"] > 0
    if host_rows:
        assert stats["host_evictions"] > 0 and stats["ssd_rows_in"] > 0
    got_keys, rows = ebc.tables[0].export()
    assert torch.equal(torch.sort(got_keys).values, keys) and len(ebc.tables[0]) == keys.numel()
    order = torch.argsort(got_keys)
    plain_keys, plain_rows = plain.tables[0].export()
    plain_order = torch.argsort(plain_keys)
    assert torch.equal(rows[order], plain_rows[plain_order])  # weights and optimizer state
    want = bag.weight.detach()
    tol = train_tol(opt.lr, steps, VALUES, float(want.abs().max()),
                    grad=grad if kind == "sgd" else 1.0)
    assert_close(rows[order, :4], want, tol, "rows")
    store.close()


def test_batch_larger_than_device_tier_is_a_clear_error() -> None:
    table = TableConfig(name="t", dim=4, device_rows=8)
    ebc = HierarchicalEmbeddingBagCollection([table], ["a"], SparseOptimConfig(kind="sgd"))
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.arange(20), torch.tensor([20]))
    with pytest.raises(RuntimeError, match="20 unique keys .* at least 20 rows"):
        ebc(kjt)


def test_host_budget_without_ssd_is_a_clear_error() -> None:
    table = TableConfig(name="t", dim=4, device_rows=8, host_rows=16)
    with pytest.raises(ValueError, match="SSD tier"):
        HierarchicalEmbeddingBagCollection([table], ["a"], SparseOptimConfig(kind="sgd"))


def test_too_small_device_tier_fails_before_moving_rows(tmp_path) -> None:
    table = TableConfig(name="t", dim=4, device_rows=8, host_rows=8)
    store = SSDStore(tmp_path / "ssd", SSDTierConfig(path=str(tmp_path / "ssd")))
    ebc = HierarchicalEmbeddingBagCollection(
        [table], ["a"], SparseOptimConfig(kind="sgd"), ssd_store=store
    )
    for start in (0, 8, 16):  # 24 rows spread over device, host and SSD
        kjt = KeyedJaggedTensor.from_lengths_sync(
            ["a"], torch.arange(start, start + 8), torch.tensor([8])
        )
        ebc(kjt).values().sum().backward()
    before_keys, before_rows = ebc.tables[0].export()
    big = KeyedJaggedTensor.from_lengths_sync(["a"], torch.arange(20), torch.tensor([20]))
    with pytest.raises(RuntimeError, match="at least 20 rows"):
        ebc(big)
    keys, rows = ebc.tables[0].export()
    assert torch.equal(torch.sort(keys).values, torch.arange(24))
    assert torch.equal(rows[torch.argsort(keys)], before_rows[torch.argsort(before_keys)])
    store.close()

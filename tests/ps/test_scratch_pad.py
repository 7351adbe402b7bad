"""Device tiers smaller than a batch: the rows that do not fit train from the scratch pad.

The tiered table (a device tier of 16 rows, a host tier of 8 rows, the SSD tier) trains
batches of up to 48 unique keys in lockstep with the unbounded table: losses and final
rows (weights and optimizer state) must be bitwise equal, with prefetch on a background
thread and without.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import InitConfig, SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.ssd import SSDStore, SSDTierConfig
from tests.ps.test_tiers_equivalence import FEATS, batches


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("host_rows", [8, None])
def test_scratch_pad_trains_like_an_unbounded_table(
    tmp_path, prefetch: bool, host_rows: int | None
) -> None:
    steps = 300
    data = batches(steps)
    opt = SparseOptimConfig(kind="adam", lr=0.05)
    init = InitConfig(kind="uniform", scale=0.1)
    table = TableConfig(
        name="t", dim=4, init=init, device_rows=16, host_rows=host_rows, scratch_pad=True
    )
    store = SSDStore(tmp_path / "ssd", SSDTierConfig(path=str(tmp_path / "ssd")))
    ebc = HierarchicalEmbeddingBagCollection([table], FEATS, opt, seed=5, ssd_store=store)
    plain = HierarchicalEmbeddingBagCollection(
        [TableConfig(name="t", dim=4, init=init)], FEATS, opt, seed=5
    )
    head = torch.linspace(-1, 1, 8).unsqueeze(1)
    for step, kjt in enumerate(data):
        loss = (torch.tanh(ebc(kjt).values()) @ head).square().sum()
        worker = None
        if prefetch and step + 1 < steps:
            worker = threading.Thread(target=ebc.prefetch, args=(data[step + 1],))
            worker.start()
        loss.backward()
        if worker is not None:
            worker.join()
        plain_loss = (torch.tanh(plain(kjt).values()) @ head).square().sum()
        plain_loss.backward()
        assert loss.item() == plain_loss.item(), f"step {step}"
        if step % 50 == 0:  # eval reads through the pad too
            with torch.no_grad():
                ebc.eval(), plain.eval()
                assert torch.equal(ebc(kjt).values(), plain(kjt).values())
                ebc.train(), plain.train()
    stats = ebc.groups[0].stats()
    assert stats["scratch_rows_in"] > 0 and stats["scratch_peak"] > 16
    assert stats["device_evictions"] > 0
    if host_rows:
        assert stats["ssd_rows_in"] > 0
    keys, rows = ebc.tables[0].export()
    plain_keys, plain_rows = plain.tables[0].export()
    assert torch.equal(torch.sort(keys).values, torch.sort(plain_keys).values)
    assert torch.equal(rows[torch.argsort(keys)], plain_rows[torch.argsort(plain_keys)])
    store.close()


def test_without_scratch_pad_the_error_names_it() -> None:
    table = TableConfig(name="t", dim=4, device_rows=8)
    ebc = HierarchicalEmbeddingBagCollection([table], ["a"], SparseOptimConfig(kind="sgd"))
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.arange(20), torch.tensor([20]))
    with pytest.raises(RuntimeError, match="at least 20 rows.*scratch_pad: true"):
        ebc(kjt)


def test_scratch_pad_needs_a_device_tier() -> None:
    with pytest.raises(ValueError, match="scratch_pad"):
        TableConfig(name="t", dim=4, scratch_pad=True)


def test_rows_leaving_the_pad_do_not_evict_what_the_batch_finds_below() -> None:
    """A batch's rows in the host tier are found there: the rows the pad releases in the
    same step go down only afterwards (pushed first, they evicted exactly those rows)."""
    from terarec.ps.store.chain import TierChain
    from terarec.ps.tiers.cache import CacheTier
    from terarec.ps.tiers.host import HostTier

    width = 3
    chain = TierChain(
        [CacheTier(width, 4, name="device"), CacheTier(width, 8, name="host"), HostTier(width)],
        "t",
        scratch_pad=True,
    )

    def create(pos: torch.Tensor) -> torch.Tensor:
        return torch.zeros(pos.numel(), width)

    a, b = torch.arange(10), torch.arange(10, 20)
    chain.prepare(a, 1, create)  # 4 rows in the device tier, 6 in the pad
    chain.prepare(b, 2, create)  # a's rows: 4 evicted + 6 released -> 8 in host, 2 below
    host_hits = chain.tiers[1].stats()["hits"]
    chain.prepare(a, 3, create)  # b's 6 pad rows leave as a's rows are looked for
    assert chain.tiers[1].stats()["hits"] - host_hits == 8
    keys, _ = chain.export()
    assert torch.equal(torch.sort(keys).values, torch.arange(20))


def test_after_a_prefetch_the_next_prefetch_writes_the_last_steps_pad_rows_down() -> None:
    """The training thread's ``prepare`` of a prefetched batch leaves the rows only the
    last step used in the pad (still read from there); the next prefetch, or without
    one the next ``prepare``, writes them down."""
    from terarec.ps.store.chain import TierChain
    from terarec.ps.tiers.cache import CacheTier
    from terarec.ps.tiers.host import HostTier

    width = 3
    chain = TierChain(
        [CacheTier(width, 4, name="device"), CacheTier(width, 8, name="host"), HostTier(width)],
        "t",
        scratch_pad=True,
    )
    pad = chain.scratch
    assert pad is not None

    def create(pos: torch.Tensor) -> torch.Tensor:
        return torch.full((pos.numel(), width), 7.0)

    a, b, c = torch.arange(10), torch.arange(10, 20), torch.arange(20, 30)
    chain.prepare(a, 1, create)  # 4 rows in the device tier, 6 in the pad
    chain.prepare(b, 2, create)  # no prefetch: a's 6 pad rows go down
    assert len(pad) == 6
    chain.prepare(c, 3, create)
    assert chain.prefetch(b, 3)  # b's rows come back (device room 0: all to the pad)
    chain.prepare(b, 4, create)  # prefetched: c's pad rows stay
    assert len(pad) == 16 and bool((pad.lookup(c) >= 0).sum() == 6)  # c: 6, b: 10
    rows, found = chain.lookup_rows(c)
    assert bool(found.all()) and bool((rows == 7).all())
    assert chain.prefetch(a, 4)  # writes c's pad rows down
    assert bool((pad.lookup(c) >= 0).sum() == 0)
    chain.prepare(a, 5, create)
    chain.prepare(c, 6, create)  # no prefetch for c: b's pad rows go down at once
    assert bool((pad.lookup(b) >= 0).sum() == 0)
    keys, rows = chain.export()
    assert torch.equal(torch.sort(keys).values, torch.arange(30)) and bool((rows == 7).all())

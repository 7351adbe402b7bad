"""TrainPipeline: the next batch is loaded and prefetched while one trains.

The reference is the same pipeline with ``overlap=False`` (read, copy, train, one batch
after the other; the forward makes the rows resident): with the background thread the
losses, rows, dense weights, evals and checkpoints must be bitwise the same, on a tiered
table (a device tier barely over two batches, a host tier over the SSD tier: every
eviction path, rows shared by consecutive batches) and an untiered one.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from test_loop import Killed, assert_same, comparable, kill_in_step, tables_by_key
from test_tiers import assert_same_result
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import Config, InitConfig, SparseOptimConfig, TableConfig
from terarec.data.batch import Batch
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.ssd import SSDStore, SSDTierConfig
from terarec.trainer import loop
from terarec.trainer.checkpoint import read_manifest
from terarec.trainer.loop import train
from terarec.trainer.pipeline import StepOutput, TrainPipeline
from terarec.trainer.report import read_jsonl
from terarec.trainer.tiers import describe_tiers

FEATS = ["a", "b"]
BATCH = 8
DIM = 4


def make_batches(steps: int, seed: int = 3) -> list[Batch]:
    """A hot head of 30 keys (shared by consecutive batches) and a 3,000-key tail."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        lengths = torch.randint(0, 4, (len(FEATS) * BATCH,), generator=g)
        n = int(lengths.sum())
        hot = torch.randint(0, 30, (n,), generator=g)
        cold = torch.randint(0, 3000, (n,), generator=g)
        ids = torch.where(torch.rand(n, generator=g) < 0.4, hot, cold) * 7919 + 11
        kjt = KeyedJaggedTensor.from_lengths_sync(FEATS, ids, lengths)
        labels = (torch.rand(BATCH, generator=g) < 0.3).float()
        out.append(Batch(torch.zeros(BATCH, 0), kjt, labels, position={"batch": i + 1}))
    return out


class Tiny(nn.Module):
    """Pooled embeddings -> tanh -> linear: the smallest CTR model."""

    def __init__(self, embedding: HierarchicalEmbeddingBagCollection) -> None:
        super().__init__()
        self.embedding = embedding
        self.head = nn.Linear(len(FEATS) * DIM, 1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embedding(sparse).values())).squeeze(1)


@pytest.fixture
def build(tmp_path: Path) -> Iterator[Callable[..., tuple[Tiny, TrainPipeline]]]:
    """``build(tiered, overlap, budgets=None, device="cpu", **pipeline_kwargs)``: a fresh
    model and its pipeline (tiered: 120 device rows, 160 host rows and the SSD tier by
    default)."""
    stores: list[SSDStore] = []
    pipes: list[TrainPipeline] = []

    def make(
        tiered: bool,
        overlap: bool,
        budgets: Optional[dict[str, int]] = None,
        device: str = "cpu",
        **kw: Any,
    ) -> tuple[Tiny, TrainPipeline]:
        store = None
        if not tiered:
            budgets = {}
        else:
            budgets = budgets or {"device_rows": 120, "host_rows": 160}
            path = tmp_path / f"ssd{len(stores)}"
            store = SSDStore(path, SSDTierConfig(path=str(path)))
            stores.append(store)
        table = TableConfig(
            name="t", dim=DIM, init=InitConfig(kind="uniform", scale=0.1), **budgets
        )
        opt = SparseOptimConfig(kind="adam", lr=0.05)
        ebc = HierarchicalEmbeddingBagCollection(
            [table], FEATS, opt, device=torch.device(device), seed=5, ssd_store=store
        )
        torch.manual_seed(0)
        model = Tiny(ebc).to(device)
        dense_opt = torch.optim.Adam(model.head.parameters(), lr=0.01)
        pipe = TrainPipeline(
            model, dense_opt, ebc, torch.device(device), nn.BCEWithLogitsLoss(), overlap, **kw
        )
        pipes.append(pipe)
        return model, pipe

    yield make
    for p in pipes:
        p.close()
    for s in stores:
        s.close()


def run(pipe: TrainPipeline, batches: Any, limit: Optional[int] = None) -> list[StepOutput]:
    it = iter(batches)
    outs: list[StepOutput] = []
    while limit is None or len(outs) < limit:
        try:
            outs.append(pipe.progress(it))
        except StopIteration:
            break
    return outs


def pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "terarec-pipeline"]


# ------------------------------------------------------------------- equivalence


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "tiered, device",
    [(True, "cpu"), (False, "cpu"), pytest.param(True, "cuda", marks=CUDA)],
    ids=["tiered", "untiered", "tiered-cuda"],
)
def test_overlapped_training_is_bitwise_the_plain_loop(
    build: Callable, tiered: bool, device: str
) -> None:
    """On CUDA the background thread copies and prefetches on a side stream."""
    steps = 300
    data = make_batches(steps)
    plain_model, plain = build(tiered, overlap=False, device=device)
    model, pipe = build(tiered, overlap=True, device=device)
    group = model.embedding.groups[0]
    a = run(plain, data)
    b = run(pipe, data)
    assert len(a) == len(b) == steps
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x.loss, y.loss), f"step {i}: {x.loss.item()} != {y.loss.item()}"
        assert torch.equal(x.logits, y.logits), i
        assert y.batch.position == {"batch": i + 1}  # the batch trained, not the next one
    keys_a, rows_a = plain_model.embedding.tables[0].export()
    keys_b, rows_b = model.embedding.tables[0].export()
    oa, ob = torch.argsort(keys_a), torch.argsort(keys_b)
    assert torch.equal(keys_a[oa], keys_b[ob]) and torch.equal(rows_a[oa], rows_b[ob])
    for pa, pb in zip(plain_model.head.parameters(), model.head.parameters()):
        assert torch.equal(pa, pb)
    assert pipe.stats.steps == steps and pipe.stats.load_s > 0
    if not tiered:
        return
    stats = group.stats()
    assert stats["device_evictions"] > 0 and stats["host_evictions"] > 0
    assert stats["ssd_hits"] > 0  # rows came back up from the SSD tier
    # the next batch fits beside the current one most of the time: prefetched
    assert stats["prefetch_batches"] == steps
    assert stats["prefetch_rows_in"] > 0 and stats["prefetch_skipped"] < steps // 4
    assert sum(pipe.stats.skipped.values()) == stats["prefetch_skipped"]
    # a prefetched step misses only the keys it creates (no lookup goes below the
    # device tier on the main thread); the hot head keys were shared and stayed put
    assert stats["prefetch_resident"] > 0.3 * stats["prefetch_keys"]


def test_consecutive_batches_of_the_same_keys_read_what_the_last_step_wrote(
    build: Callable,
) -> None:
    # every batch has the same keys: each step's prefetch finds them all resident and
    # locked by the step training; the step after must see that step's updates
    base = make_batches(1)[0]
    g = torch.Generator().manual_seed(1)
    data = [
        Batch(base.dense, base.sparse, (torch.rand(BATCH, generator=g) < 0.5).float(),
              position={"batch": i + 1})
        for i in range(40)
    ]
    plain_model, plain = build(True, overlap=False)
    model, pipe = build(True, overlap=True)
    a, b = run(plain, data), run(pipe, data)
    assert [x.loss.item() for x in a] == [y.loss.item() for y in b]
    assert len({x.loss.item() for x in a}) > 30  # the rows did change every step
    stats = model.embedding.groups[0].stats()
    assert stats["prefetch_resident"] == stats["prefetch_keys"] - stats["prefetch_absent"]


# ----------------------------------------------------------------------- overlap


def test_loading_and_prefetch_run_during_the_backward(build: Callable) -> None:
    """Deterministic overlap check: batch t+1's read and prefetch each wait for the
    backward of step t to have started, and that backward waits for both. Run one
    after the other, this would time out."""
    model, pipe = build(True, overlap=True)
    in_backward, loaded, prefetched = threading.Event(), threading.Event(), threading.Event()
    seen: list[str] = []
    data = make_batches(6)

    def batches() -> Iterator[Batch]:
        yield data[0]
        for b in data[1:]:
            assert in_backward.wait(10), "the next batch was not read during the backward"
            seen.append("read")
            loaded.set()
            yield b

    real = model.embedding.prefetch

    def prefetch(kjt: KeyedJaggedTensor) -> list[str]:
        if len(seen) > 0:
            assert in_backward.wait(10), "the prefetch did not run during the backward"
            seen.append("prefetch")
            prefetched.set()
        return real(kjt)

    model.embedding.prefetch = prefetch  # type: ignore[method-assign]

    def hook(grad: torch.Tensor) -> None:
        in_backward.set()
        if pipe.stats.steps < 5:  # the last step has no next batch
            assert loaded.wait(10) and prefetched.wait(10), "no overlap with the backward"
            loaded.clear()
            prefetched.clear()
        in_backward.clear()

    model.head.weight.register_hook(hook)
    outs = run(pipe, batches())
    assert len(outs) == 6 and seen == ["read", "prefetch"] * 5


# --------------------------------------------------------------- errors and stops


def test_an_error_on_the_background_thread_surfaces_with_its_traceback(
    build: Callable,
) -> None:
    model, pipe = build(True, overlap=True)
    data = make_batches(5)

    def broken_reader() -> Iterator[Batch]:
        yield from data[:3]
        raise ValueError("row 4 is malformed")

    it = broken_reader()
    trained = [pipe.progress(it) for _ in range(3)]  # batch 3 trains: the error is batch 4's
    with pytest.raises(ValueError, match="row 4 is malformed") as err:
        pipe.progress(it)
    frames = [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert "broken_reader" in frames and "_run" in frames  # the reader's own frames
    assert [o.batch.position for o in trained] == [{"batch": i} for i in (1, 2, 3)]
    assert not pipeline_threads()  # closed on the way out
    with pytest.raises(RuntimeError, match="after close"):
        pipe.progress(it)


def test_a_background_thread_that_cannot_start_fails_the_step(
    build: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: TrainPipeline) -> None:
        raise RuntimeError("no CUDA device 7")

    monkeypatch.setattr(TrainPipeline, "_setup_thread", broken)
    model, pipe = build(True, overlap=True)
    with pytest.raises(RuntimeError, match="no CUDA device 7"):  # not a hang
        pipe.progress(iter(make_batches(3)))
    assert not pipeline_threads()


def test_a_prefetch_error_surfaces_at_the_step_that_needs_the_batch(
    build: Callable,
) -> None:
    model, pipe = build(True, overlap=True)
    real = model.embedding.prefetch
    calls = []

    def prefetch(kjt: KeyedJaggedTensor) -> list[str]:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("SSD tier: disk full")
        return real(kjt)

    model.embedding.prefetch = prefetch  # type: ignore[method-assign]
    it = iter(make_batches(6))
    pipe.progress(it)
    pipe.progress(it)  # batch 3's prefetch fails while batch 2 trains: batch 2 completes
    assert pipe.stats.steps == 2
    with pytest.raises(OSError, match="disk full"):
        pipe.progress(it)
    assert not pipeline_threads()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_an_interrupt_in_the_step_stops_the_background_thread(
    build: Callable, exc: type[BaseException]
) -> None:
    model, pipe = build(True, overlap=True)
    real_forward = model.head.forward
    calls: list[int] = []
    prefetched: list[int] = []
    real_prefetch = model.embedding.prefetch

    def head(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise exc()  # in the forward: batch 4's job is waiting for the gate
        return real_forward(x)

    def prefetch(kjt: KeyedJaggedTensor) -> list[str]:
        prefetched.append(1)
        return real_prefetch(kjt)

    model.head.forward = head  # type: ignore[method-assign]
    model.embedding.prefetch = prefetch  # type: ignore[method-assign]
    it = iter(make_batches(10))
    with pytest.raises(exc):
        run(pipe, it)
    assert pipe.stats.steps == 2
    assert len(prefetched) == 3  # batches 1-3; batch 4's prefetch was abandoned
    assert not pipeline_threads()


def test_early_stop_and_check_loss(build: Callable) -> None:
    checked: list[float] = []
    model, pipe = build(True, overlap=True, check_loss=lambda loss: checked.append(loss.item()))
    outs = run(pipe, make_batches(10), limit=4)
    pipe.close()
    pipe.close()  # idempotent
    assert len(outs) == 4 and checked == [o.loss.item() for o in outs]
    assert not pipeline_threads()

    model, pipe = build(False, overlap=True, check_loss=lambda loss: 1 / 0)
    before = [p.clone() for p in model.head.parameters()]
    with pytest.raises(ZeroDivisionError):
        pipe.progress(iter(make_batches(3)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.head.parameters()))
    assert model.embedding.tables[0].export()[1].abs().sum() > 0  # rows exist, not updated
    assert not pipeline_threads()


def test_a_next_batch_that_does_not_fit_is_made_resident_by_its_step(
    build: Callable,
) -> None:
    # 48 device rows hold one batch (<= 48 keys) but often not two: the prefetch gives
    # up (counted), the step brings its rows in, and training is still exact
    budgets = {"device_rows": 48, "host_rows": 64}
    _, plain = build(True, overlap=False, budgets=budgets)
    model, pipe = build(True, overlap=True, budgets=budgets)
    data = make_batches(100)
    a, b = run(plain, data), run(pipe, data)
    assert [x.loss.item() for x in a] == [y.loss.item() for y in b]
    skipped = model.embedding.groups[0].stats()["prefetch_skipped"]
    assert 10 < skipped < 90 and pipe.stats.skipped == {"t": skipped}


# ------------------------------------------------------------------- the trainer

# A device tier with room for two batches (16 samples x 4 features: <= 64 keys each),
# so that the prefetch works, over a host tier and the SSD tier.
PREFETCHED: dict[str, Any] = {
    "data": {"batch_size": 16, "synthetic": {"vocab_size": 2000}},
    "tables": [{"name": "sparse", "dim": 8, "device_rows": 140, "host_rows": 200}],
    "ssd": {"path": "ssd", "block_cache_mb": 8, "write_buffer_mb": 4},
    "train": {"steps": 60, "eval_every": 20, "log_every": 10},
}


def without_wall_clock(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "tiers"} for r in comparable(records)]


@pytest.mark.numerics
@pytest.mark.parametrize(
    "tiered, device",
    [(True, "cpu"), (False, "cpu"), pytest.param(True, "cuda", marks=CUDA)],
    ids=["tiered", "untiered", "tiered-cuda"],
)
def test_train_with_and_without_the_pipeline_is_bitwise_the_same(
    tiny_config: Callable[..., Config], tiered: bool, device: str
) -> None:
    over = {**PREFETCHED, "train": {**PREFETCHED["train"], "device": device}}
    if not tiered:
        over = {**over, "tables": [{"name": "sparse", "dim": 8}], "ssd": {}}
    on = train(tiny_config(name="on", **{**over, "train": {**over["train"], "prefetch": True}}))
    off_over = {**over, "train": {**over["train"], "prefetch": False}}
    off = train(tiny_config(name="off", **off_over))
    runs = Path(tiny_config().train.runs_dir)
    assert_same_result(runs / "on", on, runs / "off", off)
    # every logged loss, AUC, row count and eval, line for line
    assert without_wall_clock(read_jsonl(runs / "on" / "metrics.jsonl")) == without_wall_clock(
        read_jsonl(runs / "off" / "metrics.jsonl")
    )
    assert "pipeline" in on and "pipeline" not in off
    if not tiered:
        return
    tot = on["tiers"]["sparse"]
    assert tot["prefetch_batches"] == 60 and tot["prefetch_skipped"] < 6
    assert tot["prefetch_rows_in"] > 0 and 0 < tot["prefetch_hit_rate"] < 1
    assert tot["ready_rate"] > 0.9 > tot["prefetch_hit_rate"]  # the prefetch did its job
    assert off["tiers"]["sparse"]["prefetch_batches"] == 0
    (line,) = describe_tiers(on["tiers"])  # the closing line of the run
    assert ", prefetch ready " in line and "skipped)" in line
    assert "prefetch" not in describe_tiers(off["tiers"])[0]
    assert "ready_rate" not in off["tiers"]["sparse"]
    lines = [r for r in read_jsonl(runs / "on" / "metrics.jsonl") if r["split"] == "train"]
    for r in lines:
        rec = r["tiers"]["sparse"]
        assert rec["ssd_read_rows_per_s"] >= 0 and rec["ssd_write_rows_per_s"] >= 0
        assert rec["ssd_reads"] == rec["ssd_hits"]
        assert rec["device_bytes_in"] == rec["device_rows_in"] * 4 * (8 + 8 + 8)  # adam
        assert 0 < rec["prefetch_hit_rate"] < 1 and 0.5 < rec["ready_rate"] <= 1
    assert sum(r["tiers"]["sparse"]["prefetch_rows_in"] for r in lines) == tot["prefetch_rows_in"]
    assert lines[-1]["tiers"]["sparse"]["ssd_read_rows_per_s"] > 0  # once the host tier is full
    assert lines[-1]["tiers"]["sparse"]["ssd_write_rows_per_s"] > 0


PIPELINE_KEYS = {"load_s", "prefetch_s", "wait_s", "hidden", "skipped"}


def test_the_pipeline_is_on_by_default_for_tiered_tables_only(
    tiny_config: Callable[..., Config],
) -> None:
    assert tiny_config().train.prefetch is None  # null: decided by the tables
    plain = train(tiny_config(name="plain", train={"steps": 20}))
    assert "pipeline" not in plain
    tiered = train(tiny_config(name="tiered", **{**PREFETCHED, "train": {"steps": 20}}))
    assert set(tiered["pipeline"]) == PIPELINE_KEYS and tiered["pipeline"]["load_s"] > 0
    run = Path(tiny_config().train.runs_dir) / "tiered"
    for r in read_jsonl(run / "metrics.jsonl"):
        if r["split"] == "train":
            assert set(r["pipeline"]) == PIPELINE_KEYS and 0 <= r["pipeline"]["hidden"] <= 1


def test_progress_bar_fields(tiny_config: Callable[..., Config], monkeypatch) -> None:
    shown: list[dict[str, str]] = []
    real = loop.make_progress

    def make(*args: Any) -> Any:
        bar = real(*args)
        keep = bar.set_postfix

        def set_postfix(postfix: dict[str, str]) -> None:
            shown.append(dict(postfix))
            keep(postfix)

        bar.set_postfix = set_postfix
        return bar

    monkeypatch.setattr(loop, "make_progress", make)
    train(tiny_config(name="bar", **PREFETCHED))
    assert len(shown) == 6
    last = shown[-1]
    assert set(last) == {"loss", "auc", "sps", "rows", "hit", "ready", "ssd"}
    assert last["hit"].startswith("dev ") and " host " in last["hit"] and " ssd " in last["hit"]
    assert last["ready"].endswith("%") and last["ssd"].endswith("Mrow/s")


def test_a_killed_prefetched_run_resumes_exactly(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint holds the position of the batches trained (the source had read
    one more) and only rows of trained batches (the prefetch creates none)."""
    straight = train(tiny_config(name="straight", **PREFETCHED))
    periodic = {**PREFETCHED, "train": {**PREFETCHED["train"], "checkpoint_every": 10}}
    kill_in_step(monkeypatch, 36)
    with pytest.raises(Killed):
        train(tiny_config(name="killed", **periodic))
    monkeypatch.undo()
    assert not pipeline_threads()
    runs = Path(tiny_config().train.runs_dir)
    ckpt = runs / "killed" / "checkpoint"
    assert read_manifest(ckpt)["step"] == 30
    assert (ckpt / "data.json").read_text() != ""
    resumed = train(tiny_config(name="killed", **periodic), resume=ckpt)
    assert_same_result(runs / "straight", straight, runs / "killed", resumed)
    assert without_wall_clock(read_jsonl(runs / "straight" / "metrics.jsonl")) == (
        without_wall_clock(read_jsonl(runs / "killed" / "metrics.jsonl"))
    )
    assert_same(tables_by_key(runs / "straight" / "checkpoint"), tables_by_key(ckpt))

"""The training pipeline: batch t trains while batch t+1 is loaded and made resident.

In TorchRec's ``TrainPipeline`` style, :meth:`TrainPipeline.progress` is the whole
public face: each call trains one batch (forward, loss, backward with the fused sparse
row updates, dense optimizer step) and returns its :class:`StepOutput`; at the end of
the data it raises ``StopIteration``. With ``overlap=True`` one background thread does,
for batch t+1 while batch t trains on the main thread::

    main:        [wait t ready] forward(t) -+- loss, backward(t), optimizer(t) [wait t+1 done]
    background:  next(iterator) -> host->device copy (t+1) -> (gate) -> embedding.prefetch(t+1)
                                            +- gate: the embedding lookups of t are done

* **Reading** batch t+1 from the iterator and its host->device copy start at once.
* **The prefetch** (``HierarchicalEmbeddingBagCollection.prefetch``: the next batch's
  keys found in the host and SSD tiers are brought into the device tier, locked through
  step t+1) starts when the forward of batch t has returned, i.e. once step t's own
  rows are resident and locked: the prefetch then touches only the tiers' maps, free
  slots and unlocked rows, while the backward of step t updates the rows of batch t
  (rows the two batches share stay locked for both, so batch t+1 reads what step t
  wrote). The prefetch creates no rows (new keys are left to step t+1), so it changes
  where rows are, never what a table holds: training, evals and checkpoints see the
  same rows with or without it.
* **Quiescent between calls.** ``progress`` returns once the background work for the
  next batch is finished too, so whatever the caller does between steps (evals,
  checkpoints, reading tier stats) never races the prefetch. Nothing is lost by this:
  step t+1 needs that work done anyway.
* **CUDA.** The background thread runs on a side stream: the batch copy and the
  prefetch's kernels and copies go there. The side stream waits on an event recorded
  on the main stream after the forward of batch t (the gate), the main stream waits on
  an event recorded after the prefetch at the end of ``progress`` (so whatever runs
  between steps, on the GPU too, comes after it), and the batch's tensors are
  ``record_stream``-ed on the main stream (they were allocated on the side one; tier
  state that the prefetch reallocates, the device cache's ``KeyMap`` table, records its
  freeing stream itself). On CPU the stream parts are no-ops and the same code runs.
* **Errors** raised on the background thread (data errors, SSD tier errors, bugs)
  surface on the main thread, with their traceback, when the batch they belong to is
  needed (the next ``progress``); the batch being trained still completes. An error
  on the main thread (a NaN loss refused by ``check_loss``, ``KeyboardInterrupt``)
  closes the pipeline: the background thread is stopped and joined before it
  propagates. Call :meth:`close` when done (or use the pipeline as a context manager).

The data position a checkpoint must save is that of the batches *trained*: the source
has already handed out the next one. :attr:`StepOutput.batch` carries its
``position`` (see ``terarec.data.batch.Batch``); the trainer keeps the last one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from terarec.data.batch import Batch
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.trainer.sync import NoSync, ReplicaSync

log = logging.getLogger("terarec.trainer")

_JOIN_TIMEOUT_S = 60.0


@dataclass
class StepOutput:
    """What one :meth:`TrainPipeline.progress` call trained.

    Attributes:
        loss: the batch's mean loss, a detached scalar tensor on the device.
        logits: ``[B]`` detached logits.
        batch: the batch trained (on the device); ``batch.position`` is the data
            position after it.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    batch: Batch


@dataclass
class PipelineStats:
    """Running totals of the background work (seconds of wall time).

    Attributes:
        steps: batches trained.
        load_s: background time reading batches and issuing their device copies.
        prefetch_s: background time in ``embedding.prefetch``.
        wait_s: main-thread time spent waiting for the background: the part of the
            loading and prefetching that training did not hide.
        skipped: per table, batches whose prefetch did not fit in the device tier
            beside the batch being trained (made resident by their own step instead).
    """

    steps: int = 0
    load_s: float = 0.0
    prefetch_s: float = 0.0
    wait_s: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)

    def copy(self) -> PipelineStats:
        return PipelineStats(
            self.steps, self.load_s, self.prefetch_s, self.wait_s, dict(self.skipped)
        )


class PipelineMeter:
    """Per log interval figures of a pipeline's :class:`PipelineStats`."""

    def __init__(self, stats: PipelineStats) -> None:
        self.stats = stats
        self._last = stats.copy()

    def interval(self) -> dict[str, Optional[float]]:
        """:meth:`figures` since the last call."""
        now = self.stats.copy()
        out = self.figures(now, self._last)
        self._last = now
        return out

    @staticmethod
    def figures(now: PipelineStats, since: PipelineStats) -> dict[str, Optional[float]]:
        """``load_s``, ``prefetch_s`` (background seconds), ``wait_s`` (main-thread
        seconds waiting on them), ``hidden`` (the share of the background work that
        training hid: ``1 - wait_s / (load_s + prefetch_s)``; None without any) and
        ``skipped`` (prefetches that did not fit, all tables) between two snapshots."""
        load = now.load_s - since.load_s
        pre = now.prefetch_s - since.prefetch_s
        wait = now.wait_s - since.wait_s
        work = load + pre
        hidden = None if work <= 0 else min(1.0, max(0.0, 1.0 - wait / work))
        skipped = sum(now.skipped.values()) - sum(since.skipped.values())
        return {
            "load_s": load,
            "prefetch_s": pre,
            "wait_s": wait,
            "hidden": hidden,
            "skipped": float(skipped),
        }


class _Gate:
    """Opens when the forward of the batch being trained has returned (its rows are
    resident and locked); the background prefetch of the next batch waits for it."""

    def __init__(self, cuda: bool) -> None:
        self._opened = threading.Event()
        self.aborted = False
        self.event: Optional[torch.cuda.Event] = torch.cuda.Event() if cuda else None

    def open(self) -> None:
        if self.event is not None:
            self.event.record()  # on the main thread's current stream
        self._opened.set()

    def abort(self) -> None:
        self.aborted = True
        self._opened.set()

    def wait(self) -> bool:
        """Blocks until opened; False when the pipeline is closing instead."""
        self._opened.wait()
        return not self.aborted


@dataclass
class _Job:
    """The background work for one batch, and its outcome."""

    gate: Optional[_Gate]  # None: nothing trains meanwhile (the first batch)
    done: threading.Event = field(default_factory=threading.Event)
    batch: Optional[Batch] = None
    end: bool = False  # the iterator was exhausted
    error: Optional[BaseException] = None
    ready: Optional[torch.cuda.Event] = None  # recorded on the side stream when done
    load_s: float = 0.0
    prefetch_s: float = 0.0
    skipped: list[str] = field(default_factory=list)


class TrainPipeline:
    """Trains one batch per :meth:`progress` call, preparing the next in the background.

    Args:
        model: the CTR model: ``model(dense [B, D], sparse KJT) -> logits [B]``.
        optimizer: the dense optimizer (sparse rows are updated by the fused hooks of
            ``embedding`` during backward).
        embedding: the model's embedding collection (its ``prefetch`` is called for
            the next batch).
        device: where training runs.
        loss_fn: ``loss_fn(logits, labels) -> scalar``; for batches with sample weights
            ``loss_fn(logits, labels, weights)`` (:func:`ctr_loss` takes both).
        overlap: prepare the next batch on a background thread (False: everything in
            the caller's thread, one batch after the other, no prefetch: the plain
            loop, kept as the reference).
        check_loss: called with the loss before backward; raising there stops the
            step before any update (e.g. a NaN loss).
        background_threads: torch intra-op threads of the background thread.
        sync: keeps replicas in step across fast groups (``trainer/sync.py``): called
            after backward and after the dense optimizer step of every step.
        start_step: steps trained before this pipeline (a resumed run's step), so that
            ``sync.after_optimizer_step`` gets the run's step number.

    Example::

        pipe = TrainPipeline(model, opt, model.embedding, device, nn.BCEWithLogitsLoss())
        it = iter(source)
        with pipe:
            while True:
                try:
                    out = pipe.progress(it)
                except StopIteration:
                    break
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        embedding: HierarchicalEmbeddingBagCollection,
        device: torch.device,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        overlap: bool = True,
        check_loss: Optional[Callable[[torch.Tensor], None]] = None,
        background_threads: int = 1,
        sync: Optional[ReplicaSync] = None,
        start_step: int = 0,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.embedding = embedding
        self.device = torch.device(device)
        self.loss_fn = loss_fn
        self.overlap = overlap
        self.check_loss = check_loss
        self.background_threads = background_threads
        self.sync: ReplicaSync = sync if sync is not None else NoSync()
        self.step = start_step  # steps trained, this run's and before a resume
        self.stats = PipelineStats()
        self._cuda = self.device.type == "cuda"
        self._device_index = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if self._cuda
            else None
        )
        self._side: Optional[torch.cuda.Stream] = (
            torch.cuda.Stream(device=self.device) if self._cuda and overlap else None
        )
        self._next: Optional[_Job] = None  # the job preparing the batch to train next
        self._jobs: queue.Queue[Optional[tuple[_Job, Iterator[Batch]]]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._ended = False

    # -- the public face -----------------------------------------------------------
    def progress(self, iterator: Iterator[Batch]) -> StepOutput:
        """Trains the next batch of ``iterator`` and returns what it computed.

        Pass the same iterator on every call. Raises ``StopIteration`` when it is
        exhausted, and re-raises what the background thread raised for this batch.
        """
        if self._ended:
            raise StopIteration
        if self._closed:
            raise RuntimeError("TrainPipeline.progress after close()")
        if not self.overlap:
            return self._step_in_order(iterator)
        try:
            return self._step_overlapped(iterator)
        except BaseException:
            self.close()  # no thread left behind, whatever happened (StopIteration too)
            raise

    def close(self) -> None:
        """Stops the background thread (an in-flight job is abandoned at its next
        check) and joins it. Idempotent; the pipeline cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        job, self._next = self._next, None
        if job is not None and job.gate is not None:
            job.gate.abort()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=_JOIN_TIMEOUT_S)
            if self._thread.is_alive():  # stuck in the data source: it is a daemon
                log.warning("the pipeline's background thread did not stop in %.0fs",
                            _JOIN_TIMEOUT_S)
            self._thread = None

    def __enter__(self) -> TrainPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one step ------------------------------------------------------------------
    def _step_in_order(self, iterator: Iterator[Batch]) -> StepOutput:
        """The plain loop: read, copy, train; the forward makes the rows resident."""
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            self._ended = True
            raise
        batch = batch.to(self.device, non_blocking=True)
        self.stats.load_s += time.perf_counter() - t0
        logits = self.model(batch.dense, batch.sparse)
        out = self._finish_step(batch, logits)
        self.sync.after_optimizer_step(self.step)
        return out

    def _step_overlapped(self, iterator: Iterator[Batch]) -> StepOutput:
        if self._next is None:  # the first batch: nothing trains meanwhile
            self._next = self._submit(iterator, gate=None)
        job = self._next
        self._next = None
        batch = self._collect(job)
        if batch is None:
            self._ended = True
            raise StopIteration
        gate = _Gate(self._cuda)
        self._next = self._submit(iterator, gate)
        logits = self.model(batch.dense, batch.sparse)
        gate.open()  # this batch's rows are resident and locked: prefetch the next
        out = self._finish_step(batch, logits)
        t0 = time.perf_counter()
        self._wait_done(self._next)  # quiescent between calls (errors surface when needed)
        self.stats.wait_s += time.perf_counter() - t0
        self._main_waits_for(self._next)  # evals, saves, stats: after it on the GPU too
        # After the prefetch of the next batch, never beside it: a k-step merge reads
        # and writes rows in every tier, which the prefetch moves between tiers.
        self.sync.after_optimizer_step(self.step)
        return out

    def _finish_step(self, batch: Batch, logits: torch.Tensor) -> StepOutput:
        loss = (self.loss_fn(logits, batch.labels) if batch.weights is None
                else self.loss_fn(logits, batch.labels, batch.weights))  # type: ignore[call-arg]
        if self.check_loss is not None:
            self.check_loss(loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the sparse rows are updated by the fused hooks here
        # Where replicas across fast groups are kept in step (k = 1: grads averaged
        # before the step; k-step merging: after it, once the pipeline is quiescent, in
        # progress()).
        self.sync.before_optimizer_step()
        self.optimizer.step()
        self.step += 1
        self.stats.steps += 1
        return StepOutput(loss.detach(), logits.detach(), batch)

    # -- the background side -------------------------------------------------------
    def _submit(self, iterator: Iterator[Batch], gate: Optional[_Gate]) -> _Job:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._worker, name="terarec-pipeline", daemon=True
            )
            self._thread.start()
        job = _Job(gate)
        self._jobs.put((job, iterator))
        return job

    def _collect(self, job: _Job) -> Optional[Batch]:
        """Waits for ``job``; its batch ready for the main stream (None at the end)."""
        t0 = time.perf_counter()
        self._wait_done(job)
        self.stats.wait_s += time.perf_counter() - t0
        self.stats.load_s += job.load_s
        self.stats.prefetch_s += job.prefetch_s
        for name in job.skipped:
            self.stats.skipped[name] = self.stats.skipped.get(name, 0) + 1
        if job.error is not None:
            raise job.error  # keeps the background thread's traceback
        if job.end:
            return None
        batch = job.batch
        assert batch is not None
        if self._cuda:
            self._main_waits_for(job)
            batch.record_stream(torch.cuda.current_stream(self.device))
        return batch

    def _wait_done(self, job: _Job) -> None:
        """Waits for ``job``; never forever on a background thread that died."""
        while not job.done.wait(1.0):
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the training pipeline's background thread died")

    def _main_waits_for(self, job: _Job) -> None:
        """Orders the main stream's later work after ``job``'s side-stream work (the
        CPU does not wait)."""
        if job.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(job.ready)

    def _setup_thread(self) -> None:
        if self._cuda:
            torch.cuda.set_device(self._device_index)
        # Intra-op threads are per thread (OpenMP): the background work (hash probes,
        # row copies, RocksDB reads on RocksDB's own threads) gets one, so that it does
        # not compete with the training step's threads for the cores.
        torch.set_num_threads(self.background_threads)

    def _worker(self) -> None:
        setup_error: Optional[BaseException] = None
        try:
            self._setup_thread()
        except BaseException as e:  # noqa: BLE001 - every job reports it
            setup_error = e
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, iterator = item
            try:
                if setup_error is not None:
                    raise setup_error
                self._run(job, iterator)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                job.error = e
            finally:
                self._record_ready(job)
                job.done.set()

    def _run(self, job: _Job, iterator: Iterator[Batch]) -> None:
        stream = torch.cuda.stream(self._side) if self._side is not None else nullcontext()
        with stream, torch.no_grad():
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                job.end = True
                return
            batch = batch.to(self.device, non_blocking=True)
            t1 = time.perf_counter()
            job.load_s = t1 - t0
            if job.gate is not None:
                if not job.gate.wait():
                    return  # closing
                t1 = time.perf_counter()
                if self._side is not None and job.gate.event is not None:
                    self._side.wait_event(job.gate.event)
            job.skipped = self.embedding.prefetch(batch.sparse)
            job.prefetch_s = time.perf_counter() - t1
            job.batch = batch

    def _record_ready(self, job: _Job) -> None:
        """Marks the end of ``job``'s work on the side stream (also after an error)."""
        if self._side is not None:
            job.ready = torch.cuda.Event()
            job.ready.record(self._side)


class TrainedPosition:
    """The data position after the last batch *trained*, for checkpoints.

    The pipeline reads the next batch while one trains, so the source's own position
    is a batch ahead; a resumed run must start with the batch after the last one
    trained. Before any step it is the source's starting position.
    """

    def __init__(self, source: Any) -> None:
        self._source = source
        self._state: Optional[dict[str, Any]] = None
        if hasattr(source, "state_dict"):
            self._state = dict(source.state_dict())

    def advance(self, batch: Batch) -> None:
        if batch.position is not None:
            self._state = dict(batch.position)

    def state_dict(self) -> dict[str, Any]:
        return {} if self._state is None else dict(self._state)


def ctr_loss(logits: torch.Tensor, labels: torch.Tensor,
             weights: Optional[torch.Tensor] = None,
             task_weights: Union[Sequence[float], torch.Tensor, None] = None) -> torch.Tensor:
    """Binary cross-entropy on logits ``[B]``, the mean over the batch; with sample
    ``weights [B]`` the mean of ``weight * loss`` (torch's ``weight=``).

    Several tasks (logits and labels ``[B, T]``): each task's mean over the batch,
    summed over the tasks with ``task_weights`` (``T`` numbers; None: all 1).
    """
    w = None if task_weights is None else torch.as_tensor(
        task_weights, dtype=logits.dtype, device=logits.device)
    if logits.dim() == 1:
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=weights)
        return loss if w is None else loss * w[0]
    per = nn.functional.binary_cross_entropy_with_logits(
        logits, labels, weight=None if weights is None else weights.unsqueeze(1),
        reduction="none").mean(0)  # [T]
    return per.sum() if w is None else (per * w).sum()


def loss_for(task_weights: Sequence[float]) -> Callable[..., torch.Tensor]:
    """The training loss: :func:`ctr_loss` with ``model.task_weights`` (empty: all 1),
    the weights made a tensor once per device rather than every step."""
    if not task_weights:
        return ctr_loss
    on: dict[torch.device, torch.Tensor] = {}

    def loss(logits: torch.Tensor, labels: torch.Tensor,
             weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = on.get(logits.device)
        if w is None:
            w = on[logits.device] = torch.tensor(list(task_weights), dtype=logits.dtype,
                                                 device=logits.device)
        return ctr_loss(logits, labels, weights, w)

    return loss

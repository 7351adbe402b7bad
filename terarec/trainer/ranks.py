"""The trainer's view of a multi-rank job: group handles and the few collectives it adds.

The launch layer (``terarec.launch.init_distributed``) builds the process groups; the
trainer never imports it (the import direction of docs/design.md) and takes a
:class:`terarec.runtime.DistHandles` (``terarec.launch.DistContext`` is one).

Besides the embedding exchange (``ps/``), DDP and the replica sync (``trainer/sync.py``),
a multi-rank run needs every rank to take the same decisions at the same step, or the
next collective deadlocks:

* **end of data**: shards can hold different row counts; :class:`AgreedEnd` stops every
  rank's stream when the first one runs out (one tiny all-reduce per batch, on a gloo
  group of its own, only for finite streams).
* **evals**: eval shards differ by up to one batch; :func:`eval_batches` pads the ranks
  that ran out with a one-row dummy batch whose predictions are dropped, so that every
  rank takes part in every forward's exchange.
* **logs**: the loss, rows and samples of a log line are summed over the ranks
  (:class:`StepTally`, :func:`all_sum`), every rank at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.data.batch import Batch
from terarec.runtime import DistHandles


def is_rank0(d: Optional[DistHandles]) -> bool:
    """Whether this process writes the run's logs, summary and shared checkpoint files."""
    return d is None or d.rank == 0


def all_sum(values: Sequence[float], d: Optional[DistHandles]) -> list[float]:
    """``values`` summed over every rank (float64; as they are in one process)."""
    if d is None or d.world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device(d))
    dist.all_reduce(t, group=d.world)
    return t.tolist()


def any_rank(flag: bool, d: Optional[DistHandles]) -> bool:
    """Whether ``flag`` is true on some rank (every rank must call it)."""
    if d is None or d.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_collective_device(d))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.world)
    return bool(t.item())


def _collective_device(d: DistHandles) -> torch.device:
    """Where tensors for collectives on the world group live (NCCL: the rank's GPU)."""
    backend = dist.get_backend(d.world)
    return d.device if backend == "nccl" else torch.device("cpu")


def all_fast_groups(d: DistHandles) -> list[tuple[int, ...]]:
    """Every fast group of the job, sorted (a collective: every rank calls it)."""
    out: list[Optional[tuple[int, ...]]] = [None] * d.world_size
    dist.all_gather_object(out, tuple(d.fast_ranks), group=d.world)
    return sorted({g for g in out if g is not None})


def fast_group_twin(d: DistHandles) -> dist.ProcessGroup:
    """A second process group with the members of this rank's fast group, for the
    collectives of the pipeline's background thread (the embedding prefetch), which
    must not interleave with the main thread's on the fast group itself. Every rank
    creates one per fast group, in the same order (a collective)."""
    mine: Optional[dist.ProcessGroup] = None
    for g in all_fast_groups(d):
        pg = dist.new_group(list(g))
        if d.rank in g:
            mine = pg
    assert mine is not None
    return mine


def broadcast_dense(model: nn.Module, d: DistHandles) -> None:
    """Copies global rank 0's dense parameters and buffers to every rank.

    Every rank built the model from the same seed, so this is a check as much as a
    copy: the replicas of every fast group start from the very same weights whatever
    the ranks' RNG did before.
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0, group=d.world)


def wrap_ddp(model: nn.Module, d: DistHandles) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` on the fast group (dense grads averaged
    over it during backward); the model itself when the fast group is one rank.

    ``device_ids`` stays unset: the inputs (a ``KeyedJaggedTensor``) are already on the
    rank's device, and DDP must not try to move them.
    """
    if d.local_world_size <= 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        process_group=d.fast_group,
        find_unused_parameters=False,
    )


class AgreedEnd:
    """Iterates ``batches`` until *any* rank's stream ends; then every rank stops.

    Each ``next`` all-gathers every rank's batch size (0: none left) over ``group`` (a
    gloo group of its own: the pipeline reads batches on a background thread while the
    main thread's collectives run on the other groups). Every rank stops when one has
    no batch left, or when the ranks' batches differ in size (the short last batch of
    a finite pass): each rank's loss is the mean over its own batch and gradients are
    averaged over the ranks, which is the global batch's mean only for equal batches.
    Those batches are dropped, as ``torch.utils.data.DistributedSampler(drop_last=True)``
    would (one process would still train the last, short one).
    """

    def __init__(self, batches: Iterable[Batch], group: Optional[dist.ProcessGroup]) -> None:
        self._it = iter(batches)
        self._group = group
        self._ended = False
        self.dropped = 0  # batches this rank had when a peer ran out

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._ended:
            raise StopIteration
        batch = next(self._it, None)
        size = torch.tensor([0 if batch is None else batch.batch_size], dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(self._group))]
        dist.all_gather(sizes, size, group=self._group)
        if len({int(t.item()) for t in sizes}) > 1 or int(size.item()) == 0:
            self._ended = True
            self.dropped += int(batch is not None)
            raise StopIteration
        assert batch is not None
        return batch


def dummy_batch(sparse_features: Sequence[str], num_dense: int) -> Batch:
    """A one-row batch (zeros, key 0 for every feature) for a rank with nothing to
    evaluate while its peers still have batches; its predictions are dropped."""
    n = len(sparse_features)
    sparse = KeyedJaggedTensor(
        keys=list(sparse_features),
        values=torch.zeros(n, dtype=torch.int64),
        lengths=torch.ones(n, dtype=torch.int32),
        stride=1,
    )
    return Batch(torch.zeros(1, num_dense), sparse, torch.zeros(1))


def eval_batches(
    batches: Iterable[Batch],
    d: Optional[DistHandles],
    dummy: Optional[Batch],
    max_batches: Optional[int] = None,
) -> Iterator[tuple[Batch, bool]]:
    """``(batch, real)`` pairs: this rank's batches (``real``), then dummies until every
    rank's shard is done, so all ranks run the same number of forwards (each one an
    exchange inside the fast group). One process: just its batches.

    Args:
        batches: this rank's eval shard.
        d: the job (None: one process).
        dummy: the padding batch (:func:`dummy_batch`); required with several ranks.
        max_batches: cap on this rank's batches.
    """
    if d is not None and d.world_size > 1 and dummy is None:
        raise ValueError("eval_batches: several ranks need a dummy batch to pad with")
    it = iter(batches)
    count = 0
    while True:
        batch = None if max_batches is not None and count >= max_batches else next(it, None)
        if d is None or d.world_size == 1:
            if batch is None:
                return
        elif not any_rank(batch is not None, d):
            return
        count += 1
        if batch is not None:
            yield batch, True
        else:
            assert dummy is not None
            yield dummy, False


class StepTally:
    """Per log interval: every step's loss and samples, summed over the ranks when the
    interval is logged (one all-reduce per log line), so that the logged loss is the
    mean over steps of each step's loss over the global batch, as in one process."""

    def __init__(self, samples: int) -> None:
        self.samples = samples  # global, as of the last :meth:`flush`
        self.pending = 0  # this rank's samples since then
        self.weighted: list[Any] = []  # per step: loss x batch size (float or 0-d tensor)
        self.sizes: list[float] = []

    def add(self, loss: Union[float, torch.Tensor], batch_size: int) -> None:
        """Adds one step; a tensor ``loss`` stays on its device until :meth:`flush` (no
        host sync per step)."""
        self.pending += batch_size
        self.weighted.append(loss * batch_size)
        self.sizes.append(float(batch_size))

    def flush(self, d: Optional[DistHandles], extra: list[float]) -> tuple[float, list[float]]:
        """Sums the interval and ``extra`` over the ranks; returns (mean loss, extra)."""
        n = len(self.weighted)
        tensors = [w for w in self.weighted if isinstance(w, torch.Tensor)]
        if tensors:  # one host sync for the interval
            values = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist())
            self.weighted = [next(values) if isinstance(w, torch.Tensor) else w
                             for w in self.weighted]
        out = all_sum([*self.weighted, *self.sizes, float(self.pending), *extra], d)
        self.samples += int(out[2 * n])
        losses = [w / s for w, s in zip(out[:n], out[n: 2 * n]) if s > 0]
        self.weighted.clear()
        self.sizes.clear()
        self.pending = 0
        return (sum(losses) / len(losses) if losses else math.nan), out[2 * n + 1:]

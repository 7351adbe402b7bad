"""The unit every reader yields: one mini-batch of dense features, sparse keys, labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """One mini-batch.

    Attributes:
        dense: float32 ``[B, D]`` dense features (``D`` may be 0).
        sparse: KeyedJaggedTensor of int64 keys, feature-major: for keys ``[f0, f1]`` and
            ``B = 2``, ``lengths = [l(f0,s0), l(f0,s1), l(f1,s0), l(f1,s1)]`` and
            ``values`` concatenates the keys in that order.
        labels: float32 ``[B]`` in {0, 1}; multi-task data: ``[B, T]``, one column per
            task (``terarec.data.task_names``).
        position: the reader's resume state *after* this batch (see ``state_dict``).
        teacher_prob: synthetic data only: the planted teacher's P(y=1) ``[B]`` (``[B,
            T]``), from which the Bayes-optimal (oracle) AUC is computed.
        weights: float32 ``[B]`` sample weights of the loss (a ``csv.weight`` column), or
            None (every sample 1).
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    position: Optional[dict[str, Any]] = field(default=None, compare=False)
    teacher_prob: Optional[torch.Tensor] = None  # synthetic data: the planted P(y=1), [B]
    weights: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            position=self.position,
            teacher_prob=self.teacher_prob,
            weights=None if self.weights is None else self.weights.to(
                device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: Any) -> None:
        """Marks the batch's CUDA tensors as used on ``stream``, so that memory
        allocated on another stream (a producer's side stream) is not reused before
        ``stream``'s work on it is done."""
        for t in (self.dense, self.labels, self.teacher_prob, self.weights):
            if t is not None and t.is_cuda:
                t.record_stream(stream)
        if self.sparse.values().is_cuda:
            self.sparse.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            position=self.position,
            teacher_prob=self.teacher_prob,
            weights=None if self.weights is None else self.weights.pin_memory(),
        )

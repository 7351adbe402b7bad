"""The ``dist:`` and ``sync:`` sections: how the ranks of a job train together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from terarec.config.base import StrEnum
from terarec.config.base import check as _check

# ---------------------------------------------------------------------------- dist


class DistBackend(StrEnum):
    AUTO = "auto"  # nccl when the rank's device is CUDA, gloo on CPU
    NCCL = "nccl"
    GLOO = "gloo"


@dataclass
class DistConfig:
    """Process-group setup of a multi-process run (docs/distributed.md).

    The launch itself (ranks, world size, rendezvous endpoint) comes from the launcher's
    environment (torchrun, mpirun, Slurm), read by ``terarec.launch`` only.

    Attributes:
        backend: ``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``.
        timeout_s: the longest any rank waits for another: rendezvous, a collective, a
            silent peer. Past it the waiting ranks fail with an error naming the rank.
        master_addr: mpirun / Slurm only: the address the ranks reach rank 0 at (default:
            loopback when every rank is on one host, else rank 0's host name). torchrun
            passes its own.
        master_port: mpirun / Slurm only: rank 0's rendezvous port (0: mpirun lets rank 0
            pick a free one; Slurm derives one from the job and step ids).
    """

    backend: DistBackend = DistBackend.AUTO
    timeout_s: float = 300.0
    master_addr: Optional[str] = None
    master_port: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.backend, DistBackend):  # built in code from a string
            try:
                self.backend = DistBackend.from_str(self.backend)  # type: ignore[assignment]
            except ValueError as e:
                raise ValueError(f"backend: {e}") from None
        _check(self.timeout_s > 0, f"timeout_s: must be > 0, got {self.timeout_s}")
        _check(
            self.master_addr is None or bool(self.master_addr),
            "master_addr: must be a host name or address (or null), got ''",
        )
        _check(
            0 <= self.master_port < 65536,
            f"master_port: must be in [0, 65535], got {self.master_port}",
        )


# ---------------------------------------------------------------------------- sync


class DenseMerge(StrEnum):
    """How a k-step merge combines the replicas' dense weights."""

    PARAMS = "params"  # average the parameters
    PARAMS_MOMENTS = "params+moments"  # ... and the dense optimizer's state (Adam moments)
    DILOCO = "diloco"  # average the delta since the last merge, outer SGD-Nesterov step


class SparseMerge(StrEnum):
    """How a k-step merge combines the rows touched since the last merge."""

    DELTA = "delta"  # snapshot + mean over replicas of (weights - snapshot)
    DELTA_M = "delta+m"  # the same for the weights and Adam's first moment
    DELTA_MOMENTS = "delta+moments"  # the same for the row's whole optimizer state


class WireDtype(StrEnum):
    """How the rows' deltas travel in a k-step merge (docs/kstep.md, optim/row_codec.py)."""

    FP32 = "fp32"  # exact
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"  # weights: symmetric absmax per row (bf16 scale); optimizer state bf16


@dataclass
class SyncConfig:
    """Keeping replicas (fast groups, one per node) in step across nodes (docs/kstep.md).

    Attributes:
        k: steps between merges; 1 = fully synchronous (gradients combined over the
            cross group every step, no merging).
        dense: ``params`` | ``params+moments`` | ``diloco``.
        sparse: ``delta`` | ``delta+m`` (the weights and Adam's first moment; needs
            the ``adam`` row optimizer) | ``delta+moments`` (the whole row).
        sparse_dtype: how the rows' deltas travel: ``fp32`` (exact) | ``bf16`` |
            ``fp16`` | ``int8`` (the weights' delta, and with ``delta+m`` the first
            moment's, quantised per row; other optimizer state as bf16); every replica
            decodes the same messages, so the merged rows stay identical on all of them.
        dense_dtype: how the dense merge travels: ``fp32`` (the parameters averaged
            exactly) | ``bf16`` (their change since the last merge, rounded to
            bfloat16 with error feedback; ``params`` and ``diloco`` only).
        warmup_steps: synchronous steps (as k = 1) before local steps start.
        outer_lr, outer_momentum: DiLoCo's outer Nesterov step (paper defaults).
    """

    k: int = 1
    dense: DenseMerge = DenseMerge.PARAMS
    sparse: SparseMerge = SparseMerge.DELTA
    sparse_dtype: WireDtype = WireDtype.FP32
    dense_dtype: WireDtype = WireDtype.FP32
    warmup_steps: int = 0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9

    def __post_init__(self) -> None:
        for key, enum_cls in (
            ("dense", DenseMerge),
            ("sparse", SparseMerge),
            ("sparse_dtype", WireDtype),
            ("dense_dtype", WireDtype),
        ):
            if not isinstance(getattr(self, key), enum_cls):  # built in code from a string
                try:
                    setattr(self, key, enum_cls.from_str(getattr(self, key)))
                except ValueError as e:
                    raise ValueError(f"{key}: {e}") from None
        _check(
            isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1,
            f"k: must be a positive number of steps, got {self.k!r}",
        )
        _check(
            self.dense_dtype in (WireDtype.FP32, WireDtype.BF16),
            f"dense_dtype: must be one of [fp32, bf16], got {self.dense_dtype.value!r}",
        )
        _check(
            self.dense_dtype == WireDtype.FP32 or self.dense != DenseMerge.PARAMS_MOMENTS,
            "dense_dtype: bf16 merges the parameters' change (dense: params or diloco); "
            "dense: params+moments averages the optimizer state too and needs fp32",
        )
        _check(self.warmup_steps >= 0, f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        _check(self.outer_lr > 0, f"outer_lr: must be > 0, got {self.outer_lr}")
        _check(
            0 <= self.outer_momentum < 1,
            f"outer_momentum: must be in [0, 1), got {self.outer_momentum}",
        )

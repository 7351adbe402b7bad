"""Where this process runs: its device and its place in a multi-rank job.

A leaf every layer may import (torch only):

* :func:`resolve_device`: ``train.device`` (auto | cpu | cuda | cuda:N) -> the device of
  this rank; the trainer (one process) and the launcher (one per rank) both use it;
* :class:`DistHandles`: this rank's place in the job and its process groups, as the
  trainer uses them; ``terarec.launch.DistContext`` extends it with what the launcher
  keeps (backend, rendezvous, health monitor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class DeviceUnavailable(ValueError):
    """``train.device`` names a device this machine does not have.

    Attributes:
        per_rank: the error depends on the rank's place (its local rank), so a launcher
            names the rank; False when every rank of the job hits the same error.
    """

    def __init__(self, message: str, per_rank: bool = False) -> None:
        super().__init__(message)
        self.per_rank = per_rank


def resolve_device(
    preference: str, local_rank: int = 0, local_world_size: int = 1
) -> torch.device:
    """The device of a rank for ``train.device``.

    Args:
        preference: ``auto`` (CUDA when available, else cpu), ``cpu``, ``cuda`` or
            ``cuda:N``.
        local_rank, local_world_size: the rank's position in / the size of its node's
            group of ranks: ``auto`` / ``cuda`` take ``cuda:<local rank>`` when the
            node's GPUs are all visible, ``cuda:0`` when the launcher gave each rank one
            (``CUDA_VISIBLE_DEVICES``).
    Raises:
        DeviceUnavailable: CUDA asked for and not available; ``cuda:N`` for several ranks
            of a node; more ranks than visible GPUs.
    """
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda:"):
        if local_world_size > 1:
            raise DeviceUnavailable(
                f"train.device={preference} names one GPU for all {local_world_size} ranks "
                "of a node: use auto or cuda (each rank takes its local rank's GPU)"
            )
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"train.device={preference} but CUDA is not available here")
        return torch.device(preference)
    if preference not in ("auto", "cuda"):
        raise DeviceUnavailable(
            f"train.device={preference}: expected auto, cpu, cuda or cuda:N"
        )
    if not torch.cuda.is_available():
        if preference == "cuda":
            raise DeviceUnavailable("train.device=cuda but CUDA is not available here")
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank < n:
        return torch.device("cuda", local_rank)
    if n == 1:
        return torch.device("cuda", 0)
    raise DeviceUnavailable(f"local rank {local_rank} but {n} GPUs are visible", per_rank=True)


@dataclass
class DistHandles:
    """This rank's place in the job and its process groups.

    Attributes:
        rank, world_size: global rank and number of ranks.
        local_rank, local_world_size: position in / size of this rank's fast group.
        node, num_nodes: this rank's fast group and the number of fast groups.
        device: this rank's device.
        world, fast_group, cross_group: the process groups (world = the default one).
        fast_ranks, cross_ranks: the global ranks of the fast and cross groups.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: int
    num_nodes: int
    device: torch.device
    world: dist.ProcessGroup
    fast_group: dist.ProcessGroup
    cross_group: dist.ProcessGroup
    fast_ranks: tuple[int, ...]
    cross_ranks: tuple[int, ...]

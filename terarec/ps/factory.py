"""The one place that decides which tiers a table gets from its config.

| config | chain (top to bottom) |
|---|---|
| no ``device_rows`` | none: the table trains in one unbounded :class:`HostTier` |
| ``device_rows`` | device :class:`CacheTier` over an unbounded host :class:`HostTier` |
| ``device_rows`` + ``host_rows`` | device cache over a host cache over the SSD tier |

Everything else (policy, pinned host memory on CUDA machines, scratch pad, TTL) comes
from the same :class:`~terarec.config.TableConfig`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from terarec.config import TableConfig
from terarec.ps.cache_tier import CacheTier
from terarec.ps.chain import TierChain
from terarec.ps.host_tier import HostTier
from terarec.ps.tier import Tier


def build_chain(
    cfg: TableConfig,
    row_width: int,
    device: torch.device | str,
    ssd: Optional[Tier] = None,
) -> Optional[TierChain]:
    """The tier chain of table ``cfg``, or None when it has no budgets.

    Args:
        cfg: the table's config (``device_rows``, ``host_rows``, ``cache_policy``,
            ``scratch_pad``, ``ttl_steps``).
        row_width: floats per row (dim + optimizer state).
        device: where the device tier lives (and training computes).
        ssd: the table's SSD tier (an ``SSDTier`` on the rank's store); required with
            ``host_rows``, since a bounded host tier evicts into it.
    Raises:
        ValueError: ``host_rows`` without an SSD tier.
    """
    if cfg.device_rows is None:
        return None
    policy = cfg.cache_policy
    tiers: list[Any] = [
        CacheTier(row_width, cfg.device_rows, device, policy, "device")  # type: ignore[arg-type]
    ]
    if cfg.host_rows is None:
        tiers.append(HostTier(row_width, "cpu"))
    else:
        if ssd is None:
            raise ValueError(
                f"table {cfg.name}: host_rows bounds the host tier, so evicted rows need "
                "the SSD tier below it: configure an SSD path"
            )
        pin = torch.cuda.is_available()  # fast copies to and from the GPU
        host = CacheTier(row_width, cfg.host_rows, "cpu", policy, "host", pin)  # type: ignore[arg-type]
        tiers += [host, ssd]
    return TierChain(
        tiers,
        cfg.name,
        scratch_pad=cfg.scratch_pad,
        ttl_steps=cfg.ttl_steps,
    )

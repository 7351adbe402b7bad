"""The one place that decides from a table's config which store and tiers hold its rows.

| config | store: tiers top to bottom |
|---|---|
| no ``device_rows`` | ``FlatStore``: one unbounded ``HostTier`` on the training device |
| ``device_rows`` | ``TierChain``: device ``CacheTier`` over an unbounded host ``HostTier`` |
| ``device_rows`` + ``host_rows`` | ``TierChain``: device cache, host cache, ``SSDTier`` |

Everything else (policy, pinned host memory on CUDA machines, scratch pad, TTL) comes
from the same :class:`~terarec.config.TableConfig`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from terarec.config import TableConfig
from terarec.ps.cache_tier import CacheTier
from terarec.ps.chain import TierChain
from terarec.ps.flat_store import FlatStore
from terarec.ps.host_tier import HostTier
from terarec.ps.ssd_tier import SSDStore, SSDTier
from terarec.ps.store import SlotStore


def is_tiered(cfg: TableConfig) -> bool:
    """Whether the table's rows are cached per batch in a tier chain (it has budgets)."""
    return cfg.device_rows is not None


def build_store(
    cfgs: list[TableConfig],
    row_width: int,
    device: torch.device | str,
    ssd_store: Optional[SSDStore] = None,
    table_id: int = 0,
) -> SlotStore:
    """The slot store of a group of tables (one, when tiered).

    Args:
        cfgs: the group's tables (``device_rows``, ``host_rows``, ``cache_policy``,
            ``scratch_pad``, ``ttl_steps``; equal for every table but the name).
        row_width: floats per row (dim + optimizer state).
        device: where the device tier lives (and training computes).
        ssd_store: the rank's SSD store; required with ``host_rows``, since a bounded
            host tier evicts into it.
        table_id: the table's id in the SSD store.
    Raises:
        ValueError: ``host_rows`` without an SSD store; budgets on a group of tables.
    """
    device = torch.device(device)
    cfg = cfgs[0]
    if not is_tiered(cfg):
        return FlatStore(row_width, device, len(cfgs), cfg.ttl_steps)
    if len(cfgs) != 1:
        raise ValueError("tier budgets are per table: a budgeted table is its own group")
    policy = cfg.cache_policy
    assert cfg.device_rows is not None
    tiers: list[Any] = [
        CacheTier(row_width, cfg.device_rows, device, policy, "device")  # type: ignore[arg-type]
    ]
    if cfg.host_rows is None:
        tiers.append(HostTier(row_width, "cpu"))
    else:
        if ssd_store is None:
            raise ValueError(
                f"table {cfg.name}: host_rows bounds the host tier, so evicted rows need "
                "the SSD tier below it: configure an SSD path"
            )
        pin = torch.cuda.is_available()  # fast copies to and from the GPU
        host = CacheTier(row_width, cfg.host_rows, "cpu", policy, "host", pin)  # type: ignore[arg-type]
        tiers += [host, SSDTier(ssd_store, row_width, table_id=table_id)]
    return TierChain(tiers, cfg.name, scratch_pad=cfg.scratch_pad, ttl_steps=cfg.ttl_steps)

"""The one place that decides from a table's config which store and tiers hold its rows.

| config | store: tiers top to bottom |
|---|---|
| no ``device_rows`` | ``FlatStore``: one unbounded ``HostTier`` on the training device |
| ``device_rows`` | ``TierChain``: device ``CacheTier`` over an unbounded host ``HostTier`` |
| ``device_rows`` + ``host_rows`` | ``TierChain``: device cache, host cache, ``SSDTier`` |

Several tiered tables of a group: a ``TieredStore`` over one chain per table whose
device tiers share one row array.

Everything else (policy, pinned host memory on CUDA machines, scratch pad, TTL) comes
from the same :class:`~terarec.config.TableConfig`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from terarec.config import TableConfig
from terarec.ps.store.chain import TierChain
from terarec.ps.store.flat import FlatStore
from terarec.ps.store.protocol import SlotStore
from terarec.ps.store.tiered import TieredStore
from terarec.ps.tiers.cache import CacheTier
from terarec.ps.tiers.host import HostTier
from terarec.ps.tiers.ssd import SSDStore, SSDTier


def is_tiered(cfg: TableConfig) -> bool:
    """Whether the table's rows are cached per batch in a tier chain (it has budgets)."""
    return cfg.device_rows is not None


def build_store(
    cfgs: list[TableConfig],
    row_width: int,
    device: torch.device | str,
    ssd_store: Optional[SSDStore] = None,
    table_ids: Optional[list[int]] = None,
    salts: Optional[list[int]] = None,
) -> SlotStore:
    """The slot store of a group of tables.

    Args:
        cfgs: the group's tables (``device_rows``, ``host_rows``, ``cache_policy``,
            ``scratch_pad``, ``ttl_steps``).
        row_width: floats per row (dim + optimizer state).
        device: where the device tier lives (and training computes).
        ssd_store: the rank's SSD store; required with ``host_rows``, since a bounded
            host tier evicts into it.
        table_ids: the tables' ids in the SSD store (default ``0 .. len(cfgs) - 1``).
        salts: the tables' key-namespace salts (several tiered tables; default 0s).
    Raises:
        ValueError: ``host_rows`` without an SSD store.
    """
    device = torch.device(device)
    if not is_tiered(cfgs[0]):
        return FlatStore(row_width, device, len(cfgs), cfgs[0].ttl_steps)
    ids = list(range(len(cfgs))) if table_ids is None else table_ids
    if len(cfgs) == 1:
        return _chain(cfgs[0], row_width, device, ssd_store, ids[0])
    caps = [c.device_rows or 0 for c in cfgs]
    storage = torch.zeros(sum(caps), row_width, device=device)
    parts = torch.split(storage, caps)
    chains = [
        _chain(c, row_width, device, ssd_store, i, rows)
        for c, i, rows in zip(cfgs, ids, parts)
    ]
    return TieredStore(storage, chains, salts or [0] * len(cfgs))


def _chain(
    cfg: TableConfig,
    row_width: int,
    device: torch.device,
    ssd_store: Optional[SSDStore],
    table_id: int,
    rows: Optional[torch.Tensor] = None,
) -> TierChain:
    """The tier chain of one table (its device tier over ``rows`` when given)."""
    assert cfg.device_rows is not None
    policy = cfg.cache_policy
    tiers: list[Any] = [
        CacheTier(row_width, cfg.device_rows, device, policy, "device", rows=rows)  # type: ignore[arg-type]
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

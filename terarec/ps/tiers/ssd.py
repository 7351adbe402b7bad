"""SSD tier: one table's rows on the rank's :class:`~terarec.ps.tiers.ssd_store.SSDStore`.

The bottom tier of a table with a ``host_rows`` budget: every row the host tier evicts
lands here, and every row ever trained is found here (or above). The DB layout, the
hot path and durability are described in ``ps/tiers/ssd_store.py``; see also
``docs/tiers.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch

from terarec.ps.tiers.protocol import LAST, META_WIDTH, Rows, Spare, check_batch
from terarec.ps.tiers.ssd_format import decode_keys, encode_keys, pack_rows
from terarec.ps.tiers.ssd_store import (
    SSDCompression,
    SSDStore,
    SSDTierConfig,
    SSDTierError,
    as_keys,
    rank_dir,
)

__all__ = [  # the store's names too: SSD tier users import them from here
    "SSDCompression",
    "SSDStore",
    "SSDTier",
    "SSDTierConfig",
    "SSDTierError",
    "decode_keys",
    "encode_keys",
    "pack_rows",
    "rank_dir",
]


# --------------------------------------------------------------------------- tier


class SSDTier:
    """The :class:`~terarec.ps.tiers.protocol.Tier` of one table on an :class:`SSDStore`.

    Several tiers (tables) can share one store; each sees only its ``table_id``.

    Args:
        store: the rank's store.
        row_width: floats per row; recorded in the DB and checked on reopen.
        table_id: the table's id inside the store (``[0, 2**32 - 2]``).

    Example::

        tier = SSDTier.open(SSDTierConfig(path="/nvme/run1/ssd"), row_width=192, rank=0)
        tier.insert(torch.tensor([7, -3]), rows)          # rows: float32 [2, 192]
        missed = tier.find(torch.tensor([7, 9]), out)      # -> tensor([1]); out[0] filled
        tier.flush()                                       # durable (checkpoint)
    """

    name = "ssd"

    def __init__(self, store: SSDStore, row_width: int, table_id: int = 0) -> None:
        self.has_meta = store.register(table_id, row_width)
        self.store = store
        self.row_width = row_width
        self.table_id = table_id
        # float32 words per stored value: the row, then (last_step, freq) as 2 int64 = 4
        # float32 (read by code that scans a store directly)
        self.stored_width = row_width + (2 * META_WIDTH if self.has_meta else 0)
        self._owns_store = False
        self._hits = self._misses = self._inserts = self._writes = self._deletes = 0
        self._expired = 0

    @classmethod
    def open(
        cls, config: SSDTierConfig, row_width: int, rank: int = 0, table_id: int = 0
    ) -> SSDTier:
        """A tier on its own store ``<config.path>/rank{rank}``, closed by :meth:`close`."""
        store = SSDStore.for_rank(config, rank)
        try:
            tier = cls(store, row_width, table_id)
        except BaseException:
            store.close()
            raise
        tier._owns_store = True
        return tier

    def close(self) -> None:
        """Flushes; closes the store if this tier opened it."""
        if self._owns_store:
            self.store.close()
        else:
            self.store.flush()

    def __enter__(self) -> SSDTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.store.count(self.table_id)

    # -- Tier protocol -------------------------------------------------------------
    def find(
        self, keys: torch.Tensor, out: torch.Tensor, meta: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        check_batch(self.name, self.row_width, keys, out, meta, what="out")
        hit_pos, vals, miss_pos = self.store.read(self.table_id, as_keys(keys), self.stored_width)
        if hit_pos.size:
            idx = torch.from_numpy(hit_pos).to(out.device)
            out[idx] = torch.from_numpy(vals[:, : self.row_width]).to(out.device, out.dtype)
            if meta is not None:
                meta[idx.to(meta.device)] = torch.from_numpy(self._meta_of(vals)).to(meta.device)
        self._hits += int(hit_pos.size)
        self._misses += int(miss_pos.size)
        return torch.from_numpy(miss_pos).to(keys.device)

    def insert(
        self, keys: torch.Tensor, rows: torch.Tensor, meta: Optional[torch.Tensor] = None
    ) -> Rows:
        check_batch(self.name, self.row_width, keys, rows, meta)
        k = as_keys(keys)
        r = rows.detach().to("cpu", torch.float32).numpy()
        if self.has_meta:  # the metadata's bits ride along as 4 float32 words
            m = np.zeros((k.shape[0], META_WIDTH), "<i8")
            if meta is not None:
                m[:] = meta.detach().cpu().numpy()
            r = np.concatenate([r, m.view("<f4")], axis=1)
        self._inserts += self.store.write(self.table_id, k, r)
        self._writes += k.shape[0]
        return Rows.empty(self.row_width)

    def evict(self, keys: torch.Tensor) -> int:
        check_batch(self.name, self.row_width, keys)
        return self.delete(keys)

    def expire(self, before_step: int, spare: Optional[Spare] = None) -> torch.Tensor:
        """Deletes the rows last used before ``before_step`` (unless ``spare(keys)``), in
        one chunked scan of the table; returns their keys. Rows of a table written
        without metadata count as last used at step 0."""
        gone = [torch.empty(0, dtype=torch.int64)]
        for k, vals in self.store.scan(self.table_id, self.stored_width):
            stale = np.flatnonzero(self._meta_of(vals)[:, LAST] < before_step)
            if stale.size == 0:
                continue
            keys = torch.from_numpy(k[stale])
            if spare is not None:
                keys = keys[~spare(keys).cpu()]
            if keys.numel():
                self._expired += self.store.delete(self.table_id, keys.numpy())
                gone.append(keys)
        return torch.cat(gone)

    def export(self, with_meta: bool = False) -> tuple[torch.Tensor, ...]:
        ks, vs = [np.empty(0, np.int64)], [np.empty((0, self.stored_width), np.float32)]
        for k, v in self.store.scan(self.table_id, self.stored_width):
            ks.append(k)
            vs.append(v)
        vals = np.concatenate(vs)
        keys = torch.from_numpy(np.concatenate(ks))
        rows = torch.from_numpy(np.ascontiguousarray(vals[:, : self.row_width]))
        return (keys, rows, torch.from_numpy(self._meta_of(vals))) if with_meta else (keys, rows)

    def _meta_of(self, vals: np.ndarray) -> np.ndarray:
        """int64 ``[N, 2]`` metadata of stored values ``[N, _width]`` (zeros without)."""
        if not self.has_meta:
            return np.zeros((vals.shape[0], META_WIDTH), np.int64)
        return np.ascontiguousarray(vals[:, self.row_width :]).view("<i8").astype(np.int64)

    def flush(self) -> None:
        self.store.flush()

    def stats(self) -> dict[str, float]:
        n = len(self)
        return {
            "rows": float(n),
            "bytes": float(n * self.stored_width * 4),
            "hits": float(self._hits),
            "misses": float(self._misses),
            "inserts": float(self._inserts),
            "writes": float(self._writes),
            "deletes": float(self._deletes),
            "expired": float(self._expired),
            **self.store.stats(),
        }

    # -- beyond the protocol -------------------------------------------------------
    def read(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched read: ``(rows [N, row_width], found bool [N])``; absent rows are 0."""
        k = as_keys(keys)
        out = torch.zeros(k.shape[0], self.row_width)
        missed = self.find(torch.from_numpy(k), out)
        found = torch.ones(k.shape[0], dtype=torch.bool)
        found[missed] = False
        return out, found

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        """bool ``[N]``: which keys are held."""
        return torch.from_numpy(self.store.contains(self.table_id, as_keys(keys)))

    def delete(self, keys: torch.Tensor) -> int:
        """Deletes the held rows of ``keys`` (TTL / eviction); returns how many were held."""
        n = self.store.delete(self.table_id, as_keys(keys))
        self._deletes += n
        return n

    def export_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Streams ``(keys [C], rows [C, row_width])`` in key order (tables beyond RAM)."""
        for k, r in self.store.scan(self.table_id, self.stored_width, chunk_rows):
            yield torch.from_numpy(k), torch.from_numpy(r[:, : self.row_width])

"""The trainer's side of tiered tables: the run's SSD store and the tier counters it logs.

* :func:`ssd_root` / :func:`open_ssd_store`: where a run keeps its SSD tier and opening
  it empty. The SSD DB is *working state*, like the device and host caches: the rows a
  run must keep are in its checkpoint (``tables.pt``), so a new run starts from an empty
  DB and a resumed one refills it from the checkpoint. A DB left by an earlier run is
  removed first: its rows would otherwise be found as if this run had trained them.
* :class:`TierCounters`: per log interval and per run, the hit rate of each tier and the
  rows moved into it, and the admission counters of tables with admission, from the
  running totals of ``embedding.table_stats()``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from terarec.config import Config, ConfigError
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.ssd_tier import SSDStore, SSDTierConfig, rank_dir

log = logging.getLogger("terarec.trainer")

# Running totals in a tier's stats (differences make sense); everything else
# (rows, bytes, db_*) is a gauge, reported as it is.
_COUNTERS = ("hits", "misses", "inserts", "evictions", "rows_in", "writes", "deletes")
_ADMISSION = "admission_"  # admission counters (all running totals but the sketch's bytes)


def current_rank() -> int:
    """This process's rank: the torch.distributed rank once a group is up, else 0."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def uses_ssd(cfg: Config) -> bool:
    """Whether some table keeps rows in the SSD tier (it bounds its host tier)."""
    return cfg.ssd.path is not None and any(t.host_rows is not None for t in cfg.tables)


def ssd_root(cfg: Config, run_dir: Path) -> Optional[Path]:
    """The SSD tier's root: ``ssd.path``, a relative one inside ``run_dir``; None if unset."""
    if cfg.ssd.path is None:
        return None
    path = Path(cfg.ssd.path).expanduser()
    return path if path.is_absolute() else run_dir / path


def open_ssd_store(cfg: Config, root: Path, rank: int = 0) -> SSDStore:
    """An empty SSD store for ``rank`` under ``root`` (``<root>/rank{rank}``).

    A DB already there (an earlier run's, or this run's before a resume) is removed
    first, after opening it once: if another process still holds it, that open fails
    with RocksDB's lock error and nothing is removed.

    Raises:
        ConfigError: ``<root>/rank{rank}`` holds files that are not a RocksDB.
        SSDTierError: the directory cannot be written, or the DB is in use.
    """
    tier_cfg = SSDTierConfig(**{**_fields(cfg.ssd), "path": str(root)})
    db = rank_dir(root, rank)
    if db.is_dir() and any(db.iterdir()):
        if not (db / "CURRENT").is_file():
            raise ConfigError(
                f"ssd.path: {db} is not empty and not an SSD tier DB; refusing to replace "
                "it (point ssd.path at an empty directory or one terarec made)"
            )
        SSDStore(db, tier_cfg).close()  # raises if another process holds the DB
        log.info("%s: removing the SSD tier DB of an earlier run", db)
        shutil.rmtree(db)
    return SSDStore.for_rank(tier_cfg, rank)


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def close_store(store: Optional[SSDStore], quiet: bool = False) -> None:
    """Closes ``store`` (flushing it); ``quiet``: log a failure instead of raising it
    (when another error is already on its way out)."""
    if store is None:
        return
    try:
        store.close()
    except Exception as e:
        if not quiet:
            raise
        log.warning("could not close the SSD tier at %s: %s", store.path, e)


class TierCounters:
    """Hit rates and rows moved per tier of the tiered tables, evals left out.

    ``embedding.table_stats()`` holds running totals per table group (``device_hits``,
    ``host_misses``, ``ssd_rows_in``, ...). This keeps the totals of the last log, so an
    interval is a difference, and moves both baselines past evals (which read through
    the tiers too) so that only training lookups count. Reading the stats costs a few
    dict operations and three RocksDB property reads per SSD tier: once per log line.

    A tier's hit rate is over the lookups that reached it: the device tier sees every
    unique key of a batch, the host tier the device's misses, the SSD tier the host's
    misses (its misses are rows created on first touch).
    """

    def __init__(self, embedding: HierarchicalEmbeddingBagCollection) -> None:
        self.embedding = embedding
        self.tables = [
            n
            for n, s in embedding.table_stats().items()
            if "device_hits" in s or f"{_ADMISSION}observed" in s
        ]
        self._start = self._read()
        self._last = self._read()
        self.device_hit_rate: Optional[float] = None  # of the last interval, all tables

    def __bool__(self) -> bool:
        return bool(self.tables)

    def _read(self) -> dict[str, dict[str, float]]:
        if not self.tables:
            return {}
        stats = self.embedding.table_stats()
        return {n: dict(stats[n]) for n in self.tables}

    def interval(self) -> dict[str, dict[str, Optional[float]]]:
        """Per table since the last call: ``<tier>_hit_rate`` (None without lookups),
        ``<tier>_rows_in``, ``<tier>_evictions`` (caches) and ``<tier>_rows`` (held now);
        with admission, every ``admission_*`` counter's increase (and the sketch bytes)."""
        now = self._read()
        out: dict[str, dict[str, Optional[float]]] = {}
        hits = lookups = 0.0
        for name in self.tables:
            cur, last = now[name], self._last[name]
            rec: dict[str, Optional[float]] = {}
            for tier in _tiers(cur):
                h = cur[f"{tier}_hits"] - last[f"{tier}_hits"]
                m = cur[f"{tier}_misses"] - last[f"{tier}_misses"]
                rec[f"{tier}_hit_rate"] = h / (h + m) if h + m else None
                rec[f"{tier}_rows_in"] = cur[f"{tier}_rows_in"] - last[f"{tier}_rows_in"]
                if f"{tier}_evictions" in cur:
                    rec[f"{tier}_evictions"] = cur[f"{tier}_evictions"] - last[f"{tier}_evictions"]
                rec[f"{tier}_rows"] = cur[f"{tier}_rows"]
                if tier == "device":
                    hits, lookups = hits + h, lookups + h + m
            for key in cur:
                if key.startswith(_ADMISSION):
                    rec[key] = cur[key] - last[key] if _is_counter(key) else cur[key]
            out[name] = rec
        self._last = now
        self.device_hit_rate = hits / lookups if lookups else None
        return out

    @contextmanager
    def excluding(self) -> Iterator[None]:
        """Leaves the lookups made inside the block (an eval) out of every count."""
        if not self.tables:
            yield
            return
        before = self._read()
        try:
            yield
        finally:
            after = self._read()
            for name in self.tables:
                for key, v in after[name].items():
                    if _is_counter(key):
                        d = v - before[name][key]
                        self._last[name][key] += d
                        self._start[name][key] += d

    def totals(self) -> dict[str, dict[str, Optional[float]]]:
        """Per table over this process's training: every counter's total, the gauges
        as they are now, and ``<tier>_hit_rate`` over all the lookups that reached it."""
        now = self._read()
        out: dict[str, dict[str, Optional[float]]] = {}
        for name in self.tables:
            cur, start = now[name], self._start[name]
            rec: dict[str, Optional[float]] = {
                k: (v - start[k] if _is_counter(k) else v) for k, v in cur.items()
            }
            for tier in _tiers(cur):
                h, m = rec[f"{tier}_hits"], rec[f"{tier}_misses"]
                assert h is not None and m is not None
                rec[f"{tier}_hit_rate"] = h / (h + m) if h + m else None
            out[name] = rec
        return out


def _tiers(stats: Mapping[str, Any]) -> list[str]:
    """Tier names of a group's stats, top first: ``["device", "host", "ssd"]``."""
    return [k[: -len("_hits")] for k in stats if k.endswith("_hits")]


def _is_counter(key: str) -> bool:
    if key.startswith(_ADMISSION):
        return not key.endswith("bytes")
    return key.endswith(_COUNTERS)


def describe_tiers(totals: dict[str, dict[str, Optional[float]]]) -> list[str]:
    """Lines for the end of a run: per tiered table its hit rates and rows per tier, per
    table with admission the rows it created and the keys it left out."""
    lines = []
    for name, rec in totals.items():
        parts = []
        for tier in _tiers(rec):
            rate = rec.get(f"{tier}_hit_rate")
            rows = rec.get(f"{tier}_rows") or 0
            hit = "-" if rate is None else f"{rate:.3f}"
            parts.append(f"{tier} hit {hit} ({int(rows):,} rows)")
        if parts:
            lines.append(f"tiers {name}: " + ", ".join(parts))
        if f"{_ADMISSION}admitted" in rec:
            admitted, rejected, zeroed = (
                int(rec.get(f"{_ADMISSION}{k}") or 0)
                for k in ("admitted", "rejected", "rejected_values")
            )
            lines.append(
                f"admission {name}: {admitted:,} rows created, {rejected:,} new keys left "
                f"out ({zeroed:,} values read as zeros)"
            )
    return lines

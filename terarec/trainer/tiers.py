"""The trainer's side of tiered tables: the run's SSD store and the tier counters it logs.

* :func:`ssd_root` / :func:`open_ssd_store`: where a run keeps its SSD tier and opening
  it empty. The SSD DB is *working state*, like the device and host caches: the rows a
  run must keep are in its checkpoint (an SSD tier snapshot beside the DB, or
  ``tables.pt``), so a new run starts from an empty DB and a resumed one refills it from
  the checkpoint. A DB left by an earlier run is removed first: its rows would otherwise
  be found as if this run had trained them.
* :class:`TierCounters`: per log interval and per run, the hit rate of each tier and the
  rows moved into it, and the admission counters of tables with admission, from the
  running totals of ``embedding.table_stats()``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from terarec.config import Config, ConfigError
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.ssd import SSDStore, SSDTierConfig, SSDTierError, rank_dir

log = logging.getLogger("terarec.trainer")

# Running totals in a tier's stats (differences make sense); everything else
# (rows, bytes, db_*) is a gauge, reported as it is.
_COUNTERS = (
    "hits", "misses", "inserts", "evictions", "rows_in", "writes", "deletes", "expired"
)
_ADMISSION = "admission_"  # admission counters (all running totals but the sketch's bytes)
_PREFETCH = "prefetch_"  # the prefetch's counters (all running totals)


def current_rank() -> int:
    """This process's rank: the torch.distributed rank once a group is up, else 0."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def uses_ssd(cfg: Config) -> bool:
    """Whether some table keeps rows in the SSD tier (it bounds its host tier)."""
    return cfg.ssd.path is not None and any(t.host_rows is not None for t in cfg.tables)


def ssd_root(cfg: Config, run_dir: Path) -> Optional[Path]:
    """The SSD tier's root: ``ssd.path``, a relative one inside ``run_dir``; None if unset.

    ``ssd.path: auto``: ``<dir>/<run name>`` on the NVMe the topology plan chose for this
    rank (``terarec-launch`` passes it as ``TERAREC_SSD_DIR``), else ``<run_dir>/ssd``.
    """
    if cfg.ssd.path is None:
        return None
    if cfg.ssd.path == "auto":
        from terarec.topology.plan import planned_ssd_dir

        planned = planned_ssd_dir()
        return Path(planned) / cfg.name if planned else run_dir / "ssd"
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
    (when another error is already on its way out). A failure that repeats the error in
    flight (the same store's, e.g. its disk is full) is logged at debug level only: the
    error on its way out already says it."""
    if store is None:
        return
    pending = sys.exc_info()[1]  # the caller's error being handled, if any
    try:
        store.close()
    except Exception as e:
        if not quiet:
            raise
        same = isinstance(pending, SSDTierError) and isinstance(e, SSDTierError) and (
            pending.path == e.path)
        (log.debug if same else log.warning)(
            "could not close the SSD tier at %s: %s", store.path, e)


class TierCounters:
    """Per tier hits, misses, evictions, rows and bytes moved, SSD throughput and the
    prefetch's figures, per log interval and per run, evals left out.

    ``embedding.table_stats()`` holds running totals per table group (``device_hits``,
    ``host_misses``, ``ssd_rows_in``, ``prefetch_keys``, ...). This keeps the totals of
    the last log, so an interval is a difference, and moves both baselines past evals
    (which read through the tiers too) so that only training lookups count. Reading the
    stats costs a few dict operations and three RocksDB property reads per SSD tier:
    once per log line.

    A tier's hit rate is over the lookups that reached it: the device tier sees every
    unique key of a batch (twice with the prefetch pipeline: once when the prefetch
    brings the batch in, once when its step runs), the host tier the device's misses,
    the SSD tier the host's misses (its misses are keys without a row anywhere: rows
    created on first touch, looked for once more by the step when a prefetch missed
    them). With prefetch, ``prefetch_hit_rate`` is the device tier's hit rate as a cache
    (the next batch's keys already there when the prefetch looked) and ``ready_rate``
    what the prefetch achieved (the batch's keys resident when its step looked).
    """

    def __init__(self, embedding: HierarchicalEmbeddingBagCollection) -> None:
        self.embedding = embedding
        self.tables = [
            n
            for n, s in embedding.table_stats().items()
            if "device_hits" in s or f"{_ADMISSION}observed" in s
        ]
        # bytes of one row (weights + optimizer state, float32) per table group
        self._row_bytes = {"+".join(g.names): 4 * g.row_width for g in embedding.groups}
        self._start = self._read()
        self._last = self._read()
        self.device_hit_rate: Optional[float] = None  # of the last interval, all tables
        self._bar: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self.tables)

    def _read(self) -> dict[str, dict[str, float]]:
        if not self.tables:
            return {}
        stats = self.embedding.table_stats()
        return {n: dict(stats[n]) for n in self.tables}

    def interval(self, seconds: Optional[float] = None) -> dict[str, dict[str, Optional[float]]]:
        """Per table since the last call (``seconds`` of training ago, evals left out).

        Per tier ``<tier>_hits``, ``_misses``, ``_hit_rate`` (None without lookups),
        ``_rows_in`` / ``_bytes_in`` (rows written into it), ``_evictions`` (caches),
        ``_rows`` / ``_bytes`` (held now); the SSD tier's ``ssd_reads`` / ``ssd_writes``
        (rows) and, given ``seconds``, ``ssd_read_rows_per_s`` / ``ssd_write_rows_per_s``;
        with prefetch ``prefetch_batches``, ``_skipped``, ``_rows_in``, ``_hit_rate`` and
        ``ready_rate`` (see the class); with admission, every ``admission_*`` counter's
        increase (and the sketch bytes).
        """
        now = self._read()
        out: dict[str, dict[str, Optional[float]]] = {}
        total: dict[str, float] = {}
        for name in self.tables:
            cur, last = now[name], self._last[name]
            rec = _figures(cur, last, self._row_bytes.get(name, 0), seconds)
            for key, v in rec.items():  # sums over the tables for the progress bar
                if v is not None and not key.endswith(("_rate", "_rows", "_bytes")):
                    total[key] = total.get(key, 0.0) + v
            out[name] = rec
        self._last = now
        dev = total.get("device_hits", 0.0) + total.get("device_misses", 0.0)
        self.device_hit_rate = total.get("device_hits", 0.0) / dev if dev else None
        self._bar = _bar(total, seconds)
        return out

    def postfix(self) -> dict[str, str]:
        """Progress-bar fields of the last :meth:`interval`, all tables pooled, e.g.
        ``hit="dev 46% host 39% ssd 95%"``, ``ready="99%"``, ``ssd="0.42r 0.41w Mrow/s"``."""
        return dict(self._bar)

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
            rec.update(_prefetch_rates(rec))
            out[name] = rec
        return out


def _tiers(stats: Mapping[str, Any]) -> list[str]:
    """Tier names of a group's stats, top first: ``["device", "host", "ssd"]`` (those
    that count hits and misses)."""
    names = [k[: -len("_hits")] for k in stats if k.endswith("_hits")]
    return [t for t in names if f"{t}_misses" in stats and t != _PREFETCH.rstrip("_")]


def _figures(
    cur: Mapping[str, float], last: Mapping[str, float], row_bytes: int, seconds: Optional[float]
) -> dict[str, Optional[float]]:
    """One table's interval record (see :meth:`TierCounters.interval`)."""
    rec: dict[str, Optional[float]] = {}

    def diff(key: str) -> float:
        return cur[key] - last[key]

    for tier in _tiers(cur):
        h, m = diff(f"{tier}_hits"), diff(f"{tier}_misses")
        rec[f"{tier}_hits"], rec[f"{tier}_misses"] = h, m
        rec[f"{tier}_hit_rate"] = h / (h + m) if h + m else None
        if f"{tier}_rows_in" in cur:
            rows_in = diff(f"{tier}_rows_in")
            rec[f"{tier}_rows_in"], rec[f"{tier}_bytes_in"] = rows_in, rows_in * row_bytes
        if f"{tier}_evictions" in cur:
            rec[f"{tier}_evictions"] = diff(f"{tier}_evictions")
        rec[f"{tier}_rows"] = cur[f"{tier}_rows"]
        if f"{tier}_bytes" in cur:
            rec[f"{tier}_bytes"] = cur[f"{tier}_bytes"]
    if "ssd_hits" in cur:  # rows read from the SSD tier, rows written into it
        rec["ssd_reads"] = diff("ssd_hits")
        rec["ssd_writes"] = diff("ssd_writes") if "ssd_writes" in cur else None
        if seconds:
            rec["ssd_read_rows_per_s"] = rec["ssd_reads"] / seconds
            w = rec["ssd_writes"]
            rec["ssd_write_rows_per_s"] = None if w is None else w / seconds
    if f"{_PREFETCH}batches" in cur and diff(f"{_PREFETCH}batches"):
        for k in ("batches", "skipped", "keys", "resident", "rows_in", "absent"):
            rec[f"{_PREFETCH}{k}"] = diff(f"{_PREFETCH}{k}")
        rec.update(_prefetch_rates(rec))
    for key in cur:
        if key.startswith(_ADMISSION):
            rec[key] = cur[key] - last[key] if _is_counter(key) else cur[key]
    return rec


def _prefetch_rates(rec: Mapping[str, Optional[float]]) -> dict[str, Optional[float]]:
    """``prefetch_hit_rate`` and ``ready_rate`` from a record's counts (none without
    prefetch).

    ``prefetch_hit_rate``: the next batch's keys already in the device tier when the
    prefetch looked (the tier's hit rate as a cache). ``ready_rate``: the keys with a
    row that were resident when their step looked (what the prefetch achieved; keys
    new to the table miss at every step, so they are left out: the bottom tier's misses
    that the prefetch did not already count as absent).
    """
    keys, resident = rec.get(f"{_PREFETCH}keys"), rec.get(f"{_PREFETCH}resident")
    if not keys or resident is None:
        return {}
    hits, misses = rec.get("device_hits") or 0.0, rec.get("device_misses") or 0.0
    tiers = _tiers(rec)
    created = (rec.get(f"{tiers[-1]}_misses") or 0.0) - (rec.get(f"{_PREFETCH}absent") or 0.0)
    with_row = hits + misses - keys - created  # the steps' lookups of keys with a row
    return {
        f"{_PREFETCH}hit_rate": resident / keys,
        "ready_rate": (hits - resident) / with_row if with_row > 0 else None,
    }


def _bar(total: Mapping[str, float], seconds: Optional[float]) -> dict[str, str]:
    """Progress-bar fields from the interval's counts summed over the tables."""

    def pct(h: float, m: float) -> str:
        return f"{100 * h / (h + m):.0f}%" if h + m else "-"

    out: dict[str, str] = {}
    rates = _prefetch_rates(total)
    parts = []
    for tier, short in (("device", "dev"), ("host", "host"), ("ssd", "ssd")):
        if f"{tier}_hits" not in total:
            continue
        h, m = total[f"{tier}_hits"], total[f"{tier}_misses"]
        if tier == "device" and rates:  # as a cache: when the prefetch looked
            h = total[f"{_PREFETCH}resident"]
            m = total[f"{_PREFETCH}keys"] - h
        parts.append(f"{short} {pct(h, m)}")
    if parts:
        out["hit"] = " ".join(parts)
    if rates.get("ready_rate") is not None:
        out["ready"] = f"{100 * rates['ready_rate']:.0f}%"
    if seconds and "ssd_reads" in total:
        r = total["ssd_reads"] / seconds / 1e6
        w = total.get("ssd_writes", 0.0) / seconds / 1e6
        out["ssd"] = f"{r:.2f}r {w:.2f}w Mrow/s"
    return out


def _is_counter(key: str) -> bool:
    if key.startswith(_PREFETCH):
        return True
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
        ready = rec.get("ready_rate")
        if ready is not None:  # with the prefetch pipeline
            skipped, batches = rec.get("prefetch_skipped") or 0, rec.get("prefetch_batches") or 0
            parts.append(
                f"prefetch ready {ready:.3f} ({int(skipped):,} of {int(batches):,} skipped)"
            )
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

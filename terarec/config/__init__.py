"""Typed, self-validating configs loaded from YAML.

Every section is a dataclass; defaults are defined once, here. ``load_config`` turns a
YAML file into a :class:`Config` and fails on unknown keys, wrong types and out-of-range
values with a :class:`ConfigError` that names the file and the dotted key, e.g.::

    ConfigError: configs/x.yaml: optimizer.sparse.lr: must be > 0, got -1.0

Enums are spelled as lower-case strings in YAML (``kind: adam``) and parsed with
``from_str`` so a typo lists the allowed values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from terarec.config.base import ConfigError, StrEnum
from terarec.config.base import check as _check
from terarec.config.data import (
    AdsConfig,
    CategoricalColumn,
    CsvSchema,
    DataConfig,
    DataKind,
    DenseTransform,
    LibfmConfig,
    SyntheticBackend,
    SyntheticConfig,
)
from terarec.config.load import Loader, config_to_dict, from_dict, set_dotted
from terarec.config.parallel import (
    DenseMerge,
    DistBackend,
    DistConfig,
    SparseMerge,
    SyncConfig,
    WireDtype,
)

# The data section lives in config/data.py, dist and sync in config/parallel.py; they are
# re-exported here with the loader's API.
__all__ = [
    "AdsConfig", "CategoricalColumn", "Config", "ConfigError", "CsvSchema", "DataConfig",
    "DataKind", "DenseMerge", "DenseTransform", "DistBackend", "DistConfig", "LibfmConfig",
    "SparseMerge", "StrEnum", "SyncConfig", "SyntheticBackend", "SyntheticConfig",
    "WireDtype", "config_from_dict", "config_to_dict", "load_config",
]


class Pooling(StrEnum):
    SUM = "sum"
    MEAN = "mean"


class InitKind(StrEnum):
    UNIFORM = "uniform"  # U(-scale, scale)
    NORMAL = "normal"  # N(0, scale^2)
    ZEROS = "zeros"


class SparseOptimKind(StrEnum):
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"


class DenseOptimKind(StrEnum):
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ADAM = "adam"


class ModelKind(StrEnum):
    DLRM = "dlrm"
    DCN = "dcn"
    DEEPFM = "deepfm"  # rows [first-order weight | embedding]: tables of dim D + 1
    WIDE_DEEP = "wide_deep"  # the same rows


class LossCheck(StrEnum):
    """When ``terarec train`` checks that a step's loss is finite."""

    AUTO = "auto"  # deferred on CUDA, before_update elsewhere
    BEFORE_UPDATE = "before_update"  # before the step's updates: one host sync a step
    DEFERRED = "deferred"  # one step later, without a host sync


class SSDCompression(StrEnum):
    """Block compression of SST files (float32 rows barely compress: ``none`` by default)."""

    NONE = "none"
    LZ4 = "lz4"
    ZSTD = "zstd"


# ------------------------------------------------------------------ tables / model


@dataclass
class InitConfig:
    kind: InitKind = InitKind.UNIFORM
    scale: float = 0.01

    def __post_init__(self) -> None:
        _check(self.scale >= 0, "scale: must be >= 0")


@dataclass
class AdmissionConfig:
    """Frequency admission of new rows: a key gets a row only once it was seen
    ``min_count`` times in training batches (counted per occurrence, in a count-min
    sketch of ``4 * width * depth`` bytes per table group); until then it reads as zeros
    and its gradient is dropped. See docs/tiers.md#admission.
    """

    min_count: int  # occurrences (this batch's included) before a key gets its row
    width: int = 1 << 20  # counters per sketch row: a few times the distinct keys expected
    depth: int = 4  # sketch rows (hashes): P[an estimate is off by > e/width * total] <= e^-depth
    decay_every: int = 0  # halve every count after each N training steps; 0 = never

    def __post_init__(self) -> None:
        _check(
            1 <= self.min_count <= 2**31 - 1,
            f"min_count: must be in [1, 2^31 - 1], got {self.min_count}",
        )
        _check(1 <= self.width <= 2**31 - 1, f"width: must be in [1, 2^31 - 1], got {self.width}")
        _check(1 <= self.depth <= 32, f"depth: must be in [1, 32], got {self.depth}")
        _check(self.decay_every >= 0, f"decay_every: must be >= 0 steps, got {self.decay_every}")


@dataclass
class TableConfig:
    """One embedding table: rows keyed by unbounded int64 ids, shared by ``features``.

    ``features: null`` means every categorical feature of the data source.
    """

    name: str
    dim: int
    features: Optional[list[str]] = None
    pooling: Pooling = Pooling.SUM
    init: InitConfig = field(default_factory=InitConfig)
    # Tier budgets in rows (null: unbounded). With device_rows, training reads and
    # updates rows in a device cache of that many rows over the host tier; host_rows
    # bounds the host tier too (then the SSD tier below holds the rest).
    device_rows: Optional[int] = None
    host_rows: Optional[int] = None
    cache_policy: str = "lru"
    # Rows of a batch that the device tier has no room for train from a transient
    # scratch pad (written back down after the step) instead of stopping the run.
    scratch_pad: bool = False
    # Rows only for keys seen min_count times (null: every key gets a row on first touch).
    admission: Optional[AdmissionConfig] = None
    # Delete rows not used for more than this many training steps from every tier
    # (null: rows live forever); a deleted key is created again on its next use.
    ttl_steps: Optional[int] = None

    def __post_init__(self) -> None:
        _check(bool(self.name), "name: must be non-empty")
        _check(1 <= self.dim <= 4096, f"dim: must be in [1, 4096], got {self.dim}")
        _check(self.features is None or len(self.features) >= 1, "features: must be non-empty")
        for key in ("device_rows", "host_rows"):
            v = getattr(self, key)
            _check(v is None or v >= 1, f"{key}: must be >= 1 row (or null), got {v}")
        _check(
            self.host_rows is None or self.device_rows is not None,
            "host_rows: a host budget needs a device tier above it (set device_rows)",
        )
        _check(
            not self.scratch_pad or self.device_rows is not None,
            "scratch_pad: the scratch pad backs a device tier (set device_rows)",
        )
        _check(
            self.cache_policy in ("lru", "lfu"),
            f"cache_policy: must be lru or lfu, got {self.cache_policy!r}",
        )
        ttl = self.ttl_steps
        _check(
            ttl is None or (isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 1),
            f"ttl_steps: must be a positive number of steps (or null), got {ttl!r}",
        )


@dataclass
class ModelConfig:
    kind: ModelKind = ModelKind.DLRM
    bottom_mlp: list[int] = field(default_factory=lambda: [64, 16])
    top_mlp: list[int] = field(default_factory=lambda: [64, 32])  # a 1-wide logit layer follows
    dcn_layers: int = 3
    dcn_low_rank: int = 16  # 0 = full-rank DCN-v2 cross layers
    # Serving split: the sparse features of the user/context side (looked up and
    # computed once per request); every other feature is candidate-side (per ad).
    user_features: list[str] = field(default_factory=list)
    user_dense: bool = False  # the dense features are user/context-side too
    # One weight per task of the loss (multi-task data: one logit head per label);
    # empty: every task weighs 1.
    task_weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(
            len(set(self.user_features)) == len(self.user_features),
            f"user_features: duplicate names in {self.user_features}",
        )
        _check(len(self.bottom_mlp) >= 1 and min(self.bottom_mlp) >= 1, "bottom_mlp: sizes >= 1")
        _check(min(self.top_mlp, default=1) >= 1, "top_mlp: sizes must be >= 1")
        _check(self.dcn_layers >= 1, "dcn_layers: must be >= 1")
        _check(self.dcn_low_rank >= 0, "dcn_low_rank: must be >= 0")
        _check(all(w >= 0 for w in self.task_weights) and (
            not self.task_weights or sum(self.task_weights) > 0),
            f"task_weights: must be >= 0 and not all 0, got {self.task_weights}")


# ---------------------------------------------------------------------- optimizers


@dataclass
class SparseOptimConfig:
    """Fused row optimizer; state lives next to the row. Adam = torch SparseAdam."""

    kind: SparseOptimKind = SparseOptimKind.ADAM
    lr: float = 0.01
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    initial_accumulator_value: float = 0.0  # adagrad / rowwise_adagrad

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"lr: must be > 0, got {self.lr}")
        _check(self.eps > 0, "eps: must be > 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2: must be in [0, 1)")
        _check(self.initial_accumulator_value >= 0, "initial_accumulator_value: must be >= 0")


@dataclass
class DenseOptimConfig:
    kind: DenseOptimKind = DenseOptimKind.ADAM
    lr: float = 0.001
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"lr: must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay: must be >= 0")


class LRDecay(StrEnum):
    NONE = "none"
    LINEAR = "linear"  # to min_ratio over decay_steps
    COSINE = "cosine"  # half a cosine to min_ratio over decay_steps
    STEP = "step"  # times gamma every step_every steps


@dataclass
class LRScheduleConfig:
    """A factor on the learning rates by step (``trainer/schedule.py``): a linear
    warm-up, then a decay."""

    warmup_steps: int = 0  # the factor ramps linearly to 1 over these steps
    warmup_start: float = 0.0  # the factor the ramp starts from
    decay: LRDecay = LRDecay.NONE
    decay_steps: Optional[int] = None  # linear / cosine; null: the steps after warm-up
    min_ratio: float = 0.0  # linear / cosine: the factor at the end of the decay
    step_every: int = 0  # step: steps between two decays
    gamma: float = 0.1  # step: the factor of each decay
    sparse: bool = True  # also scale optimizer.sparse.lr (false: the dense lr only)

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "warmup_steps: must be >= 0")
        _check(0.0 <= self.warmup_start <= 1.0, "warmup_start: must be in [0, 1]")
        _check(self.decay_steps is None or self.decay_steps >= 1, "decay_steps: must be >= 1")
        _check(0.0 <= self.min_ratio <= 1.0, "min_ratio: must be in [0, 1]")
        _check(0.0 < self.gamma <= 1.0, "gamma: must be in (0, 1]")
        _check(self.decay != LRDecay.STEP or self.step_every >= 1,
               "step_every: decay step needs step_every >= 1")


@dataclass
class OptimizerConfig:
    sparse: SparseOptimConfig = field(default_factory=SparseOptimConfig)
    dense: DenseOptimConfig = field(default_factory=DenseOptimConfig)
    schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)


# ----------------------------------------------------------------------------- ssd


@dataclass
class SSDConfig:
    """The SSD tier: one RocksDB per rank holding the rows a budgeted host tier evicts.

    ``path: null`` (the default) means no SSD tier; a table with ``host_rows`` needs one.
    The trainer resolves a relative ``path`` inside the run directory
    (``<runs_dir>/<name>/<path>``); rank ``r`` keeps its DB in ``<path>/rank{r}``.
    ``path: auto`` puts it on the NVMe the topology plan picked for the rank
    (``terarec-launch``; docs/topology.md), else in ``<runs_dir>/<name>/ssd``.

    Attributes:
        path: root directory (local NVMe), or None for no SSD tier.
        block_cache_mb: RocksDB block cache (a lock-free HyperClockCache); 0 disables it.
        block_size_kb: SST data block size (a 768-byte row: ~10 rows per 8 KiB block).
        bloom_bits_per_key: full-key bloom filter bits (10: ~1% false positives).
        write_buffer_mb: one memtable's size.
        max_write_buffers: memtables held before writes stall on flushing.
        background_jobs: RocksDB flush + compaction threads.
        num_threads: threads that split one multi-get (rocksdict releases the GIL there)
            and overlap an insert's existence check with packing its rows.
        known_keys: keys per table whose presence the tier remembers (written, read or
            missed by this process), so that inserting them needs no existence check:
            write-back of a row read from the tier, or of a new row whose lookup missed.
            ~40 bytes each; starts over when full. 0: check every key.
        compression: ``none`` | ``lz4`` | ``zstd``.
        wal: also write the WAL on the hot path (never synced there; ``flush`` syncs it).
            Off by default: checkpoints flush memtables, and recovery is from a checkpoint.
        verify_filters: on opening an existing DB, verify the checksums of every live
            SST file's meta blocks (bloom filter, index, properties): RocksDB checks a
            data or index block whenever it reads one, but reads past a filter it cannot
            load, so a damaged filter would go unreported. Reads the filters (~1.3 bytes
            per row).
    """

    path: Optional[str] = None
    block_cache_mb: int = 1024
    block_size_kb: int = 8
    bloom_bits_per_key: int = 10
    write_buffer_mb: int = 64
    max_write_buffers: int = 4
    background_jobs: int = 2
    num_threads: int = 2
    known_keys: int = 1 << 22
    compression: SSDCompression = SSDCompression.NONE
    wal: bool = False
    verify_filters: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.compression, SSDCompression):  # built in code from a string
            try:
                self.compression = SSDCompression.from_str(self.compression)  # type: ignore[assignment]
            except ValueError as e:
                raise ValueError(f"compression: {e}") from None
        _check(
            self.path is None or bool(str(self.path)),
            "path: must be a directory (or null for no SSD tier), got ''",
        )
        _check(self.block_cache_mb >= 0, "block_cache_mb: must be >= 0")
        _check(self.block_size_kb >= 1, "block_size_kb: must be >= 1")
        _check(self.bloom_bits_per_key >= 0, "bloom_bits_per_key: must be >= 0")
        _check(self.write_buffer_mb >= 1, "write_buffer_mb: must be >= 1")
        _check(self.max_write_buffers >= 2, "max_write_buffers: must be >= 2")
        _check(self.background_jobs >= 1, "background_jobs: must be >= 1")
        _check(self.num_threads >= 1, "num_threads: must be >= 1")
        _check(self.known_keys >= 0, "known_keys: must be >= 0")


# --------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    steps: Optional[int] = None  # stop after this many steps ...
    epochs: Optional[float] = None  # ... or passes over file data (synthetic: steps only)
    max_minutes: Optional[float] = None  # wall-clock guard
    eval_every: int = 0  # steps; 0 = only at the end
    eval_batches: Optional[int] = None  # cap on eval batches; None = whole eval set
    # with validation data: keep the checkpoint of the best validation score of this
    # metric (auc | gauc | logloss | ne), and stop after this many evals without one
    keep_best: Optional[str] = None
    early_stopping: int = 0
    gauc_feature: Optional[str] = None  # sparse feature whose first id groups GAUC (user)
    log_every: int = 50
    runs_dir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # torch intra-op threads
    progress: bool = True
    tensorboard: bool = True  # runs/<name>/tensorboard/: event files beside metrics.jsonl
    save_checkpoint: bool = True
    checkpoint_every: int = 0  # steps; 0 = only at the end
    # also save once this many minutes passed since the last save (null: by steps only)
    checkpoint_every_minutes: Optional[float] = None
    # between full checkpoints, a delta (the rows changed since the last save) every
    # this many steps; 0 = none
    delta_every: int = 0
    keep_checkpoints: int = 1  # full checkpoints kept (and the deltas that follow them)
    # periodic checkpoints written on a background thread while training goes on: the
    # loop pauses only while the checkpoint is taken (docs/checkpoints.md)
    async_checkpoint: bool = False
    # Prepare the next batch on a background thread while one trains: read it, copy it
    # to the device and bring its rows into tiered tables' device tier (trainer/pipeline.py).
    # null: on when a table has tiers (device_rows), off otherwise.
    prefetch: Optional[bool] = None
    # NaN/Inf loss check: before_update stops before the step's updates (a host sync
    # every step); deferred checks a step late with no sync (the GPU never waits for
    # the host); auto: deferred on CUDA, before_update on CPU (docs/training.md)
    loss_check: LossCheck = LossCheck.AUTO
    # SIGTERM / SIGINT: the checkpoint written on the way out gets this long; past it the
    # save is abandoned and the previous checkpoint stays (docs/reliability.md)
    grace_seconds: float = 60.0

    def __post_init__(self) -> None:
        _check(self.steps is None or self.steps >= 1, "steps: must be >= 1")
        _check(self.epochs is None or self.epochs > 0, "epochs: must be > 0")
        _check(self.steps is not None or self.epochs is not None, "steps or epochs: set one")
        _check(self.max_minutes is None or self.max_minutes > 0, "max_minutes: must be > 0")
        _check(self.eval_every >= 0, "eval_every: must be >= 0")
        _check(self.eval_batches is None or self.eval_batches >= 1, "eval_batches: must be >= 1")
        _check(self.log_every >= 1, "log_every: must be >= 1")
        _check(self.keep_best in (None, "auc", "gauc", "logloss", "ne"),
               f"keep_best: auc, gauc, logloss or ne, got {self.keep_best!r}")
        _check(self.early_stopping >= 0, "early_stopping: must be >= 0")
        _check(not self.early_stopping or self.keep_best is not None,
               "early_stopping: needs train.keep_best (the validation metric it watches)")
        _check(self.keep_best is None or (self.eval_every > 0 and self.save_checkpoint),
               "keep_best: needs train.eval_every > 0 and save_checkpoint: true")
        _check(self.keep_best != "gauc" or self.gauc_feature is not None,
               "keep_best: gauc needs train.gauc_feature")
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        _check(self.threads is None or self.threads >= 1, "threads: must be >= 1")
        _check(self.grace_seconds > 0, f"grace_seconds: must be > 0, got {self.grace_seconds}")
        _check(
            self.checkpoint_every >= 0,
            f"checkpoint_every: must be >= 0, got {self.checkpoint_every}",
        )
        _check(
            self.save_checkpoint or self.checkpoint_every == 0,
            "checkpoint_every: needs save_checkpoint: true (false means no checkpoints)",
        )
        _check(self.delta_every >= 0, f"delta_every: must be >= 0, got {self.delta_every}")
        _check(
            self.save_checkpoint or self.delta_every == 0,
            "delta_every: needs save_checkpoint: true (false means no checkpoints)",
        )
        _check(self.keep_checkpoints >= 1,
               f"keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")
        _check(self.save_checkpoint or not self.async_checkpoint,
               "async_checkpoint: needs save_checkpoint: true (false means no checkpoints)")
        minutes = self.checkpoint_every_minutes
        _check(minutes is None or minutes > 0,
               f"checkpoint_every_minutes: must be > 0, got {minutes}")
        _check(
            self.save_checkpoint or minutes is None,
            "checkpoint_every_minutes: needs save_checkpoint: true (false means no checkpoints)",
        )


@dataclass
class Config:
    name: str
    tables: list[TableConfig]
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000))
    ssd: SSDConfig = field(default_factory=SSDConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "name: non-empty, no '/'")
        _check(len(self.tables) >= 1, "tables: need at least one table")
        names = [t.name for t in self.tables]
        _check(len(set(names)) == len(names), f"tables: duplicate table names {names}")
        seen: set[str] = set()
        for t in self.tables:
            for f in t.features or []:
                _check(f not in seen, f"tables: feature {f!r} is in two tables")
                seen.add(f)
        _check(
            sum(t.features is None for t in self.tables) <= 1,
            "tables: at most one table may take all features (features: null)",
        )
        k, every = self.sync.k, self.train.checkpoint_every
        if self.train.checkpoint_every_minutes is not None:
            every = every or k  # timed saves fall on merges (steps divisible by k)
        _check(
            k == 1 or every == 0 or (every % k == 0 and self.sync.warmup_steps % k == 0),
            f"train.checkpoint_every: with sync.k = {k} a checkpoint must fall on a merge "
            f"(replicas differ between merges): make it a multiple of {k}, and "
            f"sync.warmup_steps too (got checkpoint_every {every}, warmup_steps "
            f"{self.sync.warmup_steps})",
        )
        delta = self.train.delta_every
        _check(
            k == 1 or delta == 0 or (delta % k == 0 and self.sync.warmup_steps % k == 0),
            f"train.delta_every: with sync.k = {k} a delta must fall on a merge: make it "
            f"a multiple of {k}, and sync.warmup_steps too (got delta_every {delta}, "
            f"warmup_steps {self.sync.warmup_steps})",
        )
        if self.ssd.path is None:
            for i, t in enumerate(self.tables):
                _check(
                    t.host_rows is None,
                    f"tables[{i}].host_rows: table {t.name!r} bounds its host tier, so the "
                    "rows it evicts need an SSD tier below it: set ssd.path (or remove "
                    "host_rows)",
                )


# ------------------------------------------------------------------------- loading


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Builds a validated :class:`Config`; errors are prefixed with ``source``."""
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


DATA_PATH_KEYS = ("path", "eval_path", "valid_path")


def _data_paths_from(data: dict[str, Any], base: Path,
                     keys: tuple[str, ...] = DATA_PATH_KEYS) -> None:
    """``data.path`` / ``eval_path`` / ``valid_path`` entries (those of ``keys``) of a
    config, relative to ``base``, made absolute."""
    section = data.get("data")
    if not isinstance(section, dict):
        return
    for key in keys:
        value = section.get(key)
        entries = [value] if isinstance(value, str) else value
        if not isinstance(entries, list):
            continue
        out = [os.path.abspath(base / e) if isinstance(e, str) and e and not (
            os.path.isabs(e) or e.startswith("~") or "://" in e) else e for e in entries]
        section[key] = out[0] if isinstance(value, str) else out


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Config:
    """Loads a YAML config; ``overrides`` are ``dotted.key=yaml_value`` strings.

    Relative data paths in the file (``data.path``, ``data.eval_path``) are resolved
    against the config file's directory, so a config works from any working directory;
    paths given with ``overrides`` (``--set``) are the user's, relative to the current
    directory; both are made absolute, so the run's saved config reads the same files
    from anywhere. Absolute paths, ``~`` and URLs (``scheme://``) are left as they are.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    _data_paths_from(data, path.parent)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        key = k.strip()
        set_dotted(data, key, yaml.load(v, Loader=Loader))
        section, _, name = key.partition(".")
        if section == "data" and name in DATA_PATH_KEYS:  # the user's, from the cwd
            _data_paths_from(data, Path.cwd(), (name,))
    return config_from_dict(data, str(path))



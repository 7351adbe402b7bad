"""The ``data:`` section: which data, its format, batching, and the synthetic stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from terarec.config.base import StrEnum
from terarec.config.base import check as _check


class DataKind(StrEnum):
    SYNTHETIC = "synthetic"
    CRITEO = "criteo"
    LIBFM = "libfm"
    CSV = "csv"
    COLUMNAR = "columnar"  # a directory written by `terarec preprocess`
    PARQUET = "parquet"  # Parquet files; columns named by the `csv` schema


class DenseTransform(StrEnum):
    NONE = "none"
    LOG1P = "log1p"  # sign-safe: log1p(max(x, 0)), the DLRM Criteo convention




class SyntheticBackend(StrEnum):
    NUMPY = "numpy"  # on the host, one core (the reference)
    TORCH = "torch"  # torch ops on the training device: GPU runs make their own batches


@dataclass
class AdsConfig:
    """Opt-in synthetic ads: every sample shows one ad (feature ``AD``, its id) with a
    planted semantic id, a path of ``levels`` tokens through codebooks of
    ``codebook_size`` tokens (feature ``SID``: one key per prefix). The ad's effect on
    the teacher logit is mostly its path's (each prefix adds one) and partly its own."""

    num_ads: int = 20_000
    levels: int = 3  # semantic-id tokens per ad
    codebook_size: int = 8  # tokens per level
    zipf_alpha: float = 0.8  # ad popularity: P(rank r) ~ r^-alpha
    scale: float = 1.5  # std of the ad's effect on the teacher logit
    own_share: float = 0.1  # share of that variance carried by the ad itself, not its path
    held_out: float = 0.2  # share of the ads never shown in train; eval shows only them
    semantic_ids: bool = True  # emit the SID feature (false: the same data without it)

    def __post_init__(self) -> None:
        _check(self.num_ads >= 2, "num_ads: must be >= 2")
        _check(1 <= self.levels <= 16, "levels: must be in [1, 16]")
        _check(self.codebook_size >= 2, "codebook_size: must be >= 2")
        _check(self.zipf_alpha > 0, "zipf_alpha: must be > 0")
        _check(self.scale >= 0, "scale: must be >= 0")
        _check(0.0 <= self.own_share <= 1.0, "own_share: must be in [0, 1]")
        _check(0.0 <= self.held_out < 1.0, "held_out: must be in [0, 1)")


@dataclass
class SyntheticConfig:
    """Criteo-shaped synthetic stream with labels from a planted teacher model."""

    num_dense: int = 13
    num_sparse: int = 26
    vocab_size: int = 100_000  # distinct ids per feature (<= 1e9)
    zipf_alpha: float = 1.1  # P(rank r) ~ r^-alpha, bounded to vocab_size
    values_per_feature: int = 1  # multi-hot width (fixed)
    teacher_dim: int = 4  # pairwise-interaction width of the teacher
    teacher_scale: float = 1.0  # std of the teacher's summed per-key first-order weights
    teacher_pairwise_scale: Optional[float] = None  # std of its pairwise term (None: = scale)
    teacher_bias: float = -1.0  # teacher logit bias (sets the positive rate)
    eval_samples: int = 65_536  # size of the held-out eval stream
    valid_samples: int = 0  # size of a validation stream of its own (0: none)
    generator: SyntheticBackend = SyntheticBackend.NUMPY  # same distribution, other samples
    ads: Optional[AdsConfig] = None  # opt-in: an ad per sample with a planted semantic id
    # 2: a second label, a conversion after the click (labels [n, 2]: click, conversion)
    tasks: int = 1
    conversion_bias: float = -1.0  # the conversion teacher's logit bias (given a click)

    def __post_init__(self) -> None:
        _check(self.num_dense >= 0, "num_dense: must be >= 0")
        _check(self.num_sparse >= 1, "num_sparse: must be >= 1")
        _check(1 <= self.vocab_size <= 10**9, "vocab_size: must be in [1, 1e9]")
        _check(self.zipf_alpha > 0, "zipf_alpha: must be > 0")
        _check(self.values_per_feature >= 1, "values_per_feature: must be >= 1")
        _check(self.teacher_dim >= 0, "teacher_dim: must be >= 0")
        _check(self.teacher_scale >= 0, "teacher_scale: must be >= 0")
        _check(
            self.teacher_pairwise_scale is None or self.teacher_pairwise_scale >= 0,
            "teacher_pairwise_scale: must be >= 0",
        )
        _check(self.eval_samples >= 1, "eval_samples: must be >= 1")
        _check(self.valid_samples >= 0, "valid_samples: must be >= 0")
        _check(self.ads is None or self.generator == SyntheticBackend.NUMPY,
               "ads: drawn by the numpy generator only (set generator: numpy)")
        _check(self.tasks in (1, 2), f"tasks: 1 (click) or 2 (click, conversion), got "
               f"{self.tasks}")
        _check(self.tasks == 1 or self.generator == SyntheticBackend.NUMPY,
               "tasks: 2 is drawn by the numpy generator only (set generator: numpy)")


@dataclass
class CategoricalColumn:
    """One categorical column of a CSV schema; ``sep`` splits multi-valued cells.

    ``semantic_id: true``: the cell is a semantic id, integer codebook tokens coarse to
    fine split by ``sep`` (e.g. ``3/1/4``), keyed by prefix; at most ``levels`` tokens."""

    column: str
    name: Optional[str] = None  # feature name (default: the column name)
    sep: Optional[str] = None
    semantic_id: bool = False
    levels: Optional[int] = None  # semantic ids: most tokens per id (required)

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = self.column
        _check(self.sep is None or len(self.sep) >= 1, "sep: must be non-empty")
        if self.semantic_id:
            _check(self.sep is not None, "sep: a semantic_id column needs its token separator")
            _check(self.levels is not None and 1 <= self.levels <= 16,
                   "levels: a semantic_id column needs levels in [1, 16]")
        else:
            _check(self.levels is None, "levels: only for semantic_id columns")


@dataclass
class CsvSchema:
    """Which columns of a delimited text file are label, dense and categorical."""

    label: str
    # more label columns, one task each (multi-task models): labels [n, 1 + len]
    extra_labels: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    categorical: list[CategoricalColumn] = field(default_factory=list)
    delimiter: str = ","
    header: bool = True  # False: columns are named c0, c1, ...
    # the header is in the first file only; the others continue it (no header line)
    header_in_first_file_only: bool = False
    quote_char: Optional[str] = None  # e.g. '"': quoted fields (may hold the delimiter)
    label_threshold: float = 0.5  # label = 1 if value > threshold
    weight: Optional[str] = None  # a column of sample weights (>= 0) for the loss

    def __post_init__(self) -> None:
        _check(len(self.delimiter) == 1, "delimiter: must be one character")
        _check(self.quote_char is None or (len(self.quote_char) == 1
                                           and self.quote_char != self.delimiter),
               "quote_char: one character, not the delimiter")
        _check(self.header or not self.header_in_first_file_only,
               "header_in_first_file_only: needs header: true")
        _check(len(self.categorical) >= 1, "categorical: need at least one column")
        names = [self.label, *self.extra_labels]
        _check(len(set(names)) == len(names),
               f"extra_labels: label columns must differ, got {names}")


@dataclass
class LibfmConfig:
    """libFM ``label idx:val ...`` rows; ``fields`` names the tokens by position."""

    fields: Optional[list[str]] = None  # None: all tokens form one feature "features"

    def __post_init__(self) -> None:
        _check(self.fields is None or len(self.fields) >= 1, "fields: must be non-empty")


@dataclass
class DataConfig:
    kind: DataKind = DataKind.SYNTHETIC
    path: Optional[list[str]] = None  # files, directories or globs (train)
    eval_path: Optional[list[str]] = None  # held-out files; else eval_fraction of path
    eval_fraction: float = 0.0  # rows held out of `path` by a hash of their index
    valid_path: Optional[list[str]] = None  # validation files (model selection)
    valid_fraction: float = 0.0  # rows held out of `path` for validation, by the same hash
    batch_size: int = 2048
    eval_batch_size: int = 8192
    strict: bool = False  # fail at the first malformed row instead of skipping it
    log_bad_rows: int = 5  # how many skipped rows to log with file:line
    chunk_rows: int = 65_536  # rows parsed per chunk when streaming files
    prefetch_batches: int = 4  # batches prepared ahead by the background thread
    read_workers: int = 2  # columnar data: threads building batches (0: the producer only)
    shuffle_buffer: int = 0  # rows; 0 = keep file order
    dense_transform: DenseTransform = DenseTransform.NONE
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    csv: Optional[CsvSchema] = None
    libfm: LibfmConfig = field(default_factory=LibfmConfig)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size: must be >= 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size: must be >= 1")
        _check(0.0 <= self.eval_fraction < 1.0, "eval_fraction: must be in [0, 1)")
        _check(0.0 <= self.valid_fraction < 1.0, "valid_fraction: must be in [0, 1)")
        _check(self.eval_fraction + self.valid_fraction < 1.0,
               "valid_fraction: eval_fraction + valid_fraction must be < 1 (rows left to train)")
        _check(not (self.valid_path and self.valid_fraction > 0),
               "valid_fraction: set valid_path or valid_fraction, not both")
        _check(self.kind != DataKind.SYNTHETIC or self.valid_fraction == 0.0,
               "valid_fraction: synthetic data: set synthetic.valid_samples")
        _check(self.chunk_rows >= 1, "chunk_rows: must be >= 1")
        _check(self.prefetch_batches >= 0, "prefetch_batches: must be >= 0")
        _check(self.read_workers >= 0, "read_workers: must be >= 0")
        _check(self.log_bad_rows >= 0, "log_bad_rows: must be >= 0")
        _check(self.shuffle_buffer >= 0, "shuffle_buffer: must be >= 0")
        if self.kind != DataKind.SYNTHETIC:
            _check(bool(self.path), f"path: required for kind {self.kind.value}")
        if self.kind in (DataKind.CSV, DataKind.PARQUET):
            _check(self.csv is not None,
                   f"csv: a column schema is required for kind {self.kind.value}")
        if self.kind == DataKind.COLUMNAR:  # one directory each; eval split made by preprocess
            _check(self.valid_fraction == 0.0, "valid_fraction: columnar data: set "
                   "valid_path to a directory `terarec preprocess` wrote")
            for name, v in (("path", self.path), ("eval_path", self.eval_path),
                            ("valid_path", self.valid_path)):
                _check(v is None or len(v) == 1, f"{name}: one preprocessed directory, got {v}")
            _check(self.eval_fraction == 0.0, "eval_fraction: columnar data: set eval_path to "
                   "the eval directory `terarec preprocess` wrote (<out>/eval)")

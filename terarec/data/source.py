"""``BatchSource``: a stream plus background prefetch, resume state and stats."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Optional

import torch

from terarec.config import DataConfig, DataKind, SyntheticBackend
from terarec.data.batch import Batch
from terarec.data.columnar import Dataset, open_dataset
from terarec.data.columnar_stream import ColumnarStream
from terarec.data.delimited import criteo_parser, csv_parser
from terarec.data.errors import BadRows, DataError
from terarec.data.files import expand_paths
from terarec.data.libfm import LibfmParser
from terarec.data.parquet import ParquetParser
from terarec.data.reshard import reshard_state
from terarec.data.stream import Counters, FileStream, Stream, SyntheticStream
from terarec.data.synthetic import SyntheticGenerator
from terarec.data.synthetic_torch import TorchSyntheticGenerator

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BatchSource:
    """Iterable of :class:`Batch` with exact resume.

    Iterating starts (or restarts) a producer from the position after the last batch
    handed out; with ``prefetch > 0`` the producer runs in a background thread up to
    ``prefetch`` batches ahead, and an exception there is re-raised by the iterator.
    With a CUDA ``device`` that thread also copies each host batch to the device on a
    stream of its own and waits for the copy there, so the training thread gets batches
    already on the GPU and spends no host time on them.

    Args:
        stream: the deterministic batch stream.
        prefetch: batches prepared ahead (0 = produce in the caller's thread).
        bad: the malformed-row counters of the stream's parser.
        counters: the stream's producer counters.
        device: where training runs (None or CPU: batches stay on the host).
    """

    def __init__(
        self, stream: Stream, prefetch: int, bad: BadRows, counters: Counters,
        device: Optional[torch.device] = None,
    ) -> None:
        self.stream = stream
        self.prefetch = prefetch
        self.bad = bad
        self.counters = counters
        # Streams that build their batches in pinned memory themselves say so.
        self.pin = torch.cuda.is_available() and not stream.placed
        cuda = device is not None and torch.device(device).type == "cuda"
        self.device: Optional[torch.device] = torch.device(device) if cuda else None
        self._state = stream.initial_state()
        self._handed = 0
        self._thread: Optional[threading.Thread] = None
        self._stop: Optional[threading.Event] = None

    @property
    def feature_names(self) -> list[str]:
        return list(self.stream.keys)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed to the consumer (plain, JSON-able)."""
        return dict(self._state)

    def reshard_state(self, saved: list[dict[str, Any]]) -> dict[str, Any]:
        """This rank's position continuing the positions ``saved`` by the ranks of
        another layout (one per saved rank, in rank order; ``data/reshard.py``)."""
        return reshard_state(self.stream, saved)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues after ``state``; stops a running producer first."""
        self.stream.check_state(state)
        self.close()
        self._state = dict(state)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        self.close()
        if self.prefetch == 0:
            return self._sync()
        return self._async()

    def _handout(self, b: Batch) -> Batch:
        assert b.position is not None
        self._state = dict(b.position)
        self._handed += 1
        return b

    def _sync(self) -> Iterator[Batch]:
        for b in self.stream.batches(dict(self._state)):
            yield self._handout(b.pin_memory() if self.pin else b)

    def _async(self) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        t = threading.Thread(
            target=self._produce, args=(dict(self._state), q, stop),
            name="terarec-data", daemon=True,
        )
        self._thread, self._stop = t, stop
        t.start()
        try:
            while True:
                try:
                    item = q.get(timeout=1.0)
                except queue.Empty:
                    if not t.is_alive() and q.empty():
                        raise DataError("data producer thread died without a result") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield self._handout(item)
        finally:
            if self._stop is stop:
                self.close()

    def _produce(self, state: dict[str, Any], q: queue.Queue, stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            copy = _DeviceCopy(self.device) if self.device is not None else None
            for b in self.stream.batches(state):
                b = b.pin_memory() if self.pin else b
                if not put(b if copy is None else copy(b)):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))

    def close(self) -> None:
        """Stops the producer thread (if any); the position is kept."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread, self._stop = None, None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Counters since this source was built.

        Returns:
            ``rows_read`` (lines of this rank/split parsed), ``rows_skipped`` (by reason),
            ``rows_skipped_total``, ``rows_out`` (rows put into batches by the producer,
            which may run ahead), ``batches`` (handed to the consumer) and
            ``batches_produced``.
        """
        skipped = self.bad.snapshot()
        return {
            "rows_read": self.counters.rows_read,
            "rows_skipped": skipped,
            "rows_skipped_total": sum(skipped.values()),
            "rows_out": self.counters.rows_out,
            "batches": self._handed,
            "batches_produced": self.counters.batches_made,
        }


class _DeviceCopy:
    """Host batches to a CUDA device on a side stream, from the producer thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.main = torch.cuda.default_stream(device)

    def __call__(self, b: Batch) -> Batch:
        if b.labels.is_cuda:  # born on the device
            return b
        with torch.cuda.stream(self.side):
            b = b.to(self.device, non_blocking=True)
        self.side.synchronize()  # this thread waits (GIL released), not training
        b.record_stream(self.main)
        return b


def open_columnar(cfg: DataConfig, split: str) -> Dataset:
    """The preprocessed dataset of ``split``, checked against the config.

    Raises:
        DataError: no eval dataset, or a dense transform that differs from the one the
            data was preprocessed with.
    """
    if split == "eval" and not cfg.eval_path:
        raise DataError("no eval data: set data.eval_path to the eval directory "
                        "`terarec preprocess` wrote (<out>/eval)")
    if split == "valid" and not cfg.valid_path:
        raise DataError("no validation data: set data.valid_path to the valid directory "
                        "`terarec preprocess` wrote (<out>/valid)")
    assert cfg.path is not None  # validated by DataConfig
    ds = open_dataset({"eval": cfg.eval_path, "valid": cfg.valid_path}.get(split, cfg.path)[0])
    if cfg.dense_transform.value not in ("none", ds.dense_transform):
        raise DataError(f"{ds.root}: preprocessed with dense_transform {ds.dense_transform}, "
                        f"the config asks for {cfg.dense_transform.value} (the transform is "
                        f"applied when preprocessing; leave data.dense_transform unset)")
    return ds


def columnar_stream(cfg: DataConfig, split: str, seed: int, rank: int, world_size: int,
                    epochs: Optional[float], batch_size: int, counters: Counters
                    ) -> ColumnarStream:
    ds = open_columnar(cfg, split)
    if split != "train":
        train = open_columnar(cfg, "train")
        if (train.dense, train.sparse) != (ds.dense, ds.sparse):
            raise DataError(f"{ds.root}: features {ds.dense + ds.sparse} differ from the train "
                            f"data's {train.dense + train.sparse} ({train.root})")
    return ColumnarStream(
        ds, split, seed, rank, world_size, epochs if split == "train" else 1.0, batch_size,
        cfg.shuffle_buffer, cfg.read_workers, torch.cuda.is_available(), counters,
    )


def first_files(cfg: DataConfig) -> dict[str, str]:
    """Each data file → the first file of its list (``path``, ``eval_path``,
    ``valid_path``): the one with the header under ``csv.header_in_first_file_only``."""
    out: dict[str, str] = {}
    for paths in (cfg.valid_path, cfg.eval_path, cfg.path):
        files = expand_paths(paths) if paths else []
        out.update({f: files[0] for f in files})
    return out


def text_parser(cfg: DataConfig, bad: BadRows) -> Any:
    """The parser of a file data kind (criteo, csv, libfm: lines; parquet: rows)."""
    if cfg.kind == DataKind.CRITEO:
        return criteo_parser(cfg.dense_transform, bad)
    if cfg.kind == DataKind.CSV:
        assert cfg.csv is not None  # validated by DataConfig
        firsts = first_files(cfg) if cfg.csv.header_in_first_file_only else None
        return csv_parser(cfg.csv, cfg.dense_transform, bad, firsts)
    if cfg.kind == DataKind.LIBFM:
        return LibfmParser(cfg.libfm.fields, bad)
    if cfg.kind == DataKind.PARQUET:
        assert cfg.csv is not None  # validated by DataConfig
        return ParquetParser(csv_parser(cfg.csv, cfg.dense_transform, bad))
    raise DataError(f"kind {cfg.kind.value}: not a file format")  # pragma: no cover


def split_files(cfg: DataConfig, split: str) -> tuple[list[str], tuple[float, float]]:
    """The files of a file-data split and the band of ``row_coin`` held out of them
    (``FileStream``): eval ``[0, eval_fraction)``, validation the next
    ``valid_fraction``, train the rest (a split with files of its own holds none)."""
    e = 0.0 if cfg.eval_path else cfg.eval_fraction
    v = 0.0 if cfg.valid_path else cfg.valid_fraction
    own = {"eval": cfg.eval_path, "valid": cfg.valid_path}.get(split)
    if own:
        return expand_paths(own), (0.0, 0.0)
    assert cfg.path is not None  # validated by DataConfig
    if split == "eval" and e <= 0:
        raise DataError("no eval data: set data.eval_path or data.eval_fraction > 0")
    if split == "valid" and v <= 0:
        raise DataError("no validation data: set data.valid_path or data.valid_fraction > 0")
    band = {"eval": (0.0, e), "valid": (e, e + v)}.get(split, (0.0, e + v))
    return expand_paths(cfg.path), band


def make_source(
    cfg: DataConfig,
    split: str,
    seed: int,
    rank: int,
    world_size: int,
    epochs: Optional[float],
    device: Optional[torch.device] = None,
) -> BatchSource:
    """See :func:`terarec.data.build_source`."""
    if split not in ("train", "eval", "valid"):
        raise DataError(f"split must be 'train', 'eval' or 'valid', got {split!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, {world_size})")
    if epochs is not None and epochs <= 0:
        raise DataError(f"epochs must be > 0, got {epochs}")
    bs = cfg.batch_size if split == "train" else cfg.eval_batch_size
    bad = BadRows(cfg.strict, cfg.log_bad_rows)
    counters = Counters()
    stream: Stream
    if cfg.kind == DataKind.COLUMNAR:
        stream = columnar_stream(cfg, split, seed, rank, world_size, epochs, bs, counters)
    elif cfg.kind == DataKind.SYNTHETIC:
        if split == "valid" and cfg.synthetic.valid_samples == 0:
            raise DataError("no validation data: set data.synthetic.valid_samples > 0")
        gen = SyntheticGenerator(cfg.synthetic, seed, cfg.dense_transform)
        device_gen = None
        if cfg.synthetic.generator == SyntheticBackend.TORCH:
            device_gen = TorchSyntheticGenerator(cfg.synthetic, seed, cfg.dense_transform,
                                                 device or torch.device("cpu"))
        stream = SyntheticStream(gen, split, seed, rank, world_size, bs, counters, device_gen)
    else:
        parser = text_parser(cfg, bad)
        files, hold = split_files(cfg, split)
        shuffle = cfg.shuffle_buffer if split == "train" else 0
        stream = FileStream(
            files, parser, split, hold, seed, rank, world_size,
            epochs if split == "train" else 1.0,
            (bs, cfg.chunk_rows, shuffle), counters,
        )
    return BatchSource(stream, cfg.prefetch_batches, bad, counters, device)


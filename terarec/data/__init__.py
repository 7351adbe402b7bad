"""The data layer: readers, key hashing, sharding, prefetch and resumable positions.

The trainer uses exactly this::

    from terarec.data import build_source, sparse_feature_names, dense_feature_names

    src = build_source(cfg.data, "train", seed=cfg.seed, rank=r, world_size=w)
    for batch in src:          # Batch(dense [B, D], sparse KJT, labels [B], position)
        ...
    ckpt["data"] = src.state_dict()     # position after the last batch handed out
    src.load_state_dict(ckpt["data"])  # on a fresh source: continue exactly there
    src.close()

See docs/data.md for formats, hashing, sharding, splits and the malformed-row policy.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from terarec.config import DataConfig, DataKind
from terarec.data.batch import Batch
from terarec.data.delimited import CRITEO_DENSE, CRITEO_SPARSE
from terarec.data.errors import DataError
from terarec.data.files import expand_paths
from terarec.data.libfm import ALL_TOKENS
from terarec.data.source import BatchSource, make_source, open_columnar
from terarec.data.synthetic import dense_names, sparse_names
from terarec.data.synthetic_ads import SID

__all__ = [
    "Batch",
    "BatchSource",
    "DataError",
    "build_source",
    "check_eval_data",
    "dense_feature_names",
    "semantic_id_features",
    "sparse_feature_names",
    "task_names",
]


def task_names(cfg: DataConfig) -> list[str]:
    """The label of every task, in the column order of a multi-task ``Batch.labels``
    ``[B, T]``; one name: single-task data (``labels`` ``[B]``)."""
    if cfg.kind == DataKind.SYNTHETIC:
        return ["click", "conversion"][: cfg.synthetic.tasks]
    if cfg.kind in (DataKind.CSV, DataKind.PARQUET) and cfg.csv is not None:
        return [cfg.csv.label, *cfg.csv.extra_labels]
    return ["label"]


def sparse_feature_names(cfg: DataConfig) -> list[str]:
    """Categorical feature names in KJT key order."""
    if cfg.kind == DataKind.SYNTHETIC:
        return sparse_names(cfg.synthetic)
    if cfg.kind == DataKind.CRITEO:
        return list(CRITEO_SPARSE)
    if cfg.kind == DataKind.LIBFM:
        return list(cfg.libfm.fields) if cfg.libfm.fields else [ALL_TOKENS]
    if cfg.kind == DataKind.COLUMNAR:
        return list(open_columnar(cfg, "train").sparse)
    assert cfg.csv is not None
    return [c.name or c.column for c in cfg.csv.categorical]


def semantic_id_features(cfg: DataConfig) -> dict[str, int]:
    """Features whose values are semantic-id token sequences, with their levels: their
    keys are the prefixes' (``keys.semantic_id_keys``), which serving must recompute from
    the tokens a request sends."""
    if cfg.kind == DataKind.COLUMNAR:
        return dict(open_columnar(cfg, "train").semantic_ids)
    if cfg.kind in (DataKind.CSV, DataKind.PARQUET) and cfg.csv is not None:
        return {c.name or c.column: int(c.levels or 0) for c in cfg.csv.categorical
                if c.semantic_id}
    ads = cfg.synthetic.ads if cfg.kind == DataKind.SYNTHETIC else None
    return {SID: ads.levels} if ads is not None and ads.semantic_ids else {}


def dense_feature_names(cfg: DataConfig) -> list[str]:
    """Dense feature names in column order of ``Batch.dense``."""
    if cfg.kind == DataKind.SYNTHETIC:
        return dense_names(cfg.synthetic)
    if cfg.kind == DataKind.CRITEO:
        return list(CRITEO_DENSE)
    if cfg.kind == DataKind.LIBFM:
        return []
    if cfg.kind == DataKind.COLUMNAR:
        return list(open_columnar(cfg, "train").dense)
    assert cfg.csv is not None
    return list(cfg.csv.dense)


def build_source(
    cfg: DataConfig,
    split: str,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    epochs: Optional[float] = None,
    device: Optional[torch.device] = None,
) -> BatchSource:
    """Builds the batch source of one split for one rank.

    Args:
        cfg: the data config.
        split: "train" (``batch_size`` rows per batch; endless when ``epochs`` is None,
            else stops after that many passes, fractions allowed), "eval" (one pass of
            ``eval_batch_size`` batches; ``eval_path``, else the ``eval_fraction`` of
            ``path`` held out by row hash; synthetic: ``synthetic.eval_samples`` rows) or
            "valid" (the same for ``valid_path`` / ``valid_fraction`` /
            ``synthetic.valid_samples``: rows for model selection, apart from both).
        seed: drives synthetic sampling and shuffling.
        rank, world_size: this process's shard.
        epochs: train passes over file data (ignored by the endless synthetic stream).
        device: where ``synthetic.generator: torch`` draws its batches (default CPU); the
            other sources make host batches (pinned when CUDA is available), which a
            CUDA ``device`` gets copied to it by the source's background thread
            (``prefetch_batches > 0``; with 0 they stay on the host).

    Returns:
        A :class:`BatchSource`; the last batch of a finite pass may be short.

    Raises:
        DataError: missing files, no eval data, bad rank.
    """
    return make_source(cfg, split, seed, rank, world_size, epochs, device)


def check_eval_data(cfg: DataConfig, seed: int) -> None:
    """Before training: each eval and validation file (``eval_path``, ``valid_path``)
    yields a first batch through the parser training uses, so a missing, empty or wrong
    file fails before step 1 instead of after the run (whose eval would have no row).
    Preprocessed data: each directory as a whole. Synthetic data and fractions held out
    of the train files are not checked here (the train stream reads those files).

    Raises:
        DataError: naming the file, and why its rows were skipped.
    """
    if cfg.kind == DataKind.SYNTHETIC:
        return
    small = {"eval_batch_size": min(cfg.eval_batch_size, 256), "prefetch_batches": 0,
             "read_workers": 0}
    for split, key in (("eval", "eval_path"), ("valid", "valid_path")):
        given = getattr(cfg, key)
        if not given:
            continue
        whole = cfg.kind == DataKind.COLUMNAR or (  # later files need the first's header
            cfg.csv is not None and cfg.csv.header_in_first_file_only)
        each = [given] if whole else [[f] for f in expand_paths(given)]
        for paths in each:
            src = make_source(dataclasses.replace(cfg, **{key: paths}, **small), split,
                              seed, 0, 1, None)
            try:
                first = next(iter(src), None)
                stats = src.stats()
            finally:
                src.close()
            if first is None:
                skipped = stats.get("rows_skipped") or {}
                why = f" (skipped: {skipped})" if skipped else " (no rows)"
                raise DataError(f"{', '.join(paths)}: {split} data without one valid row"
                                f"{why}; check data.{key} and the file's format "
                                f"(data.kind: {cfg.kind.value})")

"""Checkpoint → serving bundle (``terarec export``).

:func:`export_bundle` reads a checkpoint (full or delta; one rank or many) and writes a
bundle (``serve/bundle.py``): the dense model cut for request-centric scoring
(``models/split.py``) as ``torch.export`` programs, and every trained row streamed into
a read-only row store (``serve/rowstore.py``) in the chosen row dtype. Host memory holds
one chunk of rows and one sorted run (``RowStoreWriter``), never a table.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim, export

import terarec
from terarec.config import Config, config_from_dict, config_to_dict
from terarec.data import (
    dense_feature_names,
    semantic_id_features,
    sparse_feature_names,
    task_names,
)
from terarec.models import build_model
from terarec.models.split import ModelSplit, split_model
from terarec.ps.table import feature_order
from terarec.serve import bundle as b
from terarec.serve.quant import check_dtype, row_bytes
from terarec.serve.rowstore import RowStoreWriter
from terarec.trainer.checkpoint.files import manifest_sha256, read_manifest, verify_files
from terarec.trainer.checkpoint.reader import stream_rows


class _NoEmbedding(nn.Module):
    """Stands in for the embedding module: the programs take pooled vectors."""

    def forward(self, kjt: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("the exported model takes pooled embeddings")


def load_model(checkpoint: Path) -> tuple[Config, nn.Module, dict[str, Any]]:
    """The run config, the trained dense model (no embedding inside) and the
    checkpoint's manifest. ``dense.pt`` is verified against the manifest."""
    manifest = read_manifest(checkpoint, verify=False)
    cfg = config_from_dict(manifest["config"], f"{checkpoint}/manifest.json")
    verify_files(checkpoint, manifest, ["dense.pt"])
    order, dims, _ = _features(cfg)
    model = build_model(cfg.model, _NoEmbedding(), order, [dims[f] for f in order],
                        len(dense_feature_names(cfg.data)), len(task_names(cfg.data)))
    state = torch.load(checkpoint / "dense.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return cfg, model.eval(), manifest


def _features(cfg: Config) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """The model's feature order, each feature's dim and its table's index."""
    order, table_of = feature_order(cfg.tables, sparse_feature_names(cfg.data))
    return order, {f: cfg.tables[table_of[f]].dim for f in order}, table_of


def _programs(split: ModelSplit, num_dense: int, dims: dict[str, int], out: Path
              ) -> dict[str, str]:
    """Exports the split's modules into ``out``; returns ``{part: file}``."""
    dim = max(dims.values())
    users, cands = Dim("users", min=1), Dim("candidates", min=1)
    fu, fc = len(split.user_features), len(split.candidate_features)
    du = num_dense if split.user_dense else 0
    with torch.no_grad():
        if split.mode == "single":
            width = sum(dims[f] for f in split.candidate_features)
            args: tuple[Any, ...] = (torch.randn(3, num_dense), torch.randn(3, width))
            ep = export(split.candidate, args, dynamic_shapes=({0: cands}, {0: cands}))
            torch.export.save(ep, out / "model.pt2")
            return {"model": "model.pt2"}
        assert split.user is not None
        uargs = (torch.randn(2, du), torch.randn(2, fu, dim))
        ep = export(split.user, uargs, dynamic_shapes=({0: users}, {0: users}))
        torch.export.save(ep, out / "user.pt2")
        state, partial = split.user(*uargs)
        cargs = (state[:1], partial[:1], torch.randn(3, num_dense - du),
                 torch.randn(3, fc, dim))
        ep = export(split.candidate, cargs, dynamic_shapes=(None, None, {0: cands},
                                                            {0: cands}))
        torch.export.save(ep, out / "candidate.pt2")
    return {"user": "user.pt2", "candidate": "candidate.pt2"}


def export_bundle(checkpoint: Path, out: Path, row_dtype: str = "fp32",
                  overwrite: bool = False) -> dict[str, Any]:
    """Writes the bundle of ``checkpoint`` to ``out``; returns its manifest.

    The bundle is built in ``<out>.tmp`` and renamed into place when complete.
    Raises:
        FileExistsError: ``out`` exists and not ``overwrite``.
        SplitError: ``model.user_features`` does not fit the model.
        CheckpointError: a checkpoint file is missing or damaged.
    """
    check_dtype(row_dtype)
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    cfg, model, ck = load_model(checkpoint)
    order, dims, table_of = _features(cfg)
    dense_names = dense_feature_names(cfg.data)
    split = split_model(model, cfg.model.user_features, cfg.model.user_dense)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    programs = _programs(split, len(dense_names), dims, tmp)
    ids = {t.name: i for i, t in enumerate(cfg.tables)}
    writer = RowStoreWriter(tmp / b.ROWS, row_dtype)
    for table, keys, weights in stream_rows(checkpoint):
        writer.add(ids[table], keys, weights)
    counts = writer.finish()
    manifest = {
        "format": b.FORMAT, "kind": b.KIND, "terarec": terarec.__version__,
        "step": int(ck["step"]), "samples": int(ck.get("samples", 0)),
        "checkpoint": {"path": str(checkpoint.resolve()), "kind": ck.get("kind", "full"),
                       "manifest_sha256": manifest_sha256(checkpoint)},
        "model": {"kind": getattr(cfg.model.kind, "value", cfg.model.kind),
                  "mode": split.mode, "programs": programs, "shared": split.shared,
                  "folded": split.folded,
                  # one logit per task; the ranking follows the first
                  "tasks": task_names(cfg.data)},
        "features": {
            "order": order,
            "user": split.user_features if split.mode == "split" else
            list(cfg.model.user_features),
            "candidate": split.candidate_features if split.mode == "split" else
            [f for f in order if f not in cfg.model.user_features],
            "table": {f: cfg.tables[table_of[f]].name for f in order},
            "dense": dense_names, "user_dense": bool(cfg.model.user_dense),
            # feature -> levels: requests send tokens, the scorer hashes their prefixes
            "semantic_ids": {f: n for f, n in semantic_id_features(cfg.data).items()
                             if f in order},
        },
        "tables": {t.name: {"id": i, "dim": t.dim, "pooling": t.pooling.value,
                            "rows": counts.get(i, 0), "row_bytes": row_bytes(row_dtype, t.dim)}
                   for i, t in enumerate(cfg.tables)},
        "row_dtype": row_dtype,
        "config": config_to_dict(cfg),
        "export_seconds": round(time.perf_counter() - t0, 3),
    }
    manifest["files"] = b.describe(tmp)
    manifest["bytes"] = sum(f["size"] for f in manifest["files"].values())
    b.write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return json.loads((out / b.MANIFEST).read_text())

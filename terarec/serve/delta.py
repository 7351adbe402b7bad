"""Reading a training run's delta checkpoint for a live service (``serve/overlay.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from terarec.models.split import split_model
from terarec.serve.export import load_model
from terarec.serve.overlay import PendingDelta
from terarec.trainer.checkpoint import delta
from terarec.trainer.checkpoint.files import (
    manifest_sha256,
    rank_files,
    read_manifest,
    verify_files,
)

if TYPE_CHECKING:
    from terarec.serve.scorer import Scorer


def read_delta(path: Path, scorer: Scorer, parent_sha: str) -> PendingDelta:
    """The rows a delta changed or deleted (weights only; deleted keys as zero rows) of
    every table, merged over the ranks of its first fast group, and the dense weights
    cut as the served programs are. Files are verified against the delta's manifest.

    Raises:
        ValueError: not a delta, or not the child of ``parent_sha``.
        CheckpointError: a file is missing or damaged.
    """
    manifest = read_manifest(path, verify=False)
    if manifest.get("kind") != "delta":
        raise ValueError(f"{path}: a full checkpoint, not a delta: export it as a new "
                         "bundle")
    if manifest["parent"]["manifest_sha256"] != parent_sha:
        raise ValueError(f"{path}: written after another checkpoint than the model served "
                         f"(parent step {manifest['parent']['step']}); apply deltas in order")
    world = manifest.get("world")
    shards = [""] if not world else [f"rank{r}/" for r in world["fast_groups"][0]]
    for shard in shards:
        verify_files(path, manifest, [f"{shard}{n}" for n in rank_files(manifest, shard)])
    tables = {name: (t["id"], t["dim"]) for name, t in scorer.tables.items()}
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for shard in shards:
        for name, change in delta.read_changes(path, shard).items():
            table_id, dim = tables[name]
            gone = change["deleted"]
            parts.setdefault(table_id, []).append(
                (torch.cat([change["keys"], gone]),
                 torch.cat([change["rows"][:, :dim].float(), torch.zeros(gone.numel(), dim)])))
    rows = {t: (torch.cat([k for k, _ in p]), torch.cat([w for _, w in p]))
            for t, p in parts.items()}
    cfg, model, _ = load_model(path)
    split = split_model(model, cfg.model.user_features, cfg.model.user_dense,
                        fold=scorer.folded if scorer.mode == "split" else None)
    dense = ({"user": split.user.state_dict(), "candidate": split.candidate.state_dict()}
             if split.user is not None else {"model": split.candidate.state_dict()})
    return PendingDelta(str(path), int(manifest["step"]), manifest_sha256(path), parent_sha,
                        rows, dense, {"rows": sum(k.numel() for k, _ in rows.values())})

"""Export of a checkpoint written by two ranks (rows sharded by owner, SSD tier
snapshots per rank, a delta chain): the bundle scores the eval set as the model
restored in one process from the same checkpoint does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import STEPS, equivalence_config, launch_ranks, run_dir

from terarec.config import config_from_dict
from terarec.data import build_source
from terarec.serve.export import export_bundle
from terarec.serve.scorer import Scorer
from terarec.trainer.checkpoint import load_checkpoint
from terarec.trainer.checkpoint.full import read_tables
from terarec.trainer.loop import build_components
from terarec.trainer.tiers import open_ssd_store

TOL = 1e-5  # float32 sums in another order (as the one-process export round trip)
USER = [f"C{i}" for i in range(1, 21)]


@pytest.fixture(scope="module")
def two_ranks(work: Path) -> dict[str, Any]:
    cfg = equivalence_config(work, 2, "export-two", steps=STEPS // 2 + 1)
    cfg["model"].update(user_features=USER, user_dense=True)
    cfg["train"].update(checkpoint_every=6, delta_every=2, keep_checkpoints=2)
    launch_ranks(work, cfg, 2, 2)
    return cfg


def _reference(cfg: dict[str, Any], ckpt: Path, tmp: Path) -> list[tuple[Any, torch.Tensor]]:
    one = config_from_dict({**cfg, "data": {**cfg["data"], "batch_size": 64}}, "<ref>")
    store = open_ssd_store(one, tmp / "ref_ssd")
    try:
        parts = build_components(one, ssd_store=store)
        load_checkpoint(ckpt, parts)  # 2 ranks -> 1 process
        parts.model.eval()
        with torch.no_grad():
            return [(b, torch.sigmoid(parts.model(b.dense, b.sparse)))
                    for b in build_source(one.data, "eval", seed=one.seed)]
    finally:
        store.close()


def _bundle_probs(scorer: Scorer, batch: Any) -> torch.Tensor:
    kjt = batch.sparse
    cols = {f: (kjt[f].values(), kjt[f].lengths().to(torch.int64)) for f in kjt.keys()}
    n = batch.dense.shape[0]
    user = {f: cols[f] for f in scorer.order if f not in scorer.candidate_features}
    cand = {f: cols[f] for f in scorer.candidate_features}
    with torch.no_grad():
        return torch.sigmoid(scorer.score_keys(user, cand, torch.arange(n), batch.dense,
                                               batch.dense[:, :0]))


@pytest.mark.numerics
def test_two_rank_checkpoints_export(two_ranks: dict[str, Any], tmp_path: Path) -> None:
    run = run_dir(two_ranks)
    deltas = sorted((run / "deltas").iterdir(), key=lambda p: int(p.name[4:]))
    assert deltas, "the run wrote no delta"
    for ckpt in (run / "checkpoint", deltas[-1]):
        manifest = export_bundle(ckpt, tmp_path / ckpt.name)
        assert manifest["model"]["mode"] == "split"
        if ckpt.name == "checkpoint":  # every row once: the two shards' rows, merged
            held = sum(read_tables(ckpt, f"rank{r}/")["sparse"]["keys"].numel()
                       for r in (0, 1))
            assert manifest["tables"]["sparse"]["rows"] == held
        scorer = Scorer.from_bundle(tmp_path / ckpt.name)
        try:
            for batch, probs in _reference(two_ranks, ckpt, tmp_path / f"ref_{ckpt.name}"):
                assert float((_bundle_probs(scorer, batch) - probs).abs().max()) <= TOL
        finally:
            scorer.close()

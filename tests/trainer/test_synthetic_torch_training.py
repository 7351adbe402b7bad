"""Training on the torch synthetic generator reaches the oracle AUC like the numpy one.

Both generators draw the same distribution (other samples), so a model trained on either
ends at the same distance from its teacher's oracle AUC, up to the sampling noise of the
eval AUC (standard error from the Hanley-McNeil formula).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from terarec.trainer.loop import train


def auc_se(auc: float, n_pos: float, n_neg: float) -> float:
    """Hanley & McNeil (1982) standard error of an AUC estimate."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc)
           + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(var)


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA")),
])
def test_torch_generator_reaches_the_oracle_like_numpy(tmp_path: Path, tiny_config,
                                                       device: str) -> None:
    out = {}
    for gen in ("numpy", "torch"):
        cfg = tiny_config(
            name=gen,
            data={"batch_size": 256, "eval_batch_size": 4096,
                  "synthetic": {"eval_samples": 16384, "generator": gen}},
            train={"steps": 300, "log_every": 100, "save_checkpoint": False,
                   "device": device})
        ev = train(cfg)["final_eval"]
        out[gen] = ev
    gaps = {g: e["oracle_auc"] - e["auc"] for g, e in out.items()}
    n = out["numpy"]["samples"]
    n_pos = out["numpy"]["ctr"] * n
    se = auc_se(out["numpy"]["auc"], n_pos, n - n_pos)
    # two independent eval sets, model and oracle AUC each: 4 estimates' noise, 5 sigma
    assert abs(gaps["torch"] - gaps["numpy"]) <= 5 * 2 * se, (gaps, se)
    assert gaps["torch"] < 0.1 and out["torch"]["auc"] > 0.7, out["torch"]  # it learned

"""Dense int8 serving: the candidate program's linear layers on FBGEMM's int8 GEMM keep
the eval AUC of float32, follow live deltas, and run on the CPU only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from serve_helpers import SPLIT, bundle_probs, reference, trained
from torchmetrics.functional.classification import binary_auroc

from terarec.serve.dense_int8 import MIN_WEIGHTS, quantize_linears
from terarec.serve.export import export_bundle
from terarec.serve.scorer import Scorer

TOL = 1e-5  # the export round trip's: float32 sums in another order


def _linears(gm: Any, at_least: int = 0) -> int:
    return sum(n.op == "call_function" and n.target is torch.ops.aten.linear.default
               and gm.get_parameter(n.args[1].target).numel() >= at_least
               for n in gm.graph.nodes)


def _auc(scorer: Scorer, ref: list[tuple[Any, torch.Tensor]]) -> float:
    probs = torch.cat([bundle_probs(scorer, b) for b, _ in ref])
    labels = torch.cat([b.labels for b, _ in ref]).to(torch.int64)
    return float(binary_auroc(probs, labels))


@pytest.mark.numerics
def test_dense_int8_rewrites_the_large_candidate_linears_and_keeps_auc(tmp_path: Path
                                                                       ) -> None:
    cfg, run = trained(tmp_path / "run", model={**SPLIT, "top_mlp": [256, 128]})
    ref = reference(cfg, run / "checkpoint", tmp_path)
    export_bundle(run / "checkpoint", tmp_path / "b")
    fp32 = Scorer.from_bundle(tmp_path / "b")
    int8 = Scorer.from_bundle(tmp_path / "b", dense_dtype="int8")
    try:
        cand = fp32.programs["candidate"]
        large = _linears(cand, MIN_WEIGHTS)
        assert large >= 1 and _linears(cand) > large  # 256x128 in, the 128x1 head not
        assert _linears(int8.programs["candidate"]) == _linears(cand) - large
        assert len(int8.programs["candidate"]._int8_sources) == large
        assert _linears(int8.programs["user"]) == _linears(fp32.programs["user"])  # once
        assert int8.stats()["dense_dtype"] == "int8"
        diff = max(float((bundle_probs(int8, b) - p).abs().max()) for b, p in ref)
        assert 0 < diff < 0.05  # it is int8 (not the float path), and close
        assert abs(_auc(int8, ref) - _auc(fp32, ref)) <= 0.001
    finally:
        fp32.close()
        int8.close()


@pytest.mark.numerics
def test_quantize_linears_rewrites_every_constant_linear(split_run, tmp_path: Path) -> None:
    """With no size floor every linear of the program is int8, and the program's
    logits stay within the int8 rounding of its float ones."""
    _, run = split_run
    export_bundle(run / "checkpoint", tmp_path / "b")
    fp32 = Scorer.from_bundle(tmp_path / "b")
    try:
        prog = fp32.programs["candidate"]
        args = (torch.randn(1, 3, 8), torch.randn(1, 16), torch.zeros(64, 0),
                torch.randn(64, 2, 8))
        with torch.no_grad():
            want = prog(*args)
        n = _linears(prog)
        assert quantize_linears(prog, min_weights=0) == n and _linears(prog) == 0
        with torch.no_grad():
            got = prog(*args)
        assert not torch.equal(got, want)
        assert float((got - want).abs().max()) <= 0.05 * (1 + float(want.abs().max()))
    finally:
        fp32.close()


@pytest.mark.numerics
def test_dense_int8_follows_a_live_delta(tmp_path: Path) -> None:
    """After a delta the int8 layers are re-quantized from the delta's weights: the
    scores equal those of the delta checkpoint's own bundle served int8."""
    cfg, run = trained(tmp_path / "run", model=SPLIT, train={
        "steps": 40, "checkpoint_every": 20, "delta_every": 10, "keep_checkpoints": 2})
    export_bundle(run / "checkpoints" / "step20", tmp_path / "b20")
    export_bundle(run / "deltas" / "step30", tmp_path / "b30")
    live = Scorer.from_bundle(tmp_path / "b20", dense_dtype="int8")
    direct = Scorer.from_bundle(tmp_path / "b30", dense_dtype="int8")
    try:
        batch = reference(cfg, run / "deltas" / "step30", tmp_path)[0][0]
        before = bundle_probs(live, batch)
        live.apply_delta(run / "deltas" / "step30")
        after = bundle_probs(live, batch)
        assert not torch.equal(before, after)
        assert float((bundle_probs(direct, batch) - after).abs().max()) <= TOL
    finally:
        live.close()
        direct.close()


def test_dense_int8_is_a_cpu_option(split_run, tmp_path: Path) -> None:
    _, run = split_run
    export_bundle(run / "checkpoint", tmp_path / "b")
    with pytest.raises(ValueError, match="dense_dtype: int8 runs on the CPU"):
        Scorer.from_bundle(tmp_path / "b", device="cuda", dense_dtype="int8")
    with pytest.raises(ValueError, match="dense_dtype: 'bf16' is not fp32 or int8"):
        Scorer.from_bundle(tmp_path / "b", dense_dtype="bf16")

"""Export round trip: a bundle scores the eval set as the trained model does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from serve_helpers import bundle_probs, head, reference, trained
from torchmetrics.functional.classification import binary_auroc

from terarec.serve.bundle import BundleError, load_program, read_manifest
from terarec.serve.export import export_bundle
from terarec.serve.scorer import Scorer

# fp32 bundle vs training forward: the same float32 math summed in another order; the
# probabilities are within a few ulps of 1 (sigmoid' <= 1/4 of logit rounding ~1e-6).
TOL = 1e-5


def _max_diff(scorer: Scorer, ref: list[tuple[Any, torch.Tensor]]) -> float:
    return max(float((bundle_probs(scorer, b) - p).abs().max()) for b, p in ref)


def _auc(scorer: Scorer, ref: list[tuple[Any, torch.Tensor]]) -> float:
    probs = torch.cat([bundle_probs(scorer, b) for b, _ in ref])
    labels = torch.cat([b.labels for b, _ in ref]).to(torch.int64)
    return float(binary_auroc(probs, labels))


@pytest.mark.numerics
def test_fp32_bundle_scores_equal_the_trained_model(split_run, tmp_path: Path) -> None:
    cfg, run = split_run
    ref = reference(cfg, run / "checkpoint", tmp_path)
    manifest = export_bundle(run / "checkpoint", tmp_path / "b")
    assert manifest["model"]["mode"] == "split"
    assert manifest["features"]["user"] == ["C1", "C3"]
    assert manifest["features"]["candidate"] == ["C2", "C4"]
    assert manifest["tables"]["sparse"]["rows"] > 0
    scorer = Scorer.from_bundle(tmp_path / "b")
    try:
        assert _max_diff(scorer, ref) <= TOL
    finally:
        scorer.close()


@pytest.mark.numerics
def test_quantised_bundles_keep_auc(split_run, tmp_path: Path) -> None:
    cfg, run = split_run
    ref = reference(cfg, run / "checkpoint", tmp_path)
    aucs, sizes = {}, {}
    for dtype in ("fp32", "fp16", "int8"):
        m = export_bundle(run / "checkpoint", tmp_path / dtype, row_dtype=dtype)
        sizes[dtype] = m["tables"]["sparse"]["row_bytes"]
        s = Scorer.from_bundle(tmp_path / dtype)
        try:
            aucs[dtype] = _auc(s, ref)
        finally:
            s.close()
    assert sizes == {"fp32": 32, "fp16": 16, "int8": 16}
    assert abs(aucs["fp16"] - aucs["fp32"]) <= 0.001, aucs
    assert abs(aucs["int8"] - aucs["fp32"]) <= 0.001, aucs


def test_tiny_cache_budget_scores_like_no_cache(split_run, tmp_path: Path) -> None:
    cfg, run = split_run
    ref = reference(cfg, run / "checkpoint", tmp_path)[:1]
    export_bundle(run / "checkpoint", tmp_path / "b")
    plain = Scorer.from_bundle(tmp_path / "b", cache_bytes=0)
    tiny = Scorer.from_bundle(tmp_path / "b", cache_bytes=20 * (4 * 8 + 16))  # 20 rows
    try:
        batch = ref[0][0]
        small = head(batch, 4)
        batches = [small, batch, small, small, batch]
        for bt in batches:  # a few keys (held, then hit), then many (every row evicted)
            assert torch.equal(bundle_probs(tiny, bt), bundle_probs(plain, bt))
        s = tiny.stats()["tables"]["sparse"]
        assert s["rows"] <= 20 and s["hits"] > 0 and s["misses"] > 20
    finally:
        plain.close()
        tiny.close()


@pytest.mark.numerics
def test_dcn_exports_one_program(tmp_path: Path) -> None:
    cfg, run = trained(tmp_path, model={"kind": "dcn", "top_mlp": [16], "dcn_layers": 2,
                                        "dcn_low_rank": 4, "user_features": ["C1"],
                                        "user_dense": True})
    ref = reference(cfg, run / "checkpoint", tmp_path)
    m = export_bundle(run / "checkpoint", tmp_path / "b")
    assert m["model"]["mode"] == "single" and "DCN" in m["model"]["shared"]
    assert m["model"]["programs"] == {"model": "model.pt2"}
    s = Scorer.from_bundle(tmp_path / "b")
    try:
        assert _max_diff(s, ref) <= TOL
    finally:
        s.close()
    # its graph checks the dense input's device (a dtype conversion exported on the
    # CPU): a program loaded for another device checks for that device
    nodes = torch.export.load(str(tmp_path / "b" / "model.pt2")).graph.nodes
    assert {str(n.kwargs["device"]) for n in nodes if "device" in n.kwargs} == {"cpu"}
    moved = load_program(tmp_path / "b" / "model.pt2", device="meta")
    assert {str(n.kwargs["device"]) for n in moved.graph.nodes  # type: ignore[union-attr]
            if "device" in n.kwargs} == {"meta"}
    assert {p.device.type for p in moved.parameters()} == {"meta"}


@pytest.mark.numerics
def test_delta_and_ssd_tier_checkpoints_export(tmp_path: Path) -> None:
    # rows in an SSD tier snapshot (host budget far below the table), a delta on top
    cfg, run = trained(tmp_path, model={"user_features": ["C2"]},
                       tables=[{"name": "sparse", "dim": 8, "device_rows": 320,
                                "host_rows": 160}],
                       ssd={"path": str(tmp_path / "ssd")},
                       train={"steps": 40, "checkpoint_every": 20, "delta_every": 10,
                              "keep_checkpoints": 2})
    assert (run / "checkpoint" / "ssd.json").is_file()  # rows in a snapshot
    deltas = sorted((run / "deltas").iterdir())
    assert deltas, "the run wrote no delta"
    for ck in (run / "checkpoint", deltas[-1]):
        ref = reference(cfg, ck, tmp_path / ck.name)
        out = tmp_path / f"b_{ck.name}"
        m = export_bundle(ck, out)
        assert m["checkpoint"]["kind"] == ("delta" if ck != run / "checkpoint" else "full")
        s = Scorer.from_bundle(out)
        try:
            assert _max_diff(s, ref) <= TOL
        finally:
            s.close()


def test_bundle_files_are_checked(split_run, tmp_path: Path) -> None:
    _, run = split_run
    export_bundle(run / "checkpoint", tmp_path / "b")
    read_manifest(tmp_path / "b", verify="full")
    with pytest.raises(FileExistsError):
        export_bundle(run / "checkpoint", tmp_path / "b")
    prog = tmp_path / "b" / "candidate.pt2"
    data = bytearray(prog.read_bytes())
    data[len(data) // 2] ^= 1
    prog.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="candidate.pt2: sha256"):
        Scorer.from_bundle(tmp_path / "b")


def test_cli_exports_and_scores(split_run, tmp_path: Path, capsys) -> None:
    import json

    from terarec.cli import main

    _, run = split_run
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "b"),
                 "--row-dtype", "int8"]) == 0
    assert "split model" in capsys.readouterr().out
    req = {"user": {"C1": 3, "C3": [4, 5]}, "dense": [0.1, 0.2, 0.3, 0.4],
           "candidates": {"C2": [1, 2, 3], "C4": [7, 8, 9]}, "ids": ["a", "b", "c"]}
    (tmp_path / "r.json").write_text(json.dumps(req))
    assert main(["score", "--bundle", str(tmp_path / "b"), "--request",
                 str(tmp_path / "r.json"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "scored 3 candidates with the model of step 40" in out
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "b")]) == 1
    assert "exists" in capsys.readouterr().err


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["deepfm", "wide_deep"])
def test_fm_models_export_as_one_program_that_scores_as_trained(kind: str,
                                                                tmp_path: Path) -> None:
    """DeepFM and Wide & Deep (rows [first-order weight | embedding], dim 8 + 1) train,
    export as one program and score the eval set as the trained model does."""
    cfg, run = trained(tmp_path / "run", tables=[{"name": "sparse", "dim": 9}],
                       model={"kind": kind, "top_mlp": [16], "user_features": ["C1"]})
    ref = reference(cfg, run / "checkpoint", tmp_path)
    manifest = export_bundle(run / "checkpoint", tmp_path / "b")
    assert manifest["model"]["mode"] == "single"
    assert "deep MLP mixes every feature" in manifest["model"]["shared"]
    scorer = Scorer.from_bundle(tmp_path / "b")
    try:
        assert _max_diff(scorer, ref) <= TOL
        assert _auc(scorer, ref) > 0.6  # it learned
    finally:
        scorer.close()

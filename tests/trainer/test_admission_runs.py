"""The trainer with admission: counters in metrics.jsonl, exact resume, config errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_loop import assert_same_run, tables_by_key
from test_tiers import TIERED, assert_same_result, without_tiers

from terarec.config import Config, ConfigError, load_config
from terarec.trainer.checkpoint import CheckpointError, read_manifest
from terarec.trainer.loop import describe_final, train
from terarec.trainer.report import read_jsonl

ADMISSION = {"min_count": 3, "width": 4096, "depth": 4, "decay_every": 15}
ADMITTED: dict[str, Any] = {
    "tables": [{"name": "sparse", "dim": 8, "admission": ADMISSION}],
    "data": {"synthetic": {"vocab_size": 2000}},  # a long tail of rare ids
    "train": {"eval_every": 20},
}
COUNTERS = ("observed", "admitted", "rejected", "rejected_values", "decays")


def admission_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r["tiers"]["sparse"].items() if k.startswith("admission_")}
        for r in records
        if r["split"] == "train"
    ]


def test_counters_reach_metrics_and_summary(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(name="adm", **ADMITTED)
    summary = train(cfg)
    plain = train(tiny_config(name="all", **{**ADMITTED, "tables": [{"name": "sparse", "dim": 8}]}))
    rows = summary["rows"]["sparse"]
    assert 0 < rows < 0.7 * plain["rows"]["sparse"]  # the rare ids got no row
    tot = summary["tiers"]["sparse"]
    assert tot["admission_admitted"] == rows  # every row of the run came through admission
    assert tot["admission_observed"] == tot["admission_admitted"] + tot["admission_rejected"]
    assert tot["admission_rejected_values"] >= tot["admission_rejected"] > 0
    assert tot["admission_decays"] == 40 // 15 and tot["admission_bytes"] == 4 * 4096 * 4
    per = admission_of(read_jsonl(Path(cfg.train.runs_dir) / "adm" / "metrics.jsonl"))
    assert len(per) == 4
    for key in COUNTERS:  # intervals add up to the totals
        assert sum(p[f"admission_{key}"] for p in per) == tot[f"admission_{key}"], key
    assert "admission sparse: " in describe_final(summary, cfg)
    assert "tiers" not in plain


@pytest.mark.numerics
def test_resume_is_exact_with_admission(tiny_config: Callable[..., Config]) -> None:
    straight = train(tiny_config(name="straight", **ADMITTED))
    half = tiny_config(name="resumed", **ADMITTED)
    half.train.steps = 20
    train(half)
    runs = Path(half.train.runs_dir)
    ckpt = runs / "resumed" / "checkpoint"
    assert read_manifest(ckpt)["step"] == 20
    sketch = torch.load(ckpt / "tables.pt", weights_only=True)["sparse"]["admission"]
    assert sketch["calls"] == 20 and int(sketch["sketch"]["counters"].sum()) > 0
    resumed = train(tiny_config(name="resumed", **ADMITTED), resume=ckpt)
    # rows, dense state, data position, and every metrics line, admission counters included
    assert_same_run(runs / "straight", straight, runs / "resumed", resumed)


def test_tiered_resume_is_exact_with_admission(tiny_config: Callable[..., Config]) -> None:
    table = {**TIERED["tables"][0], "admission": ADMISSION}
    over = {**TIERED, "tables": [table]}
    straight = train(tiny_config(name="straight", **over))
    plain = train(
        tiny_config(
            name="plain",
            **{**over, "ssd": {}, "tables": [{"name": "sparse", "dim": 8, "admission": ADMISSION}]},
        )
    )
    runs = Path(tiny_config().train.runs_dir)
    # the tiers do not change what is admitted, nor any row
    assert_same_result(runs / "straight", straight, runs / "plain", plain)
    half = tiny_config(name="resumed", **over)
    half.train.steps = 30
    train(half)
    ckpt = runs / "resumed" / "checkpoint"
    resumed = train(tiny_config(name="resumed", **over), resume=ckpt)
    assert_same_result(runs / "straight", straight, runs / "resumed", resumed)
    a = read_jsonl(runs / "straight" / "metrics.jsonl")
    b = read_jsonl(runs / "resumed" / "metrics.jsonl")
    assert without_tiers(a) == without_tiers(b)
    assert admission_of(a) == admission_of(b)  # unlike the cache counters, these carry over
    keys = tables_by_key(runs / "straight" / "checkpoint")["sparse"]["keys"]
    assert keys.numel() == straight["tiers"]["sparse"]["admission_admitted"]


def test_resume_with_another_sketch_is_refused(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(name="a", **{**ADMITTED, "train": {"steps": 5}})
    train(cfg)
    ckpt = Path(cfg.train.runs_dir) / "a" / "checkpoint"
    table = {"name": "sparse", "dim": 8, "admission": {**ADMISSION, "width": 2048}}
    other = tiny_config(name="a", **{**ADMITTED, "tables": [table], "train": {"steps": 10}})
    with pytest.raises(CheckpointError, match="width 4096 in the checkpoint, 2048 here"):
        train(other, resume=ckpt)
    # a new min_count reads the same counts: allowed
    table = {"name": "sparse", "dim": 8, "admission": {**ADMISSION, "min_count": 2}}
    lower = tiny_config(name="a", **{**ADMITTED, "tables": [table], "train": {"steps": 10}})
    assert train(lower, resume=ckpt)["steps"] == 10


@pytest.mark.parametrize(
    "admission, message",
    [
        (
            {"min_count": 0},
            r"tables\[0\]\.admission\.min_count: must be in \[1, 2\^31 - 1\], got 0",
        ),
        ({"min_count": 3, "width": 0}, r"tables\[0\]\.admission\.width: must be in"),
        ({"min_count": 3, "depth": 33}, r"tables\[0\]\.admission\.depth: must be in \[1, 32\]"),
        ({"min_count": 3, "decay_every": -1}, r"tables\[0\]\.admission\.decay_every: must be >= 0"),
        ({"width": 64}, r"tables\[0\]\.admission\.min_count: required key is missing"),
        (
            {"min_count": 3, "min_cout": 2},
            r"tables\[0\]\.admission\.min_cout: unknown key \(allowed: decay_every, depth, "
            r"min_count, width\)",
        ),
        (3, r"tables\[0\]\.admission: expected a mapping, got int"),
        ({"min_count": 2.5}, r"tables\[0\]\.admission\.min_count: expected an integer"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, admission: Any, message: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(
        "name: x\ntables:\n  - name: sparse\n    dim: 8\n    admission: PLACEHOLDER\n".replace(
            "PLACEHOLDER", repr(admission).replace("'", "")
        )
    )
    with pytest.raises(ConfigError, match=f"{tmp_path}/x.yaml: {message}"):
        load_config(path)


def test_config_admission_off_by_default_and_settable(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("name: x\ntables:\n  - name: sparse\n    dim: 8\n    admission: null\n")
    assert load_config(path).tables[0].admission is None
    cfg = load_config(path, ["tables[0].admission={min_count: 5}"])
    adm = cfg.tables[0].admission
    assert adm is not None and (adm.min_count, adm.width, adm.depth, adm.decay_every) == (
        5,
        1 << 20,
        4,
        0,
    )

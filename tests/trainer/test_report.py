"""RunReporter: jsonl lines, NaN handling, atomic summary, config, a real PNG."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from terarec.config import Config, TableConfig, config_to_dict
from terarec.trainer.report import RunReporter, read_jsonl, to_jsonable


def fill(rep: RunReporter, steps: int = 20, oracle_in_eval: bool = False) -> None:
    for step in range(1, steps + 1):
        rep.log(
            step * 10,
            "train",
            {"loss": 0.7 * math.exp(-step / 8) + 0.4, "samples_per_s": 9e4 + 1e3 * step},
        )
        if step % 5 == 0:
            eval_metrics = {"auc": 0.7 + 0.004 * step, "logloss": 0.5 - 0.003 * step}
            if oracle_in_eval:
                eval_metrics["oracle_auc"] = 0.8
            rep.log(step * 10, "eval", eval_metrics)


def test_creates_run_dir_and_jsonl_parses(tmp_path: Path) -> None:
    rep = RunReporter(tmp_path / "runs" / "exp1")
    assert rep.run_dir.is_dir() and rep.name == "exp1"
    fill(rep, steps=10)
    lines = rep.metrics_path.read_text().splitlines()
    assert len(lines) == 12
    rows = [json.loads(line) for line in lines]
    assert rows[0]["step"] == 10 and rows[0]["split"] == "train"
    assert isinstance(rows[0]["time"], float) and rows[0]["time"] > 1.6e9
    assert [r["step"] for r in rep.records("eval")] == [50, 100]
    # a resumed run appends to the same log
    RunReporter(tmp_path / "runs" / "exp1").log(110, "train", {"loss": 0.4})
    assert len(rep.records()) == 13


def test_values_are_json_safe(tmp_path: Path) -> None:
    rep = RunReporter(tmp_path / "r")
    rec = rep.log(
        3,
        "eval",
        {
            "auc": float("nan"),
            "ne": torch.tensor(float("inf")),
            "logloss": torch.tensor(0.25, dtype=torch.float64),
            "ctr": np.float32(0.125),
            "samples": np.int64(7),
            "hist": torch.tensor([1.0, float("nan")]),
        },
    )
    line = rep.metrics_path.read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    parsed = json.loads(line)
    assert parsed == rec
    assert parsed["auc"] is None and parsed["ne"] is None
    assert parsed["logloss"] == 0.25 and parsed["ctr"] == 0.125 and parsed["samples"] == 7
    assert parsed["hist"] == [1.0, None]
    with pytest.raises(TypeError, match="cannot write a object"):
        to_jsonable(object())


def test_log_errors(tmp_path: Path) -> None:
    rep = RunReporter(tmp_path / "r")
    with pytest.raises(ValueError, match="reserved"):
        rep.log(1, "train", {"step": 3})
    with pytest.raises(ValueError, match="split"):
        rep.log(1, "", {"loss": 1.0})


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    rep = RunReporter(tmp_path / "r")
    rep.log(1, "train", {"loss": 1.0})
    with rep.metrics_path.open("a") as f:
        f.write('{"step": 2, "spl')
    assert len(read_jsonl(rep.metrics_path)) == 1


def test_summary_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = RunReporter(tmp_path / "r")
    rep.write_summary({"best_auc": 0.78, "final_ne": float("nan"), "steps": np.int64(100)})
    assert rep.read_summary() == {"best_auc": 0.78, "final_ne": None, "steps": 100}

    calls: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        calls.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    rep.write_summary({"best_auc": 0.79})
    assert len(calls) == 1 and calls[0][1] == str(rep.summary_path)
    assert Path(calls[0][0]).parent == rep.run_dir
    assert rep.read_summary() == {"best_auc": 0.79}

    # a failure while writing leaves the previous summary intact and no temp file
    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        rep.write_summary({"best_auc": 0.5})
    assert rep.read_summary() == {"best_auc": 0.79}
    assert sorted(p.name for p in rep.run_dir.iterdir()) == ["summary.json"]


def test_save_config_round_trips(tmp_path: Path) -> None:
    rep = RunReporter(tmp_path / "r")
    cfg = Config(name="r", tables=[TableConfig(name="t", dim=8)])
    path = rep.save_config(config_to_dict(cfg))
    loaded = yaml.safe_load(path.read_text())
    assert loaded == config_to_dict(cfg)
    assert loaded["model"]["kind"] == "dlrm"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("oracle_in", ["summary", "eval", "none"])
def test_plot_writes_a_real_png(tmp_path: Path, oracle_in: str) -> None:
    rep = RunReporter(tmp_path / "runs" / f"plot-{oracle_in}")
    fill(rep, oracle_in_eval=oracle_in == "eval")
    rep.log(200, "eval", {"auc": float("nan"), "logloss": 0.44})  # null point is skipped
    if oracle_in == "summary":
        rep.write_summary({"oracle_auc": 0.81})
    path = rep.plot()
    assert path == rep.run_dir / "curves.png"
    width, height = _png_size(path)
    assert width >= 800 and height >= 600
    assert path.stat().st_size > 20_000


def test_plot_draws_train_auc_and_tier_hit_rates(tmp_path: Path) -> None:
    """The AUC panel holds the train window's AUC next to the eval's, and the hit-rate
    panel one line per table tier, with the logged values."""
    rep = RunReporter(tmp_path / "hits")
    for step in (10, 20, 30):
        rep.log(step, "train", {"loss": 0.5, "auc": 0.6 + step / 1000, "tiers": {
            "t": {"device_hit_rate": step / 100, "host_hit_rate": 0.9, "rows": 5}}})
    rep.log(30, "eval", {"auc": 0.7, "logloss": 0.4})
    axes = {ax.get_title(): ax for ax in rep.figure().axes}
    lines = {ln.get_label(): ln for ln in axes["AUC (eval; train: its window)"].get_lines()}
    assert list(lines["train auc"].get_ydata()) == pytest.approx([0.61, 0.62, 0.63])
    assert list(lines["eval auc"].get_ydata()) == [0.7]
    hits = {ln.get_label(): ln for ln in axes["Tier hit rates"].get_lines()}
    assert list(hits["t device"].get_xdata()) == [10, 20, 30]
    assert list(hits["t device"].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    assert list(hits["t host"].get_ydata()) == pytest.approx([0.9] * 3)


def test_plot_with_no_data(tmp_path: Path) -> None:
    rep = RunReporter(tmp_path / "empty")
    assert _png_size(rep.plot(oracle_auc=0.8))[0] >= 800


def test_files_the_run_writes_are_readable_like_any_other(tmp_path: Path) -> None:
    """``summary.json`` and ``config.yaml`` are written atomically, but not private: the
    same mode as a file written plainly (0o666 less the umask)."""
    import stat

    from terarec.trainer.report import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "summary.json", "{}")
    mode = stat.S_IMODE(os.stat(tmp_path / "summary.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(plain).st_mode)
    assert not list(tmp_path.glob(".*.tmp"))

"""A wrong eval file fails before the first training step (it used to fail, or give NaN
metrics, only after the run), naming the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from terarec.config import config_from_dict
from terarec.data import DataError, check_eval_data
from terarec.trainer.loop import train


def config(tmp_path: Path, train_file: Path, eval_files: list[Path]) -> Any:
    return config_from_dict({
        "name": "evcheck",
        "data": {"kind": "criteo", "path": [str(train_file)],
                 "eval_path": [str(p) for p in eval_files], "batch_size": 32},
        "tables": [{"name": "sparse", "dim": 4}],
        "model": {"kind": "dlrm", "bottom_mlp": [8, 4], "top_mlp": [8]},
        "train": {"steps": 5, "device": "cpu", "threads": 1, "progress": False,
                  "runs_dir": str(tmp_path / "runs")},
    }, "<evcheck>")


@pytest.mark.parametrize("content", ["garbage\nmore,garbage\n", "", "0\t1\t2\n"])
def test_a_wrong_eval_file_fails_before_training(
        tmp_path: Path, write_criteo: Callable[..., Path], content: str) -> None:
    good = write_criteo("train.tsv", range(100))
    ok_eval = write_criteo("eval_ok.tsv", range(100, 150))
    bad = tmp_path / "eval_bad.tsv"
    bad.write_text(content)
    cfg = config(tmp_path, good, [ok_eval, bad])
    with pytest.raises(DataError, match="eval_bad.tsv: eval data without one valid row"):
        train(cfg)
    assert not (tmp_path / "runs" / "evcheck").exists()  # no step, no run left behind


def test_good_eval_files_pass_and_train(tmp_path: Path,
                                        write_criteo: Callable[..., Path]) -> None:
    good = write_criteo("train.tsv", range(100))
    evals = [write_criteo(f"eval{i}.tsv", range(100 + 50 * i, 150 + 50 * i))
             for i in range(2)]
    cfg = config(tmp_path, good, evals)
    check_eval_data(cfg.data, cfg.seed)
    summary = train(cfg)
    assert summary["steps"] == 5


def test_a_missing_eval_file_is_named(tmp_path: Path, write_criteo: Callable[..., Path]
                                      ) -> None:
    cfg = config(tmp_path, write_criteo("train.tsv", range(10)), [tmp_path / "nope.tsv"])
    with pytest.raises(DataError, match="nope.tsv"):
        check_eval_data(cfg.data, cfg.seed)

"""Data named by URL (``file://`` here; any pyarrow.fs store the same way) and
compressed data train to exactly the result of the plain local file."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from terarec.config import config_from_dict
from terarec.data import DataError
from terarec.data.files import expand_paths
from terarec.trainer.checkpoint import read_tables
from terarec.trainer.loop import train


def test_url_entries_name_files_directories_and_globs(tmp_path: Path) -> None:
    for name in ("b.tsv", "a.tsv", "c.txt", ".hidden"):
        (tmp_path / name).write_text("x\n")
    url = f"file://{tmp_path}"
    assert expand_paths([url]) == [f"{url}/{n}" for n in ("a.tsv", "b.tsv", "c.txt")]
    assert expand_paths([f"{url}/*.tsv"]) == [f"{url}/a.tsv", f"{url}/b.tsv"]
    assert expand_paths([f"{url}/a.tsv"]) == [f"{url}/a.tsv"]
    with pytest.raises(DataError, match="nope.tsv: no such file"):
        expand_paths([f"{url}/nope.tsv"])
    with pytest.raises(DataError, match=r"no file matches '\*.parquet'"):
        expand_paths([f"{url}/*.parquet"])


def _run(tmp_path: Path, name: str, path: str) -> dict[str, Any]:
    cfg = config_from_dict({
        "name": name, "seed": 0,
        "data": {"kind": "criteo", "path": [path], "eval_fraction": 0.2, "batch_size": 16,
                 "chunk_rows": 32, "shuffle_buffer": 32},
        "tables": [{"name": "sparse", "dim": 4}],
        "model": {"kind": "dlrm", "bottom_mlp": [8, 4], "top_mlp": [8]},
        "train": {"steps": 12, "device": "cpu", "threads": 1, "progress": False,
                  "runs_dir": str(tmp_path / "runs")}}, f"<{name}>")
    summary = train(cfg)
    ckpt = tmp_path / "runs" / name / "checkpoint"
    dense = torch.load(ckpt / "dense.pt", weights_only=True)["model"]
    return {"tables": read_tables(ckpt)["sparse"], "dense": dense, "summary": summary}


def test_gzip_zstd_and_url_train_exactly_as_the_plain_file(
        tmp_path: Path, write_criteo: Callable[..., Path]) -> None:
    import pyarrow as pa

    plain = write_criteo("day.tsv", range(300))
    gz = tmp_path / "day.tsv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "z").mkdir()
    zst = tmp_path / "z" / "day.tsv"  # zstd under a plain name: found by its magic number
    zst.write_bytes(pa.Codec("zstd").compress(plain.read_bytes(), asbytes=True))
    want = _run(tmp_path, "plain", str(plain))
    for name, path in (("gz", str(gz)), ("zst", str(zst)), ("url", f"file://{plain}"),
                       ("url_gz", f"file://{gz}")):
        got = _run(tmp_path, name, path)
        for k in ("keys", "rows"):
            ok = torch.argsort(got["tables"]["keys"]), torch.argsort(want["tables"]["keys"])
            assert torch.equal(got["tables"][k][ok[0]], want["tables"][k][ok[1]]), (name, k)
        assert all(torch.equal(got["dense"][k], want["dense"][k]) for k in want["dense"]), name

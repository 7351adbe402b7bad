"""The synthetic Criteo writer (used by the launch tests and benchmarks/scaling.py):
every line reads back through the criteo reader, the same arguments write the same
bytes, and ``vocab`` bounds the distinct values of a feature."""

from __future__ import annotations

from pathlib import Path

from terarec.config import DataConfig, DataKind
from terarec.data import build_source
from terarec.data.criteo_writer import write_criteo


def test_written_file_reads_back(tmp_path: Path) -> None:
    p = write_criteo(tmp_path / "a.tsv", 200, seed=1, vocab=5)
    assert p == tmp_path / "a.tsv"
    cfg = DataConfig(kind=DataKind.CRITEO, path=[str(p)], batch_size=64, prefetch_batches=0)
    src = build_source(cfg, "train", seed=0, epochs=1)
    batches = list(src)
    assert src.stats()["rows_skipped_total"] == 0
    assert sum(b.labels.numel() for b in batches) == 200
    labels = {float(v) for b in batches for v in b.labels}
    assert labels == {0.0, 1.0}
    lines = p.read_text().splitlines()
    for f in range(26):  # at most vocab distinct values per feature
        assert len({line.split("\t")[14 + f] for line in lines}) <= 5


def test_same_arguments_same_bytes(tmp_path: Path) -> None:
    a = write_criteo(tmp_path / "a.tsv", 50, seed=7).read_bytes()
    assert write_criteo(tmp_path / "b.tsv", 50, seed=7).read_bytes() == a
    assert write_criteo(tmp_path / "c.tsv", 50, seed=8).read_bytes() != a

"""Shared fixtures for the data-layer tests: tiny files written into tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def criteo_line(i: int, label: int = 0, missing: bool = False) -> str:
    """A valid Criteo row whose I1 is ``i`` (a row id for set comparisons)."""
    dense = [str(i)] + [str((i * 7 + j) % 50) for j in range(12)]
    cats = [f"{(i * 31 + j * 1_000_003) % 2**32:08x}" for j in range(26)]
    if missing:
        dense[2] = ""
        cats[0] = ""
    return "\t".join([str(label), *dense, *cats])


@pytest.fixture
def write_criteo(tmp_path: Path) -> Callable[..., Path]:
    def write(name: str, ids: range, extra: dict[int, str] | None = None) -> Path:
        lines = [criteo_line(i, label=int(i % 3 == 0), missing=i % 5 == 0) for i in ids]
        for pos, text in sorted((extra or {}).items()):
            lines.insert(pos, text)
        p = tmp_path / name
        p.write_text("\n".join(lines) + "\n")
        return p

    return write


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "criteo_kaggle_head10k.tsv").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA.resolve()}")
    return SHARED_DATA


def batch_arrays(b: Any) -> tuple:
    """A comparable view of a Batch."""
    return (
        b.dense.numpy().tobytes(),
        b.labels.numpy().tobytes(),
        b.sparse.values().numpy().tobytes(),
        b.sparse.lengths().numpy().tobytes(),
        tuple(b.sparse.keys()),
    )


@pytest.fixture
def as_tuple() -> Callable[[Any], tuple]:
    return batch_arrays


def auc(p: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(p, kind="stable")
    r = np.empty(len(p))
    r[order] = np.arange(1, len(p) + 1)
    npos = y.sum()
    return float((r[y == 1].sum() - npos * (npos + 1) / 2) / (npos * (len(y) - npos)))


@pytest.fixture
def roc_auc() -> Callable[[np.ndarray, np.ndarray], float]:
    return auc

"""Tiny synthetic run configs for the trainer tests (each run takes well under a second)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from terarec.config import Config, config_from_dict

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "kind": "synthetic",
        "batch_size": 64,
        "eval_batch_size": 1024,
        "synthetic": {
            "num_dense": 4,
            "num_sparse": 4,
            "vocab_size": 200,
            "zipf_alpha": 1.2,
            "teacher_scale": 1.5,
            "teacher_pairwise_scale": 0.3,
            "eval_samples": 2048,
        },
    },
    "tables": [{"name": "sparse", "dim": 8}],
    "model": {"kind": "dlrm", "bottom_mlp": [16, 8], "top_mlp": [16]},
    "optimizer": {"sparse": {"kind": "adam", "lr": 0.05}, "dense": {"kind": "adam", "lr": 0.01}},
    "train": {
        "steps": 40,
        "log_every": 10,
        "device": "cpu",
        # One thread: fast for tensors this small, and immune to a busy neighbour.
        "threads": 1,
        "progress": False,
    },
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep copy of ``base`` with the nested mapping ``over`` merged in."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """``train()`` sets torch's process-wide thread count; give it back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make_tiny(runs_dir: Path, **over: Any) -> Config:
    """The TINY config writing runs under ``runs_dir``, with sections ``over`` merged in."""
    data = merge(TINY, {"train": {"runs_dir": str(runs_dir)}})
    return config_from_dict(merge(data, over), "<tiny>")


@pytest.fixture(scope="session")
def tiny_factory() -> Callable[..., Config]:
    """:func:`make_tiny` for fixtures of any scope."""
    return make_tiny


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., Config]:
    """``tiny_config(**sections)``: the TINY config, runs under ``tmp_path/runs``.

    Keyword arguments are sections merged into TINY, e.g.
    ``tiny_config(name="a", train={"steps": 20})``.
    """

    def make(**over: Any) -> Config:
        return make_tiny(tmp_path / "runs", **over)

    return make

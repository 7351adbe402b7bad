"""Fixtures shared by the multi-rank training tests of this folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from train_helpers import equivalence_config, one_process


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A directory per test module: its data files and runs."""
    return tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])


@pytest.fixture(scope="module")
def reference(work: Path) -> dict[str, Any]:
    """The one-process run every multi-rank run must reproduce."""
    return one_process(equivalence_config(work, 1, "one"))

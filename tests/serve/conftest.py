"""Fixtures of the serving tests: a trained tiny run with a user/candidate split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serve_helpers import SPLIT, trained


@pytest.fixture(scope="module")
def split_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny DLRM trained with a user/candidate split (C1, C3 and the dense features
    user-side), checkpointed at its end."""
    return trained(tmp_path_factory.mktemp("split"), model=SPLIT)

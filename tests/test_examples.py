"""The examples in examples/ run and do what their docs say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_own_training_loop_learns_and_round_trips_its_state_dict() -> None:
    spec = importlib.util.spec_from_file_location("own_loop", EXAMPLES / "own_training_loop.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    first, last = mod.main()  # asserts the reloaded model scores identically
    assert last < first / 2

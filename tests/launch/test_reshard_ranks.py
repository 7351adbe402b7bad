"""A checkpoint resumed on another rank layout (2 -> 1, 1 -> 2, 2 -> 4 ranks).

Each run trains half of an :func:`equivalence_config` run on one layout, saves (rows in
every tier down to the SSD tier, whose snapshots the resume streams from), and resumes
in place on another layout with the same global batch. The whole run must be the
one-process run: the same loss curve, the same keys (which also checks that the data
position carried over: other rows would touch other keys), rows, Adam moments and
dense weights, within the float32 summation-order bounds of ``run_bounds`` (the layouts
add each gradient's terms in other orders; nothing else differs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from train_helpers import (
    STEPS,
    assert_same_run,
    equivalence_config,
    launch_ranks,
    one_process,
    run_dir,
)


@pytest.fixture(scope="module")
def two_half(work: Path) -> dict[str, Any]:
    """Two ranks, the first half of the run and a step: full checkpoints at steps 2 and
    9, deltas at 4, 6 and 8, the periodic ones written on each rank's background thread
    (``async_checkpoint``: the ranks agree over a process group of their own while
    they train on). Each resume below copies this run."""
    cfg = equivalence_config(work, 2, "two-half", steps=STEPS // 2 + 1)
    cfg["train"].update(delta_every=2, keep_checkpoints=2, async_checkpoint=True)
    launch_ranks(work, cfg, 2, 2)
    return cfg


def _copy(cfg: dict[str, Any], name: str) -> None:
    """The run ``cfg`` under another name (its SSD snapshots stay where ``ssd.json``
    points: read-only, in the original run)."""
    shutil.copytree(run_dir(cfg), run_dir(cfg).with_name(name))


@pytest.mark.numerics
def test_two_ranks_resume_on_one_process(work: Path, two_half: dict[str, Any],
                                         reference: dict[str, Any]) -> None:
    """From a delta: each saved rank's chain (full checkpoint of step 2 with its SSD
    snapshot, deltas of steps 4, 6, 8) is applied as its shard is read."""
    _copy(two_half, "two-to-one")
    cfg = equivalence_config(work, 1, "two-to-one")
    delta = run_dir(cfg) / "deltas" / f"step{STEPS // 2}"
    assert json.loads((delta / "manifest.json").read_text())["parent"]["kind"] == "delta"
    one_process(cfg, resume=delta)
    assert_same_run(cfg, reference)
    manifest = json.loads((run_dir(cfg) / "checkpoint" / "manifest.json").read_text())
    assert "world" not in manifest and manifest["step"] == STEPS


@pytest.mark.numerics
def test_one_process_resumes_on_two_ranks(work: Path, reference: dict[str, Any]) -> None:
    """In place: rank 0's SSD store still holds the one-process run's rows (as they were
    at its end, not at the checkpoint) and is emptied before the rows it owns go in."""
    cfg = equivalence_config(work, 2, "one-to-two")
    one_process(equivalence_config(work, 1, "one-to-two", steps=STEPS // 2))
    launch_ranks(work, cfg, 2, 2, "--resume", str(run_dir(cfg) / "checkpoint"))
    assert_same_run(cfg, reference)
    manifest = json.loads((run_dir(cfg) / "checkpoint" / "manifest.json").read_text())
    assert manifest["world"] == {"size": 2, "fast_groups": [[0, 1]]}


@pytest.mark.numerics
@pytest.mark.slow  # a 4-rank launch
def test_two_ranks_resume_on_two_nodes_of_two(work: Path, two_half: dict[str, Any],
                                              reference: dict[str, Any]) -> None:
    _copy(two_half, "two-to-four")
    cfg = equivalence_config(work, 4, "two-to-four")
    launch_ranks(work, cfg, 4, 2, "--resume", str(run_dir(cfg) / "checkpoint"))
    assert_same_run(cfg, reference)
    manifest = json.loads((run_dir(cfg) / "checkpoint" / "manifest.json").read_text())
    assert manifest["world"]["fast_groups"] == [[0, 1], [2, 3]]

"""Ranks whose table layouts differ all stop at once with the same clear error.

Four gloo ranks, nodes of 2: shard groups ``{0,1}, {2,3}``, replica groups ``{0,2},
{1,3}``. A layout that differs inside one shard group must not leave the other shard
group's ranks waiting in the replica check (or the first lookup) until the process-group
timeout: every rank raises the same ValueError, naming the ranks and the field, well
before the timeout (``layout_worker`` writes each rank's outcome).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.launch.launch_helpers import PY, Ranks, free_port, torchrun_env

WORKER = str(Path(__file__).with_name("layout_worker.py"))
TIMEOUT_S = 120.0
CASES = [
    {"name": "same", "dims": {}},
    {"name": "dim", "dims": {"1": [8]}},  # differs inside shard group {0,1}
    {"name": "groups", "dims": {"3": [4, 6]}},  # rank 3 has a second table group
    {"name": "after", "dims": {}},  # every rank still in step after the errors
]


def test_differing_layouts_fail_fast_on_every_rank(tmp_path: Path) -> None:
    port = free_port()
    with Ranks(tmp_path) as ranks:
        for r in range(4):
            ranks.start([PY, WORKER, str(tmp_path), json.dumps(CASES), str(TIMEOUT_S)],
                        torchrun_env(r, 4, port, local_world=2))
        start = time.monotonic()
        codes = ranks.wait(TIMEOUT_S - 30)
        elapsed = time.monotonic() - start
        logs = "\n".join(ranks.output(i)[-2000:] for i in range(4) if codes[i])
        assert codes == [0, 0, 0, 0], logs
    assert elapsed < TIMEOUT_S / 2

    def outcomes(name: str) -> list[str]:
        return [(tmp_path / name / f"rank{r}.txt").read_text() for r in range(4)]

    assert outcomes("same") == ["ok"] * 4
    assert outcomes("after") == ["ok"] * 4
    dim = outcomes("dim")
    assert len(set(dim)) == 1, dim  # the same message on every rank
    assert "rank 1 " in dim[0] and "ranks [0, 2, 3]" in dim[0], dim[0]
    assert "table group 0 dim 8 vs 4" in dim[0], dim[0]
    groups = outcomes("groups")
    assert len(set(groups)) == 1, groups
    assert "rank 3 " in groups[0] and "table group 1" in groups[0], groups[0]

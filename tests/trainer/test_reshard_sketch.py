"""Pieces of a resharded resume that need no ranks (the runs: tests/launch/
test_reshard_ranks.py)."""

from __future__ import annotations

import torch

from terarec.ps.admission import Admission
from terarec.trainer.checkpoint.reshard import _summed


def test_admission_counts_of_the_saved_shards_add_up() -> None:
    """Each saved rank counted the keys it owned; the new ranks' sketch is their sum:
    the counts of one sketch that saw every key (plain count-min updates add), and
    never below a key's true count with conservative updates."""
    keys = [torch.tensor([1, 2, 3, 3, 9]), torch.tensor([4, 5, 5, 5, 7, 2])]
    for conservative in (False, True):
        shards, whole = [], Admission(3, width=64, depth=3, conservative=False)
        for k in keys:
            a = Admission(3, width=64, depth=3, conservative=conservative)
            uniq, counts = torch.unique(k, return_counts=True)
            a.sketch.add(uniq, counts, conservative=conservative)
            whole.sketch.add(uniq, counts)
            shards.append(a.state_dict())
        merged = Admission(3, width=64, depth=3)
        merged.load_state_dict(_summed(shards))
        all_keys = torch.cat(keys)
        uniq, true = torch.unique(all_keys, return_counts=True)
        got = merged.sketch.estimate(uniq)
        if conservative:
            assert bool((got >= true).all())
        else:
            assert torch.equal(merged.sketch.counters, whole.sketch.counters)
        assert merged.sketch.total == sum(int(s["sketch"]["total"]) for s in shards)

"""KeyMap (int64 -> int64 with deletes) against a Python dict, both backends."""

from __future__ import annotations

import pytest
import torch

from terarec.hashing import mix64_torch
from terarec.ps.index import triton_hash
from terarec.ps.index.hash_index import fbgemm_hashmap_available
from terarec.ps.index.key_map import KeyMap

BACKENDS = ["torch"] + (["fbgemm"] if fbgemm_hashmap_available() else []) + (
    ["triton"] if triton_hash.available(torch.device("cpu")) else []  # TRITON_INTERPRET=1
)
M64 = (1 << 64) - 1


def _unmix_minus_one() -> int:
    from tests.ps.test_hash_index import _unmix64

    return _unmix64(M64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_ops_match_dict(backend: str) -> None:
    g = torch.Generator().manual_seed(1)
    m = KeyMap(capacity=16, backend=backend)  # type: ignore[arg-type]
    ref: dict[int, int] = {}
    special = _unmix_minus_one()
    for step in range(60):
        pool = torch.randint(-300, 300, (200,), generator=g)
        pool = torch.cat([pool, torch.tensor([-1, special, 2**63 - 1, -(2**63)])])
        keys = torch.unique(pool[torch.randperm(pool.numel(), generator=g)[:80]])
        if step % 3 == 2:
            m.delete(keys)
            for k in keys.tolist():
                ref.pop(k, None)
        else:
            vals = torch.randint(0, 10**6, (keys.numel(),), generator=g)
            m.insert(keys, vals)
            ref.update(zip(keys.tolist(), vals.tolist()))
        assert len(m) == len(ref)
        probe = torch.cat([pool, torch.arange(1000, 1010)])
        got = m.find(probe).tolist()
        assert got == [ref.get(k, -1) for k in probe.tolist()]
    k, v = m.items()
    want = {int(mix64_torch(torch.tensor([a]))[0]): b for a, b in ref.items()}
    assert dict(zip(k.tolist(), v.tolist())) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_churn_stays_bounded(backend: str) -> None:
    """A cache's pattern: a fixed number of live keys, endlessly replaced."""
    m = KeyMap(capacity=64, backend=backend)  # type: ignore[arg-type]
    for i in range(200):
        old = torch.arange(i * 50 - 50, i * 50) if i else torch.empty(0, dtype=torch.int64)
        m.delete(old)
        m.insert(torch.arange(i * 50, i * 50 + 50), torch.arange(50))
        assert len(m) == 50
    assert m.capacity <= 512
    assert m.find(torch.arange(9950, 10000)).tolist() == list(range(50))
    assert (m.find(torch.arange(0, 9950)) == -1).all()

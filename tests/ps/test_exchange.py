"""Sharded tables on several gloo processes train exactly like one process.

The issue's acceptance check, at the ``ps`` level: one launch of 4 ranks (nodes of 2,
so fast groups ``{0,1}, {2,3}`` and cross groups ``{0,2}, {1,3}``) trains the model of
``exchange_common`` under SGD, row-wise Adagrad and Adam in three layouts
(``exchange_worker``):

* ``world``: 4 ranks share one shard group and each global batch;
* ``fast``: two independent 2-rank shard groups, each on its own data, replicas passed
  with ``sync_replicas=False`` (nothing crosses the groups);
* ``rep``: 2 shard groups x 2 replicas with replica sync on (k = 1).

Against the same model trained by one process (``process_group=None``) on the same
global batches: the loss of every step and every final row (weights + optimizer state,
gathered from the owners, compared per key) agree within bounds derived from float32
rounding (``tests/numerics.py``: the ranks add each gradient's terms in another order
than one process does); owners hold disjoint key sets whose union is exactly the single
process's; replicas are bitwise identical. The tiered table's device and host budgets
make every rank evict (device -> host -> SSD). The data plants a rank with an empty
batch, a table without keys on a rank and ranks with no keys at all; half the runs
prefetch the next batch through the owners on a background thread. Eval-mode lookups
(owners never create) agree too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.launch.launch_helpers import PY, Ranks, free_port, torchrun_env
from tests.numerics import assert_close, f32_tol, loss_tol, train_tol
from tests.ps import exchange_common as ec

pytestmark = pytest.mark.numerics
WORKER = str(Path(__file__).with_name("exchange_worker.py"))
OPTS = {"sgd": "sgd", "rw": "rowwise_adagrad", "adam": "adam"}
PREFETCH = {"world_rw", "world_adam", "fast_rw", "rep_adam"}
RUNS = [f"{mode}_{tag}" for tag in OPTS for mode in ("world", "fast", "rep")] + ["solo_adam"]
# the most values a global batch holds: the longest sum a row's gradient can be
VALUES = ec.BATCH * len(ec.FEATS) * ec.MAX_BAG


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 4-rank launch running every layout and optimizer."""
    out = tmp_path_factory.mktemp("exchange")
    spec = []
    for name in RUNS:
        mode, tag = name.split("_")
        (out / name).mkdir()
        spec.append({"name": name, "opt": OPTS[tag], "prefetch": name in PREFETCH,
                     "mode": {"rep": "replicas"}.get(mode, mode)})
    port = free_port()
    with Ranks(out) as ranks:
        for r in range(4):
            ranks.start([PY, WORKER, str(out), json.dumps(spec)],
                        torchrun_env(r, 4, port, local_world=2))
        codes = ranks.wait(240)
        logs = "\n".join(ranks.output(i)[-2000:] for i in range(4) if codes[i])
        assert codes == [0, 0, 0, 0], logs
    return out


_REFS: dict[tuple[str, int], dict[str, Any]] = {}


def reference(opt: str, seed: int) -> dict[str, Any]:
    """The single-process run (same tiers, budgets and data)."""
    if (opt, seed) not in _REFS:
        with tempfile.TemporaryDirectory() as d:
            ebc, head, store = ec.build(opt, Path(d))
            grads: list[float] = []
            losses = ec.train(ebc, head, seed, grads=grads)
            _REFS[(opt, seed)] = {
                "losses": losses, "rows": ec.rows_of(ebc), "eval": ec.eval_pooled(ebc, seed),
                "opt": opt, "grad": max(grads), "dims": {t.name: t.dim for t in ebc.tables},
            }
            store.close()
    return _REFS[(opt, seed)]


def load(out: Path, name: str, ranks: list[int]) -> list[dict[str, Any]]:
    return [torch.load(out / name / f"rank{r}.pt", weights_only=False) for r in ranks]


def assert_losses(results: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    """Every rank saw the single process's global loss curve."""
    want = ref["losses"]
    tol = torch.tensor([loss_tol(w, step, ec.BATCH) for step, w in enumerate(want)])
    for r in results:
        assert_close(r["losses"], want, tol, "losses")


def weight_tol(ref: dict[str, Any], weights: torch.Tensor) -> float:
    """``STEPS`` updates of a row, each from a gradient whose terms (up to every value of
    the global batch) the ranks add in another order than one process: Adam and
    row-wise Adagrad normalise the update to ~lr, SGD's is lr * g."""
    grad = ref["grad"] if ref["opt"] == "sgd" else 1.0
    size = float(weights.abs().max()) if weights.numel() else 0.0
    return train_tol(ec.optimizer(ref["opt"]).lr, ec.STEPS, VALUES, size, grad)


def state_tol(ref: dict[str, Any], state: torch.Tensor) -> float:
    """The optimizer state (row-wise Adagrad's sum of g^2, Adam's m and v): ``STEPS``
    roundings of its size plus, per step, a change of at most max(|g|, g^2) computed
    from a gradient summed in another order (``VALUES`` terms)."""
    g = ref["grad"]
    size = float(state.abs().max()) if state.numel() else 0.0
    return f32_tol(size + max(g, g * g) * VALUES, ec.STEPS)


def assert_rows(owners: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    """The owners' rows (weights + optimizer state) together are the single process's."""
    for t, (keys, rows) in ref["rows"].items():
        ks = torch.cat([r["rows"][t][0] for r in owners])
        rs = torch.cat([r["rows"][t][1] for r in owners])
        assert ks.unique().numel() == ks.numel(), f"{t}: a key has two owners"
        order = torch.argsort(ks)
        assert torch.equal(ks[order], keys), f"{t}: the owners' keys differ from one process's"
        dim = ref["dims"][t]
        w, st = rows[:, :dim], rows[:, dim:]
        assert_close(rs[order][:, :dim], w, weight_tol(ref, w), f"{t}: weights")
        assert_close(rs[order][:, dim:], st, state_tol(ref, st), f"{t}: optimizer state")


def assert_eval(results: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    """Eval-mode lookups: the ranks' slices together are the single process's batch."""
    # a bag pools up to MAX_BAG rows, each within its weight bound, and rounds the sum
    tol = max(weight_tol(ref, rows[:, : ref["dims"][t]]) for t, (_, rows) in ref["rows"].items())
    tol = ec.MAX_BAG * tol + f32_tol(float(ref["eval"].abs().max()), terms=ec.MAX_BAG)
    assert_close(torch.cat([r["eval"] for r in results]), ref["eval"], tol, "eval pooling")


def assert_evicted(results: list[dict[str, Any]]) -> None:
    for r in results:  # budgets force every eviction path on every rank
        big = r["stats"]["big"]
        assert big["device_evictions"] > 0 and big["host_evictions"] > 0, big


@pytest.mark.parametrize("tag", list(OPTS))
def test_world_shard_group_matches_one_process(runs: Path, tag: str) -> None:
    results = load(runs, f"world_{tag}", [0, 1, 2, 3])
    ref = reference(OPTS[tag], 100)
    assert_losses(results, ref)
    assert_rows(results, ref)
    assert_eval(results, ref)
    assert_evicted(results)
    if f"world_{tag}" in PREFETCH:  # the owners made the next batch resident
        assert all(r["stats"]["big"]["prefetch_rows_in"] > 0 for r in results)


@pytest.mark.parametrize("tag", list(OPTS))
def test_two_rank_shard_groups_without_replica_sync(runs: Path, tag: str) -> None:
    """Each fast group trains its own data; with sync off nothing crosses the groups."""
    for node, ranks in enumerate(([0, 1], [2, 3])):
        results = load(runs, f"fast_{tag}", ranks)
        ref = reference(OPTS[tag], 100 + node)
        assert_losses(results, ref)
        assert_rows(results, ref)
        assert_eval(results, ref)
        assert_evicted(results)


@pytest.mark.parametrize("tag", list(OPTS))
def test_replicas_synced_every_step(runs: Path, tag: str) -> None:
    """2 shard groups x 2 replicas, sync on: the global batch split over 4 ranks; each
    shard group holds the whole table, replicas of one shard hold the same bits."""
    results = load(runs, f"rep_{tag}", [0, 1, 2, 3])
    ref = reference(OPTS[tag], 100)
    assert_losses(results, ref)
    assert_rows(results[:2], ref)
    assert_rows(results[2:], ref)
    assert_eval(results, ref)
    assert_evicted(results)
    for x, y in ((0, 2), (1, 3)):
        for t in results[x]["rows"]:
            assert torch.equal(results[x]["rows"][t][0], results[y]["rows"][t][0])
            assert torch.equal(results[x]["rows"][t][1], results[y]["rows"][t][1])


def test_one_rank_shard_groups_with_four_replicas(runs: Path) -> None:
    """Shard groups of one rank (nodes of one GPU), 4 replicas synced every step: every
    rank holds every row, all bitwise equal, and equal to one process."""
    results = load(runs, "solo_adam", [0, 1, 2, 3])
    ref = reference("adam", 100)
    assert_losses(results, ref)
    for r in results:
        assert_rows([r], ref)
        for t in r["rows"]:
            assert torch.equal(r["rows"][t][1], results[0]["rows"][t][1])
    assert_eval(results, ref)
    assert_evicted(results)

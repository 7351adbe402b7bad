"""k-step merging (``optim/kstep.py``) on a real 3-process gloo job against a plain
reference.

Three replicas (each a node of one rank) train a one-feature table on fixed key
schedules in which rows are touched by some replicas only (and one replica receives a
row it never had), with a known row gradient per rank, and a dense parameter with a
known gradient; they merge every 2 steps. A float64 re-enactment of the whole schedule
(Adagrad rows, Adam dense, the merge rules of docs/kstep.md) must match every rank's
rows and weights, the replicas must agree bit for bit, and the same run with tiny
device/host budgets (rows evicted to the host and SSD tiers between merges) must end
with exactly the same rows.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from terarec.config import InitConfig
from terarec.ps.group import table_seed
from terarec.ps.initializer import init_rows
from tests.numerics import EPS_BF16, assert_close, f32_tol, f64_tol, rounding_tol

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from kstep_worker import (  # noqa: E402
    ALL_KEYS,
    DIM,
    SCHEDULE,
    SCHEDULES,
    dense_grad,
    row_grad_weight,
)

R = 3
K = 2
LR_ROWS, LR_DENSE, EPS = 0.1, 0.01, 1e-8
STEPS = len(SCHEDULE[0])
MERGES = STEPS // K


def float32_bound(want: Any) -> torch.Tensor:
    """Per element, the float32 run against the float64 re-enactment
    (tests/numerics.py): each of the STEPS local steps and merges rounds a few
    operations of the value's size (at least 1: the updates are ~lr, the gradients
    O(1)); a merge sums the R replicas' deltas. Adam's normalised step adds nothing
    here: the gradients are exact constants, nothing cancels."""
    return f32_tol(steps=STEPS, terms=R) * torch.as_tensor(want, dtype=torch.float64).abs().clamp(
        min=1.0)


def bf16_dense_bound() -> float:
    """``dense_dtype: bf16``: each merge sends every replica's change since the last one
    (at most LR_DENSE per step: Adam's step on a constant gradient is exactly lr) as
    bfloat16, and the all-reduce sums the R of them in bfloat16; the error feedback
    carries the sending rounding to the next merge, not the sum's: a bfloat16 rounding
    of R changes per merge."""
    return rounding_tol(EPS_BF16, LR_DENSE * K, steps=MERGES, terms=R)
SCENARIOS: list[dict[str, Any]] = [
    {"name": "params-delta", "tiered": False, "sync": {"k": K}},
    {"name": "params-delta-tiered", "tiered": True, "sync": {"k": K}},
    {"name": "moments", "tiered": False,
     "sync": {"k": K, "dense": "params+moments", "sparse": "delta+moments"}},
    {"name": "moments-tiered", "tiered": True,
     "sync": {"k": K, "dense": "params+moments", "sparse": "delta+moments"}},
    {"name": "diloco", "tiered": False, "sync": {"k": K, "dense": "diloco"}},
    # two synchronous steps through the exchange (rows' gradients combined over the
    # replicas, dense gradients averaged), then local steps merged every K
    # k = 3 over 4 steps: a merge at step 3, the last step merged by finish()
    {"name": "finish-k3", "tiered": False, "sync": {"k": 3}},
    {"name": "warmup", "tiered": True, "sharded": True, "device_rows": 5,  # the union
     "sync": {"k": K, "warmup_steps": 2}},
    # cheaper row messages (sync.sparse_dtype): the reference merges the decoded deltas
    {"name": "int8", "tiered": False, "sync": {"k": K, "sparse_dtype": "int8"}},
    {"name": "bf16", "tiered": False, "sync": {"k": K, "sparse_dtype": "bf16"}},
    {"name": "moments-int8", "tiered": False,
     "sync": {"k": K, "dense": "params+moments", "sparse": "delta+moments",
              "sparse_dtype": "int8"}},
    # Adam rows, the weights and the first moment merged, both as int8 (a scale each)
    {"name": "delta-m", "tiered": False, "sparse_opt": "adam",
     "sync": {"k": K, "sparse": "delta+m"}},
    {"name": "delta-m-int8", "tiered": True, "sparse_opt": "adam",
     "sync": {"k": K, "sparse": "delta+m", "sparse_dtype": "int8"}},
    # the dense change since the last merge as bfloat16, with error feedback
    {"name": "dense-bf16", "tiered": False, "sync": {"k": K, "dense_dtype": "bf16"}},
    {"name": "diloco-bf16", "tiered": False,
     "sync": {"k": K, "dense": "diloco", "dense_dtype": "bf16"}},
    # a replica with nothing to send in a merge (it trained no rows for K steps)
    {"name": "gap", "tiered": True, "schedule": "gap", "sync": {"k": K}},
    {"name": "gap-m-int8", "tiered": False, "schedule": "gap", "sparse_opt": "adam",
     "sync": {"k": K, "sparse": "delta+m", "sparse_dtype": "int8"}},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("kstep")
    port = _free_port()
    procs = []
    for r in range(R):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(RANK=str(r), WORLD_SIZE=str(R), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   GROUP_RANK=str(r), GROUP_WORLD_SIZE=str(R), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
                   PYTHONPATH=str(REPO), TORCH_CPP_LOG_LEVEL="ERROR")
        log = open(out / f"rank{r}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "kstep_worker.py"), str(out), json.dumps(SCENARIOS)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((out / f"rank{r}.log").read_text()[-2000:] for r in range(R))
    assert codes == [0] * R, logs
    return {sc["name"]: [torch.load(out / f"{sc['name']}-rank{r}.pt") for r in range(R)]
            for sc in SCENARIOS}


# -- the plain reference --------------------------------------------------------------
def _init_row(key: int) -> list[float]:
    w = init_rows(torch.tensor([key]), DIM, InitConfig(kind="uniform", scale=0.5),
                  table_seed(5, "t"))
    return w[0].double().tolist()


def _round_up_bf16(s: torch.Tensor) -> torch.Tensor:
    b = s.to(torch.bfloat16)
    up = torch.nextafter(b, torch.full_like(b, float("inf")))
    return torch.where(b.float() < s, up, b).float()


def wire(delta: list[float], dtype: str, int8_cols: int = DIM) -> list[float]:
    """One replica's row delta as the others receive it (``sync.sparse_dtype``), by
    hand: int8 = each block of DIM leading columns (the weights; with ``delta+m`` Adam's
    first moment too) rounded to multiples of its max|delta| / 127 (that scale rounded
    up to a bfloat16), the rest of the optimizer state's delta as bfloat16."""
    x = torch.tensor(delta, dtype=torch.float32)
    if dtype == "fp32":
        return delta
    if dtype == "bf16":
        return x.to(torch.bfloat16).double().tolist()
    out: list[float] = []
    for b in range(0, int8_cols, DIM):
        w = x[b : b + DIM]
        s = _round_up_bf16(w.abs().max() / 127)
        w = torch.round(w / s) * s if float(s) > 0 else torch.zeros_like(w)
        out += w.double().tolist()
    return out + x[int8_cols:].to(torch.bfloat16).double().tolist()


def _bf16(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).double())


def _row_step(row: list[float], g: list[float], opt: str, t: int) -> None:
    """One row update in place: Adagrad (``[w, s]``) or SparseAdam (``[w, m, v]``,
    bias correction from the replica's step count ``t``)."""
    if opt == "adagrad":
        for j in range(DIM):
            row[DIM + j] += g[j] * g[j]
            row[j] -= LR_ROWS * g[j] / (math.sqrt(row[DIM + j]) + EPS)
        return
    size = LR_ROWS * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    for j in range(DIM):
        row[DIM + j] += (g[j] - row[DIM + j]) * 0.1
        row[2 * DIM + j] += (g[j] * g[j] - row[2 * DIM + j]) * 0.001
        row[j] -= size * row[DIM + j] / (math.sqrt(row[2 * DIM + j]) + EPS)


def reference(
    sync: dict[str, Any], opt: str = "adagrad", schedule: str = "default"
) -> tuple[dict[int, list[list[float]]], list[float]]:
    """Rows ``{key: [w..., s...]}`` (every rank ends with the same) and the dense weights,
    re-enacted in float64: Adagrad (or Adam) rows, Adam dense, merges every K steps
    (each replica's row delta through :func:`wire` first; with ``dense_dtype: bf16``
    each replica's dense change since the last merge rounded to bfloat16, its rounding
    error carried to the next merge)."""
    dtype = sync.get("sparse_dtype", "fp32")
    state = DIM if opt == "adagrad" else 2 * DIM
    cols = {"delta": DIM, "delta+m": 2 * DIM, "delta+moments": DIM + state}[
        sync.get("sparse", "delta")]
    int8_cols = 2 * DIM if sync.get("sparse") == "delta+m" else DIM
    dense_mode = sync.get("dense", "params")
    bf16_dense = sync.get("dense_dtype", "fp32") == "bf16"
    residual = [[0.0] * 3 for _ in range(R)]
    keys_of = SCHEDULES[schedule]
    upd = [0] * R  # the row optimizer's steps per replica (Adam's bias correction)
    rows: list[dict[int, list[float]]] = [{} for _ in range(R)]  # key -> w + s
    snap: list[dict[int, list[float]]] = [{} for _ in range(R)]  # first touch since merge
    p = [[0.3, -0.1, 0.2] for _ in range(R)]
    m = [[0.0] * 3 for _ in range(R)]
    v = [[0.0] * 3 for _ in range(R)]
    anchor, mom = list(p[0]), None
    steps = len(SCHEDULE[0])
    warmup, k = sync.get("warmup_steps", 0), sync["k"]
    for step in range(1, steps + 1):
        if step <= warmup:  # synchronous: every replica applies the averaged gradients
            union = set().union(*(keys_of[r][step - 1] for r in range(R)))
            upd = [u + 1 for u in upd]
            for key in union:
                g = [sum(keys_of[r][step - 1].count(key) * row_grad_weight(r)[j].item()
                         for r in range(R)) / R for j in range(DIM)]
                for r in range(R):
                    row = rows[r].setdefault(key, _init_row(key) + [0.0] * state)
                    _row_step(row, g, opt, upd[r])
            gd = [sum(dense_grad(r)[j].item() for r in range(R)) / R for j in range(3)]
            for r in range(R):
                for j in range(3):
                    m[r][j] = 0.9 * m[r][j] + 0.1 * gd[j]
                    v[r][j] = 0.999 * v[r][j] + 0.001 * gd[j] ** 2
                    mh, vh = m[r][j] / (1 - 0.9**step), v[r][j] / (1 - 0.999**step)
                    p[r][j] -= LR_DENSE * mh / (math.sqrt(vh) + EPS)
            anchor = list(p[0])
            continue
        for r in range(R):
            gw = row_grad_weight(r).double().tolist()
            keys = keys_of[r][step - 1]
            upd[r] += bool(keys)
            for key in set(keys):
                row = rows[r].setdefault(key, _init_row(key) + [0.0] * state)
                snap[r].setdefault(key, list(row))
                _row_step(row, [keys.count(key) * gw[j] for j in range(DIM)], opt, upd[r])
            gd = dense_grad(r).double().tolist()
            for j in range(3):  # torch.optim.Adam, betas (0.9, 0.999)
                m[r][j] = 0.9 * m[r][j] + 0.1 * gd[j]
                v[r][j] = 0.999 * v[r][j] + 0.001 * gd[j] ** 2
                mh, vh = m[r][j] / (1 - 0.9**step), v[r][j] / (1 - 0.999**step)
                p[r][j] -= LR_DENSE * mh / (math.sqrt(vh) + EPS)
        if (step - warmup) % k and step < steps:  # the last one: finish() merges
            continue
        touched = set().union(*(s.keys() for s in snap))
        for key in touched:
            base = next(s[key] for s in snap if key in s)  # the same on every replica
            deltas = [wire([rows[r][key][j] - base[j] for j in range(cols)], dtype, int8_cols)
                      for r, s in enumerate(snap) if key in s]
            merged = [base[j] + sum(d[j] for d in deltas) / R for j in range(cols)]
            for r in range(R):
                own = rows[r].get(key, base[:DIM] + [0.0] * state)  # never had it: init
                rows[r][key] = merged + own[cols:]
        snap = [{} for _ in range(R)]
        mean = [sum(p[r][j] for r in range(R)) / R for j in range(3)]
        if bf16_dense:  # what travels: each replica's change, rounded, error fed back
            sent = []
            for r in range(R):
                change = [p[r][j] - anchor[j] + residual[r][j] for j in range(3)]
                sent.append([_bf16(c) for c in change])
                residual[r] = [c - q for c, q in zip(change, sent[r])]
            mean = [anchor[j] + sum(x[j] for x in sent) / R for j in range(3)]
        if dense_mode == "diloco":
            g = [a - b for a, b in zip(anchor, mean)]
            mom = g if mom is None else [0.9 * b + x for b, x in zip(mom, g)]
            anchor = [a - 0.7 * (x + 0.9 * b) for a, x, b in zip(anchor, g, mom)]
            p = [list(anchor) for _ in range(R)]
        else:
            p = [list(mean) for _ in range(R)]
            anchor = list(mean)
            if dense_mode == "params+moments":
                m = [[sum(m[r][j] for r in range(R)) / R for j in range(3)]] * R
                v = [[sum(v[r][j] for r in range(R)) / R for j in range(3)]] * R
                m, v = [list(x) for x in m], [list(x) for x in v]
    common = rows[0]
    assert all(set(x) == set(common) for x in rows)
    return common, p[0]


# -- the tests ------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("name", [sc["name"] for sc in SCENARIOS])
def test_merge_equals_the_reference_and_replicas_agree(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    sc = next(s for s in SCENARIOS if s["name"] == name)
    ranks = results[name]
    opt = sc.get("sparse_opt", "adagrad")
    state = DIM if opt == "adagrad" else 2 * DIM
    merged = {"delta": DIM, "delta+m": 2 * DIM, "delta+moments": DIM + state}[
        sc["sync"].get("sparse", "delta")]
    for other in ranks[1:]:  # replicas agree bit for bit after the final merge
        assert torch.equal(other["rows"][:, :merged], ranks[0]["rows"][:, :merged])
        assert torch.equal(other["dense"], ranks[0]["dense"])
    ref_rows, ref_dense = reference(sc["sync"], opt, sc.get("schedule", "default"))
    got = ranks[0]
    for i, key in enumerate(ALL_KEYS):
        if key not in ref_rows:  # touched by nobody: no replica has it
            assert not any(bool(r["found"][i]) for r in ranks)
            continue
        assert all(bool(r["found"][i]) for r in ranks), f"key {key} missing on a replica"
        # merged columns as merged; the rest is rank 0's own optimizer state
        assert_close(got["rows"][i], ref_rows[key], float32_bound(ref_rows[key]), f"row {key}")
    # bf16 dense: the replicas' bfloat16 changes are summed in bfloat16 by the
    # all-reduce (the reference sums them exactly)
    tol = float32_bound(ref_dense)
    if sc["sync"].get("dense_dtype") == "bf16":
        tol = tol + bf16_dense_bound()
    assert_close(got["dense"], ref_dense, tol, "dense")


@pytest.mark.numerics
def test_bf16_dense_travels_rounded(results: dict[str, list[dict[str, Any]]]) -> None:
    """The bf16 dense merge is not the fp32 one (it really travels rounded), sends half
    the bytes, and leaves the rows alone."""
    for name, exact in (("dense-bf16", "params-delta"), ("diloco-bf16", "diloco")):
        got, ref = results[name][0], results[exact][0]
        assert not torch.equal(got["dense"], ref["dense"]), name
        assert_close(got["dense"], ref["dense"], bf16_dense_bound(), f"{name}: dense")
        assert torch.equal(got["rows"], ref["rows"]), name
        assert got["stats"]["dense_bytes"] * 2 == ref["stats"]["dense_bytes"], name


@pytest.mark.numerics
def test_delta_merge_by_hand() -> None:
    """The rule itself on two rows and three replicas: key 3 touched by replica 0 only
    (the others contribute 0), key 2 by replicas 0 and 1."""
    ref, _ = reference({"k": K})
    # The hand formulas leave out Adagrad's eps: each of the 4 steps below moves a
    # weight by lr * g / (sqrt(s) + EPS), they write lr * g / sqrt(s), a difference of at
    # most lr * EPS / |g| (s >= g^2; |g| >= 0.5 here). Both sides are float64.
    hand = 4 * LR_ROWS * EPS / 0.5 + f64_tol(terms=16)
    init3, init2 = _init_row(3), _init_row(2)
    # replica 0 trains key 3 once at step 2 with gradient w_0 = (1, -0.5): Adagrad's
    # first step moves each weight by -lr * sign(g)
    assert_close(ref[3][:DIM], [init3[0] - 0.1 / R, init3[1] + 0.1 / R], hand, "key 3")
    # key 2: replica 0 twice in step 1-2 (g = 1, -0.5 then again), replica 1 once (2, -1.5)
    d0 = [-0.1 - 0.1 / math.sqrt(2), 0.1 + 0.1 / math.sqrt(2)]
    d1 = [-0.1, 0.1]
    first = [init2[j] + (d0[j] + d1[j]) / R for j in range(DIM)]
    # ... then merged again after steps 3-4, where replica 1 touches it once more (its
    # own Adagrad state from step 2 still holds g^2 = (4, 2.25))
    d1b = [-0.1 * 2 / math.sqrt(8), 0.1 * 1.5 / math.sqrt(2 * 2.25)]
    assert_close(ref[2][:DIM], [first[j] + d1b[j] / R for j in range(DIM)], hand, "key 2")


@pytest.mark.numerics
@pytest.mark.parametrize("base", ["params-delta", "moments"])
def test_merge_after_evictions_to_host_and_ssd_is_exact(
    results: dict[str, list[dict[str, Any]]], base: str
) -> None:
    for flat, tiered in zip(results[base], results[base + "-tiered"]):
        assert torch.equal(flat["rows"], tiered["rows"])
        assert torch.equal(flat["found"], tiered["found"])
        assert torch.equal(flat["dense"], tiered["dense"])


def test_finish_merges_the_last_steps_once(results: dict[str, list[dict[str, Any]]]) -> None:
    assert results["finish-k3"][0]["stats"]["merges"] == 2  # step 3, then finish() once


def test_warmup_then_local_steps_through_the_exchange(
    results: dict[str, list[dict[str, Any]]]
) -> None:
    """Warm-up steps sync every step (one merge left for the 2 local steps), and bytes
    of the every-step sync are counted too."""
    st = results["warmup"][0]["stats"]
    assert st["merges"] == 1
    assert st["dense_bytes"] == 2 * (2 * (R - 1) * 12 // R) + 2 * (R - 1) * 12 // R
    assert st["sparse_bytes"] > (R - 1) * (3 * 4 * 4 + 8)  # + the exchange's row sync


def _expected_sparse_bytes(nbytes: int) -> int:
    """Wire bytes of the row merges of the schedule (ring all_gather: (R-1) x the
    padded message + the two 8-byte counts). A message: a bitmap over the keys the last
    merge wrote, then ``nbytes`` per known row, ``8 + nbytes`` per new one."""
    total, prev = 0, set()
    steps = len(SCHEDULE[0])
    for start in range(0, steps, K):
        touched = [set().union(*SCHEDULE[r][start : start + K]) for r in range(R)]
        bitmap = (len(prev) + 7) // 8
        msg = [bitmap + len(t & prev) * nbytes + len(t - prev) * (8 + nbytes)
               if 8 * len(t & prev) > bitmap else len(t) * (8 + nbytes)  # keys cheaper
               for t in touched]
        total += (R - 1) * (max(msg) + 16)
        prev = set().union(*touched)
    return total


def test_bytes_are_counted(results: dict[str, list[dict[str, Any]]]) -> None:
    """Ring model: all_gather of m bytes per rank sends (R-1) m, all_reduce of n sends
    2 (R-1)/R n; the dense all-reduce is 3 floats (bf16: 3 halves)."""
    st = results["params-delta"][0]["stats"]
    assert st["merges"] == 2
    # by hand: merge 1, no keys known: replica 0's 3 rows of [key 8 | 2 floats] = 48;
    # merge 2, 6 keys known (a 1-byte bitmap): replica 1's 3 known rows 1 + 24 and
    # replica 2's known + new row 1 + 8 + 16 both 25
    assert st["sparse_bytes"] == (R - 1) * (48 + 16) + (R - 1) * (25 + 16) == 210
    assert st["sparse_bytes"] == _expected_sparse_bytes(4 * DIM)
    assert st["dense_bytes"] == 2 * (2 * (R - 1) * 12 // R)
    moments = results["moments"][0]["stats"]  # + 2 state columns, + Adam's m and v
    assert moments["sparse_bytes"] == _expected_sparse_bytes(4 * 2 * DIM)
    assert moments["dense_bytes"] == 2 * (2 * (R - 1) * 36 // R)
    # the wire bytes: [2 int8 + a 2-byte scale] and [2 bf16]
    for name in ("int8", "bf16"):
        assert results[name][0]["stats"]["sparse_bytes"] == _expected_sparse_bytes(4)
    # int8 with the state: [2 int8 + scale | 2 state entries as bf16]
    assert results["moments-int8"][0]["stats"]["sparse_bytes"] == _expected_sparse_bytes(8)
    # delta+m: [w, m] as fp32; int8: [2 int8 + scale | 2 int8 + scale]
    assert results["delta-m"][0]["stats"]["sparse_bytes"] == _expected_sparse_bytes(16)
    assert results["delta-m-int8"][0]["stats"]["sparse_bytes"] == _expected_sparse_bytes(8)
    assert results["dense-bf16"][0]["stats"]["dense_bytes"] == 2 * (2 * (R - 1) * 6 // R)


@pytest.mark.numerics
def test_lossy_wire_is_not_the_exact_merge(results: dict[str, list[dict[str, Any]]]) -> None:
    """The quantised runs really travel quantised: their rows differ from fp32's by at
    most half a step of the format per merge: a replica's delta over K Adagrad steps is
    at most K * LR_ROWS (an Adagrad step is at most lr), an int8 step is max|delta| / 127
    (its scale rounded up to a bfloat16, 2**-7 relative at most), a bfloat16 one 2**-7
    of it;
    the merge averages the replicas' errors, the rows' gradients do not depend on them."""
    exact = results["params-delta"][0]["rows"][:, :DIM]
    delta = K * LR_ROWS
    step = {"int8": delta / 127 * (1 + EPS_BF16), "bf16": delta * EPS_BF16}
    for name in ("int8", "bf16"):
        rows = results[name][0]["rows"][:, :DIM]
        assert not torch.equal(rows, exact), name
        tol = MERGES * step[name] / 2 + f32_tol(float(exact.abs().max()), STEPS, R)
        assert_close(rows, exact, tol, name)


@pytest.mark.parametrize(
    "sync, train, msg",
    [
        ({"k": 0}, {}, "sync.k: must be a positive number of steps"),
        ({"dense": "mean"}, {}, r"sync.dense: must be one of \[params, params\+moments, diloco\]"),
        ({"sparse": "rows"}, {},
         r"sync.sparse: must be one of \[delta, delta\+m, delta\+moments\]"),
        ({"dense_dtype": "int8"}, {}, r"sync.dense_dtype: must be one of \[fp32, bf16\]"),
        ({"dense": "params+moments", "dense_dtype": "bf16"}, {},
         "sync.dense_dtype: bf16 merges the parameters' change"),
        ({"sparse_dtype": "int4"}, {},
         r"sync.sparse_dtype: must be one of \[fp32, bf16, fp16, int8\]"),
        ({"outer_momentum": 1.0}, {}, r"sync.outer_momentum: must be in \[0, 1\)"),
        ({"kk": 2}, {}, "sync.kk: unknown key"),
        ({"k": 8}, {"checkpoint_every": 12}, "train.checkpoint_every: with sync.k = 8"),
        ({"k": 8, "warmup_steps": 4}, {"checkpoint_every": 16}, "sync.warmup_steps too"),
    ],
)
def test_sync_config_errors_name_the_key(sync: dict, train: dict, msg: str) -> None:
    from terarec.config import ConfigError, config_from_dict

    data = {"name": "x", "tables": [{"name": "t", "dim": 4}], "sync": sync,
            "train": {"steps": 10, **train}}
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(data)
    ok = config_from_dict({"name": "x", "tables": [{"name": "t", "dim": 4}],
                           "sync": {"k": 8, "dense": "params+moments", "warmup_steps": 8},
                           "train": {"steps": 10, "checkpoint_every": 16}})
    assert ok.sync.dense.value == "params+moments" and ok.sync.outer_lr == 0.7


def test_delta_m_needs_a_first_moment() -> None:
    """``sparse: delta+m`` with a row optimizer without one is an error naming it, when
    the merger is built (not at the first merge)."""
    from terarec.config import SparseOptimConfig, SyncConfig, TableConfig
    from terarec.optim.kstep import KStepMerger
    from terarec.ps.embedding import HierarchicalEmbeddingBagCollection

    for kind, ok in (("adagrad", False), ("rowwise_adagrad", False), ("sgd", False),
                     ("adam", True)):
        ebc = HierarchicalEmbeddingBagCollection(
            [TableConfig(name="t", dim=4)], ["f"], SparseOptimConfig(kind=kind), seed=0)
        cfg = SyncConfig(k=4, sparse="delta+m")
        if ok:
            KStepMerger(cfg, [], torch.optim.SGD([torch.zeros(1, requires_grad=True)]),
                        ebc.groups, None, 1, ebc)
            continue
        with pytest.raises(ValueError, match=rf"delta\+m .*\({kind}\) has none"):
            KStepMerger(cfg, [], torch.optim.SGD([torch.zeros(1, requires_grad=True)]),
                        ebc.groups, None, 1, ebc)


@pytest.mark.numerics
def test_bf16_dense_error_feedback_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each merge sends bf16(change + residual) and keeps the rounding error for the
    next one, exactly (two identical replicas: the all-reduce doubles the message)."""
    import terarec.optim.kstep as kstep
    from terarec.config import SyncConfig
    from terarec.optim.kstep import KStepMerger

    sent: list[torch.Tensor] = []

    def all_reduce(t: torch.Tensor, group: Any = None) -> None:
        sent.append(t.clone())
        t.mul_(2)

    monkeypatch.setattr(kstep.dist, "all_reduce", all_reduce)
    w = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0]))
    m = KStepMerger(SyncConfig(k=2, dense_dtype="bf16"), [w], torch.optim.SGD([w], lr=1.0),
                    [], None, 2)
    anchor = w.detach().clone()
    residual = torch.zeros(3)
    for change in ([1e-3, 2.5e-4, -7e-4], [3e-4, -1e-3, 1.2e-3]):
        with torch.no_grad():
            w.add_(torch.tensor(change))
        exact = w.detach() - anchor + residual
        m.merge()
        q = exact.to(torch.bfloat16)
        assert torch.equal(sent[-1], q)  # what travels: the change plus the residual
        residual = exact - q.float()
        assert torch.equal(m._residual, residual)
        anchor = anchor + (2 * q).float() / 2
        assert torch.equal(w.detach(), anchor)
        assert float(residual.abs().max()) > 0  # the rounding is real here
    assert m.comm.dense == 2 * (2 * (2 - 1) * 6 // 2)  # two bf16 all-reduces of 3 values


def test_known_keys_need_the_same_table() -> None:
    """A key the last merge wrote for another table of the group is not "known" (it
    travels with its key and table, and the merge's table check sees it)."""
    from terarec.optim.kstep import _split_known

    prev, prev_t = torch.tensor([3, 7, 9]), torch.tensor([0, 1, 0])
    comp, tables = torch.tensor([9, 7, 4, 3]), torch.tensor([0, 0, 1, 0])
    known, order = _split_known(comp, tables, prev, prev_t)
    assert comp[order].tolist() == [3, 9, 7, 4] and known.tolist() == [True, True, False, False]


def test_a_message_without_rows_and_one_without_a_bitmap() -> None:
    """An empty message (a replica that trained no rows) and one that names its keys
    because few were known round-trip through encode / decode."""
    from terarec.config import WireDtype
    from terarec.optim.kstep import NO_BITMAP, _decode_rows, _encode_rows, _message_bytes
    from terarec.optim.row_codec import RowCodec

    codec = RowCodec(WireDtype.INT8, 2 * DIM, DIM, 2 * DIM)
    prev = torch.arange(1000, dtype=torch.int64)
    prev_t = torch.zeros(1000, dtype=torch.int64)
    for comp in (torch.empty(0, dtype=torch.int64), torch.tensor([5, 2000])):
        n = comp.numel()
        known = torch.zeros(n, dtype=torch.bool)
        known[: int((comp < 1000).sum())] = True
        delta = torch.randn(n, 2 * DIM)
        msg, n_known = _encode_rows(codec, delta, comp, torch.zeros_like(comp), known, prev,
                                    False)
        counts = (n_known, n - max(n_known, 0))
        assert n_known == NO_BITMAP  # 0 or 1 known key: 8 bytes each < the 125-byte bitmap
        assert msg.numel() == _message_bytes(codec, 1000, counts, False) == n * (8 + 8)
        keys, tabs, got = _decode_rows(codec, msg, counts, prev, prev_t, False)
        assert torch.equal(keys, comp) and torch.equal(tabs, torch.zeros_like(comp))
        assert torch.equal(got, codec.decode(codec.encode(delta)))

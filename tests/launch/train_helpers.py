"""Multi-rank training runs for the launch tests: data, configs, and reading results.

The equivalence runs train on a Criteo-format file without shuffling: rank ``r`` of
``W`` reads rows ``j = r (mod W)``, so with a per-rank batch of ``G / W`` the ranks' step
``t`` batches together are exactly step ``t`` of one process with batch ``G``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from launch_helpers import Ranks, free_port, torchrun_env

from terarec.data.criteo_writer import write_criteo
from terarec.trainer.checkpoint import read_tables

REPO = Path(__file__).resolve().parents[2]

GLOBAL_BATCH = 64
STEPS = 16
CRITEO_SPARSE = 26  # categorical features of a Criteo row: one id each


def equivalence_config(tmp: Path, world: int, name: str, steps: int = STEPS,
                       tiers: bool = True) -> dict[str, Any]:
    """A run over ``tmp/train.tsv`` with a per-rank batch of ``GLOBAL_BATCH / world``.

    With ``tiers`` the table's device and host budgets are far below its rows on every
    rank (the rows a rank owns are a quarter of the table with 4 ranks), so every rank
    evicts into its host tier and its SSD tier throughout.
    """
    train, ev = tmp / "train.tsv", tmp / "eval.tsv"
    if not train.exists():
        write_criteo(train, GLOBAL_BATCH * (steps + 4), seed=1)
        write_criteo(ev, 512, seed=2)
    table: dict[str, Any] = {"name": "sparse", "dim": 8, "features": None,
                             "init": {"kind": "uniform", "scale": 0.05}}
    cfg: dict[str, Any] = {
        "name": name,
        "seed": 3,
        "data": {"kind": "criteo", "path": [str(train)], "eval_path": [str(ev)],
                 "batch_size": GLOBAL_BATCH // world, "eval_batch_size": 96,
                 "dense_transform": "log1p", "prefetch_batches": 2},
        "tables": [table],
        "model": {"kind": "dlrm", "bottom_mlp": [16, 8], "top_mlp": [16]},
        "optimizer": {"sparse": {"kind": "adam", "lr": 0.05},
                      "dense": {"kind": "adam", "lr": 0.01}},
        "train": {"steps": steps, "log_every": 1, "device": "cpu", "threads": 1,
                  "progress": False, "runs_dir": str(tmp / "runs")},
        "dist": {"timeout_s": 60},
    }
    if tiers:
        table.update(device_rows=700, host_rows=300)
        cfg["ssd"] = {"path": "ssd"}
    return cfg


def quickstart_config(tmp: Path, name: str, steps: int = 6) -> dict[str, Any]:
    """configs/quickstart.yaml cut down to seconds: few steps, small batches and eval."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    cfg["name"] = name
    cfg["data"].update(batch_size=128, eval_batch_size=512)
    cfg["data"]["synthetic"]["eval_samples"] = 2048
    cfg["train"].update(steps=steps, eval_every=0, log_every=2, threads=1, progress=False,
                        device="cpu", runs_dir=str(tmp / "runs"))
    cfg["dist"] = {"timeout_s": 60}
    return cfg


def write_config(tmp: Path, cfg: dict[str, Any]) -> Path:
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def train_cmd(config: Path, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "terarec.cli", "train", "--config", str(config), *extra]


def run_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg["train"]["runs_dir"]) / cfg["name"]


def losses(cfg: dict[str, Any]) -> list[float]:
    """The per-step train losses of a run (``log_every: 1``)."""
    lines = (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(ln) for ln in lines if ln.strip()]
    return [r["loss"] for r in recs if r["split"] == "train"]


def final_rows(cfg: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per table ``(keys, rows)`` sorted by key, from the run's checkpoint: the shards
    of its first fast group together (one process: the one file)."""
    ckpt = run_dir(cfg) / "checkpoint"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    world = manifest.get("world")
    ranks = [""] if world is None else [f"rank{r}/" for r in world["fast_groups"][0]]
    shards = [read_tables(ckpt, r, manifest) for r in ranks]  # SSD snapshots' rows too
    out = {}
    for name in shards[0]:
        keys = torch.cat([s[name]["keys"] for s in shards])
        rows = torch.cat([s[name]["rows"] for s in shards])
        order = torch.argsort(keys)
        assert torch.unique(keys).numel() == keys.numel(), "a key in two shards"
        out[name] = (keys[order], rows[order])
    return out


def dense_state(cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    ckpt = run_dir(cfg) / "checkpoint"
    return torch.load(ckpt / "dense.pt", weights_only=True)["model"]


def assert_same_run(got: dict[str, Any], ref: dict[str, Any], exact: bool = False) -> None:
    """Same loss curve, rows (keys and values) and dense weights: bit for bit with
    ``exact``, else within the rounding bounds of :func:`run_bounds`."""
    from tests.numerics import assert_close

    la, lb = losses(got), losses(ref)
    assert len(la) == len(lb) == ref["train"]["steps"], (len(la), len(lb))
    bounds = run_bounds(ref)
    for i, (a, b) in enumerate(zip(la, lb)):
        assert_close(a, b, 0.0 if exact else bounds["loss"](b, i), f"loss at step {i + 1}")
    ra, rb = final_rows(got), final_rows(ref)
    assert ra.keys() == rb.keys()
    for name in ra:
        (ka, va), (kb, vb) = ra[name], rb[name]
        assert torch.equal(ka, kb), f"table {name}: {ka.numel()} vs {kb.numel()} keys"
        dim = next(t["dim"] for t in ref["tables"] if t["name"] == name)
        for what, cols in (("weights", slice(0, dim)), ("Adam's m", slice(dim, 2 * dim)),
                           ("Adam's v", slice(2 * dim, None))):
            want = vb[:, cols]
            tol = 0.0 if exact else bounds[what](want)
            assert_close(va[:, cols], want, tol, f"table {name}: {what}")
    da, db = dense_state(got), dense_state(ref)
    assert da.keys() == db.keys()
    for k in db:
        want = db[k].float()
        tol = 0.0 if exact else bounds["dense"](want)
        assert_close(da[k].float(), want, tol, f"dense {k}")


def run_bounds(cfg: dict[str, Any]) -> dict[str, Any]:
    """Bounds for an :func:`equivalence_config` run on several ranks against one process
    (tests/numerics.py). Both train the same float32 model on the same global batches;
    what differs is the order in which each gradient's terms are added (each rank sums
    its share, then the exchange or DDP's all-reduce adds the ranks' sums), and every
    value of the global batch can feed a row's gradient and, through the pooled rows,
    the dense layers'. Adam, on the rows and on the dense layers, turns a relative
    difference of a gradient into ~lr times it.
    """
    from tests.numerics import f32_tol, loss_tol, train_tol

    steps = cfg["train"]["steps"]
    values = GLOBAL_BATCH * CRITEO_SPARSE
    opt = cfg["optimizer"]
    assert opt["sparse"]["kind"] == opt["dense"]["kind"] == "adam"

    def size(t: torch.Tensor) -> float:
        return float(t.abs().max()) if t.numel() else 0.0

    return {
        # the mean over the global batch
        "loss": lambda want, step: loss_tol(want, step, GLOBAL_BATCH),
        "weights": lambda w: train_tol(opt["sparse"]["lr"], steps, values, size(w)),
        "dense": lambda w: train_tol(opt["dense"]["lr"], steps, values, size(w)),
        # Adam's moments: rounded each step; m follows g (eps * values relative), v g^2
        "Adam's m": lambda m: f32_tol(size(m), steps, values),
        "Adam's v": lambda v: f32_tol(size(v), steps, 2 * values),
    }


def assert_same_eval(got: dict[str, Any], want: dict[str, Any], cfg: dict[str, Any]) -> None:
    """The final eval metrics of a multi-rank run (``summary["final_eval"]``) against one
    process's: the same eval set, scored by models whose weights agree within
    :func:`run_bounds`."""
    from tests.numerics import assert_close, loss_tol

    n = want["samples"]
    assert got["samples"] == n
    steps = cfg["train"]["steps"]
    # logloss: a mean BCE over the eval samples, like the training loss, from weights
    # that carry every training step's drift
    assert_close(got["logloss"], want["logloss"], loss_tol(want["logloss"], steps, n),
                 "eval logloss")
    # AUC is not a smooth function of the weights: it moves in steps of
    # 1 / (positives x negatives) when a positive and a negative swap order, which
    # scores that drift apart by rounding do only where they were tied to within the
    # drift. One swapped pair is allowed: a bound from the scores' gaps would need the
    # scores, which the runs do not keep.
    pos = round(want["ctr"] * n)
    assert_close(got["auc"], want["auc"], 1 / (pos * (n - pos)), "eval AUC")


def one_process(cfg: dict[str, Any], resume: Path | None = None) -> dict[str, Any]:
    """Trains ``cfg`` in this process (from ``resume``, a checkpoint, if given)."""
    from terarec.config import config_from_dict
    from terarec.trainer.loop import train

    threads = torch.get_num_threads()
    try:
        train(config_from_dict(cfg, "<test>"), resume=resume)
    finally:
        torch.set_num_threads(threads)
    return cfg


def launch_ranks(tmp: Path, cfg: dict[str, Any], world: int, local_world: int,
           *extra: str, timeout: float = 150) -> list[str]:
    """Runs ``terarec train`` on ``world`` ranks (nodes of ``local_world``) from
    torchrun's variables; returns every rank's output."""
    config = write_config(tmp, cfg)
    port = free_port()
    logs = tmp / f"logs-{cfg['name']}"
    logs.mkdir(exist_ok=True)
    with Ranks(logs) as ranks:
        for r in range(world):
            ranks.start(train_cmd(config, *extra), torchrun_env(r, world, port, local_world))
        codes = ranks.wait(timeout)
        outs = [ranks.output(i) for i in range(world)]
    assert codes == [0] * world, "\n".join(o[-2500:] for o in outs)
    return outs

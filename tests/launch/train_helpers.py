"""Multi-rank training runs for the launch tests: data, configs, and reading results.

The equivalence runs train on a Criteo-format file without shuffling: rank ``r`` of
``W`` reads rows ``j = r (mod W)``, so with a per-rank batch of ``G / W`` the ranks' step
``t`` batches together are exactly step ``t`` of one process with batch ``G``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from terarec.data.criteo_writer import write_criteo

REPO = Path(__file__).resolve().parents[2]

GLOBAL_BATCH = 64
STEPS = 16


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
    files = (["tables.pt"] if world is None
             else [f"rank{r}/tables.pt" for r in world["fast_groups"][0]])
    shards = [torch.load(ckpt / f, weights_only=True) for f in files]
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


def assert_same_run(got: dict[str, Any], ref: dict[str, Any], tol: float = 1e-5) -> None:
    """Same loss curve, rows (keys and values) and dense weights, to ``tol``."""
    la, lb = losses(got), losses(ref)
    assert len(la) == len(lb) == ref["train"]["steps"], (len(la), len(lb))
    worst = max(abs(a - b) for a, b in zip(la, lb))
    assert worst <= tol, f"loss curves differ by {worst:.3g}: {la} vs {lb}"
    ra, rb = final_rows(got), final_rows(ref)
    assert ra.keys() == rb.keys()
    for name in ra:
        (ka, va), (kb, vb) = ra[name], rb[name]
        assert torch.equal(ka, kb), f"table {name}: {ka.numel()} vs {kb.numel()} keys"
        diff = (va - vb).abs().max().item()
        assert diff <= tol, f"table {name}: rows differ by {diff:.3g}"
    da, db = dense_state(got), dense_state(ref)
    for k in db:
        diff = (da[k].float() - db[k].float()).abs().max().item() if db[k].numel() else 0.0
        assert diff <= tol and not math.isnan(diff), f"dense {k} differs by {diff:.3g}"

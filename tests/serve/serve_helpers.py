"""Trained tiny runs and their reference scores for the serving tests."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import Config, config_from_dict
from terarec.data import build_source
from terarec.serve.scorer import Scorer
from terarec.trainer.checkpoint import load_checkpoint
from terarec.trainer.loop import build_components, train
from terarec.trainer.tiers import open_ssd_store

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "kind": "synthetic", "batch_size": 64, "eval_batch_size": 1024,
        "synthetic": {"num_dense": 4, "num_sparse": 4, "vocab_size": 200,
                      "zipf_alpha": 1.2, "teacher_scale": 1.5,
                      "teacher_pairwise_scale": 0.3, "eval_samples": 2048},
    },
    "tables": [{"name": "sparse", "dim": 8}],
    "model": {"kind": "dlrm", "bottom_mlp": [16, 8], "top_mlp": [16]},
    "optimizer": {"sparse": {"kind": "adam", "lr": 0.05}, "dense": {"kind": "adam", "lr": 0.01}},
    "train": {"steps": 40, "log_every": 10, "device": "cpu", "threads": 1,
              "progress": False},
}
SPLIT = {"user_features": ["C1", "C3"], "user_dense": True}


def split_request(rng: np.random.Generator, n: int, **over: Any) -> dict[str, Any]:
    """A request body for a :data:`SPLIT` model: one user (C1, C3, dense), ``n``
    candidates (C2, C4) with ids under 300; ``over`` replaces fields."""
    ids = rng.integers(0, 300, size=(3, n)).tolist()
    u = rng.integers(0, 300, size=2).tolist()
    body = {"user": {"C1": u[0], "C3": u[1]},
            "dense": rng.standard_normal(4).round(3).tolist(),
            "candidates": {"C2": ids[1], "C4": ids[2]}, "ids": list(range(n))}
    body.update(over)
    return body


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out


def make_tiny(runs: Path, **over: Any) -> Config:
    """The tiny config writing runs under ``runs``, sections ``over`` merged in."""
    return config_from_dict(_merge(TINY, {**over, "train": {
        **over.get("train", {}), "runs_dir": str(runs)}}), "<tiny>")


def trained(root: Path, **over: Any) -> tuple[Config, Path]:
    """Trains the tiny config (sections ``over`` merged in) under ``root``; returns the
    config and the run directory."""
    cfg = make_tiny(root / "runs", **over)
    train(cfg)
    return cfg, root / "runs" / cfg.name


def reference(cfg: Any, checkpoint: Path, tmp: Path) -> list[tuple[Any, torch.Tensor]]:
    """``(batch, probabilities)`` of the eval set under the trained model restored from
    ``checkpoint`` (the training code's own forward)."""
    store = open_ssd_store(cfg, tmp / "ref_ssd") if cfg.ssd.path is not None else None
    try:
        parts = build_components(cfg, ssd_store=store)
        load_checkpoint(checkpoint, parts)
        parts.model.eval()
        out = []
        with torch.no_grad():
            for batch in build_source(cfg.data, "eval", seed=cfg.seed):
                out.append((batch, torch.sigmoid(parts.model(batch.dense, batch.sparse))))
        return out
    finally:
        if store is not None:
            store.close()


def bundle_probs(scorer: Scorer, batch: Any) -> torch.Tensor:
    """The bundle's probabilities of a batch: each sample its own user, one candidate."""
    kjt = batch.sparse
    cols = {f: (kjt[f].values(), kjt[f].lengths().to(torch.int64)) for f in kjt.keys()}
    n = batch.dense.shape[0]
    user = {f: cols[f] for f in scorer.order if f not in scorer.candidate_features}
    cand = {f: cols[f] for f in scorer.candidate_features}
    du = batch.dense if scorer.user_dense else batch.dense[:, :0]
    dc = batch.dense[:, :0] if scorer.user_dense else batch.dense
    with torch.no_grad():
        return torch.sigmoid(scorer.score_keys(user, cand, torch.arange(n), du, dc))


def head(batch: Any, k: int) -> Any:
    """The first ``k`` samples of ``batch``."""
    kjt = batch.sparse
    vals, lens = [], []
    for f in kjt.keys():
        jt = kjt[f]
        n = int(jt.lengths()[:k].sum())
        vals.append(jt.values()[:n])
        lens.append(jt.lengths()[:k])
    sparse = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), torch.cat(vals), torch.cat(lens))
    return dataclasses.replace(batch, dense=batch.dense[:k], sparse=sparse,
                               labels=batch.labels[:k], teacher_prob=None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(bundle: Path, *extra: str, timeout: float = 90.0) -> Iterator[str]:
    """``terarec serve`` on the bundle as a real process on 127.0.0.1; yields its URL
    once ``/healthz`` answers, stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "terarec.cli", "serve", "--bundle", str(bundle),
           "--port", str(port), "--threads", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"terarec serve exited {proc.returncode}:\n"
                                   f"{proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("terarec serve did not answer /healthz in time")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Load:
    """What :func:`under_load`'s clients did: posts per client, non-200 answers."""

    counts: list[int]
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def under_load(url: str, bodies: list[dict[str, Any]], max_each: int = 1 << 30
               ) -> Iterator[Load]:
    """One client thread per body, each posting it to ``/score`` again and again (at
    most ``max_each`` times) while the block runs; joined when it ends."""
    load = Load([0] * len(bodies))
    done = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not done.is_set() and load.counts[i] < max_each:
                r = c.post("/score", json=bodies[i])
                load.counts[i] += 1
                if r.status_code != 200:
                    load.errors.append(r.text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    try:
        yield load
    finally:
        done.set()
        for t in threads:
            t.join()


def wait_health(url: str, key: str, value: Any, what: str, timeout: float = 60.0) -> None:
    """Waits until ``/healthz`` reports ``key == value``; fails saying ``what`` did not
    happen."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/healthz").json()[key] != value:
        assert time.monotonic() < deadline, what
        time.sleep(0.1)

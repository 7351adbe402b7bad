"""Ranking latency: request-centric scoring from a bundle vs the trained model's own
forward on every (user, candidate) pair, in the same run; then through the HTTP service.

For each model (the quickstart DLRM with its declared split: 20 of 26 features and the
dense features user-side; and a larger one: dim 64, bottom MLP 512-256-64, top MLP
512-256) a short synthetic run is trained and exported (fp32). Requests carry one user
and ``N`` candidates (100 and 1,000) with ids drawn from the training distribution.

* ``centric``: :meth:`Scorer.score` on the request as a client sends it (raw ids hashed,
  rows through the cache, the user side once, the candidate program over ``N``);
* ``naive``: the trained model (``HierarchicalEmbeddingBagCollection`` + DLRM, restored
  from the same checkpoint) on ``N`` rows with the user features repeated per candidate,
  from the same request (its ids hashed and its batch built on the clock, as a server
  scoring pairs would);
* ``centric_int8`` (CPU): the same with ``dense_dtype="int8"``: the per-candidate
  MLP on FBGEMM's int8 GEMM; ``int8_max_dp`` is the largest difference of its
  probabilities from the float32 scorer's over the requests, ``auc_fp32`` /
  ``auc_int8`` the two scorers' AUC on the run's eval stream;
* ``centric_eager`` (CUDA): the same scorer with ``cuda_graphs=False`` (the programs
  run operator by operator instead of replayed as CUDA graphs); ``eager_max_dp`` the
  largest difference of its probabilities from the graphed scorer's, ``ratio_eager``
  naive / eager;
* ``http``: ``terarec serve`` started as a process on 127.0.0.1, one client posting the
  JSON requests one after another (``--http``; end to end: JSON in and out).

Each figure is the median over ``--runs`` runs of the p50 / p99 of ``--requests``
requests, each run after one untimed pass over the same requests (steady state: the row
caches hold the rows they use). ``ratio`` = naive / centric at the same percentile.

    python benchmarks/serve_bench.py [--threads 2] [--http] [--device cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import config_from_dict, load_config
from terarec.data import build_source
from terarec.data.keys import int_keys
from terarec.data.synthetic import SyntheticGenerator, zipf_ranks
from terarec.serve.export import export_bundle
from terarec.serve.scorer import Request, Scorer
from terarec.trainer.checkpoint import load_checkpoint
from terarec.trainer.loop import build_components, train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "serve"))

MODELS = {
    "quickstart": {},
    "large": {"tables": [{"name": "sparse", "dim": 64}],
              "model": {"bottom_mlp": [512, 256, 64], "top_mlp": [512, 256]}},
}


def run_config(name: str, runs: Path, device: str, steps: int) -> Any:
    base = load_config(REPO / "configs" / "quickstart.yaml", [])
    from terarec.config import config_to_dict

    d = config_to_dict(base)
    for k, v in MODELS[name].items():
        d[k] = v if isinstance(v, list) else {**d[k], **v}
    d["name"] = name
    d["train"] = {**d["train"], "steps": steps, "eval_every": 0, "progress": False,
                  "runs_dir": str(runs), "device": device}
    return config_from_dict(d, f"<serve_bench {name}>")


def requests(cfg: Any, n: int, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` requests of ``n`` candidates: ids from the synthetic distribution."""
    syn = cfg.data.synthetic
    gen = SyntheticGenerator(syn, cfg.seed)
    rng = np.random.default_rng(seed)
    user_f = set(cfg.model.user_features)
    out = []
    for _ in range(count):
        ranks = zipf_ranks(rng.random((syn.num_sparse, n)), syn.zipf_alpha,
                           syn.vocab_size).astype(np.uint64)
        ids = (((ranks - np.uint64(1)) * gen.mult + gen.add) % np.uint64(syn.vocab_size)
               ).astype(np.int64)
        out.append({
            "user": {f: int(ids[i, 0]) for i, f in enumerate(gen.names) if f in user_f},
            "candidates": {f: ids[i].tolist() for i, f in enumerate(gen.names)
                           if f not in user_f},
            "dense": rng.standard_normal(syn.num_dense).round(4).tolist(),
            "ids": list(range(n))})
    return out


def naive_batch(req: dict[str, Any], names: list[str], n: int) -> tuple[Any, Any]:
    """The pair batch: user features repeated ``n`` times, keys hashed."""
    vals = []
    for f in names:
        raw = req["candidates"][f] if f in req["candidates"] else [req["user"][f]] * n
        vals.append(torch.from_numpy(int_keys(np.asarray(raw, np.int64), f)))
    kjt = KeyedJaggedTensor.from_lengths_sync(names, torch.cat(vals),
                                              torch.ones(n * len(names), dtype=torch.int32))
    return torch.tensor([req["dense"]] * n, dtype=torch.float32), kjt


def percentiles(times: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(times, 50) * 1e3),
            "p99_ms": float(np.percentile(times, 99) * 1e3)}


def timed(fn: Any, items: list[Any], sync: Any) -> list[float]:
    for it in items:  # warm: the row caches hold what the requests use
        fn(it)
    sync()
    out = []
    for it in items:
        t0 = time.perf_counter()
        fn(it)
        sync()
        out.append(time.perf_counter() - t0)
    return out


def scores(s: Scorer) -> Any:
    """The call that scores one request body with ``s``."""
    return lambda r: s.score(Request(**r))


def median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def bench_model(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cfg = run_config(name, root / "runs", args.device, args.train_steps)
    train(cfg)
    ckpt = root / "runs" / name / "checkpoint"
    bundle = root / f"bundle_{name}"
    export_bundle(ckpt, bundle)
    torch.set_num_threads(args.threads)
    parts = build_components(cfg)
    load_checkpoint(ckpt, parts)
    model = parts.model.eval()
    names = list(parts.embedding.feature_names)
    scorer = Scorer.from_bundle(bundle, device=args.device)
    dev = torch.device(args.device)
    # the same scorer another way, timed beside it: int8 dense layers (CPU), or the
    # programs run operator by operator instead of as CUDA graphs (GPU)
    variants = {k: Scorer.from_bundle(bundle, device=args.device, **kw)
                for k, kw, on in (("int8", {"dense_dtype": "int8"}, "cpu"),
                                  ("eager", {"cuda_graphs": False}, "cuda"))
                if dev.type == on}
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {"bundle_mib": sum(f["size"] for f in json.loads(
        (bundle / "manifest.json").read_text())["files"].values()) / 2**20}
    for n in (100, 1000):
        reqs = requests(cfg, n, args.requests, seed=n)
        def pairs(r: dict[str, Any]) -> torch.Tensor:
            dense, kjt = naive_batch(r, names, len(r["ids"]))
            return torch.sigmoid(model(dense.to(dev), kjt.to(dev)))

        cent, naive = [], []
        other: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        with torch.no_grad():
            for _ in range(args.runs):
                cent.append(percentiles(timed(scores(scorer), reqs, sync)))
                naive.append(percentiles(timed(pairs, reqs, sync)))
                for k, s in variants.items():
                    other[k].append(percentiles(timed(scores(s), reqs, sync)))
        c, v = median_runs(cent), median_runs(naive)
        out[str(n)] = {"centric": c, "naive": v,
                       "ratio_p50": v["p50_ms"] / c["p50_ms"],
                       "ratio_p99": v["p99_ms"] / c["p99_ms"]}
        for k, s in variants.items():
            ck = median_runs(other[k])
            out[str(n)].update({
                f"centric_{k}": ck, f"ratio_{k}_p50": v["p50_ms"] / ck["p50_ms"],
                f"ratio_{k}_p99": v["p99_ms"] / ck["p99_ms"],
                f"{k}_max_dp": max(float((s.score(Request(**r)).scores
                                          - scorer.score(Request(**r)).scores).abs().max())
                                   for r in reqs)})
    if args.http:
        import httpx
        from serve_helpers import server

        extra = ["--device", args.device, "--dense-dtype", args.http_dense_dtype]
        with server(bundle, *extra) as url, httpx.Client(base_url=url, timeout=60) as client:
            for n in (100, 1000):
                bodies = [json.dumps(r).encode() for r in requests(cfg, n, args.requests, 7)]

                def post(body: bytes) -> None:
                    r = client.post("/score", content=body,
                                    headers={"content-type": "application/json"})
                    r.raise_for_status()
                runs = [percentiles(timed(post, bodies, lambda: None))
                        for _ in range(args.runs)]
                out[str(n)]["http"] = median_runs(runs)
    if "int8" in variants:
        out["auc_fp32"], out["auc_int8"] = (eval_auc(cfg, scorer),
                                            eval_auc(cfg, variants["int8"]))
    for s in variants.values():
        s.close()
    scorer.close()
    return out


def eval_auc(cfg: Any, scorer: Scorer) -> float:
    """AUC of ``scorer`` on the eval stream (each sample its own user)."""
    from serve_helpers import bundle_probs
    from torchmetrics.functional.classification import binary_auroc

    probs, labels = [], []
    for batch in build_source(cfg.data, "eval", seed=cfg.seed):
        probs.append(bundle_probs(scorer, batch))
        labels.append(batch.labels.to(torch.int64))
    return float(binary_auroc(torch.cat(probs), torch.cat(labels)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="quickstart,large")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--http", action="store_true", help="also through terarec serve")
    p.add_argument("--http-dense-dtype", default="fp32", choices=["fp32", "int8"],
                   help="the service's --dense-dtype")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result: dict[str, Any] = {"device": args.device, "threads": args.threads,
                              "http_dense_dtype": args.http_dense_dtype,
                              "requests": args.requests, "runs": args.runs}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            result[name] = bench_model(name, args, Path(tmp))
    if args.json:
        print(json.dumps(result))
        return
    for name in args.models.split(","):
        if "auc_int8" in result[name]:
            print(f"{name:>10} eval AUC: fp32 {result[name]['auc_fp32']:.5f}, int8 dense "
                  f"{result[name]['auc_int8']:.5f}")
        for n in ("100", "1000"):
            r = result[name][n]
            line = (f"{name:>10} N={n:>4}: centric p50 {r['centric']['p50_ms']:.2f} / p99 "
                    f"{r['centric']['p99_ms']:.2f} ms, naive p50 {r['naive']['p50_ms']:.2f} / "
                    f"p99 {r['naive']['p99_ms']:.2f} ms -> {r['ratio_p50']:.1f}x / "
                    f"{r['ratio_p99']:.1f}x")
            if "centric_int8" in r:
                c8 = r["centric_int8"]
                line += (f"; int8 dense p50 {c8['p50_ms']:.2f} / p99 {c8['p99_ms']:.2f} ms "
                         f"-> {r['ratio_int8_p50']:.1f}x / {r['ratio_int8_p99']:.1f}x "
                         f"(max |dp| {r['int8_max_dp']:.1e})")
            if "http" in r:
                line += (f"; http p50 {r['http']['p50_ms']:.2f} / p99 "
                         f"{r['http']['p99_ms']:.2f} ms")
            print(line)


if __name__ == "__main__":
    main()

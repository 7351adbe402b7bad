"""End to end `terarec train` against the training step alone and plain PyTorch, one GPU.

One DLRM (13 dense + 26 sparse features, one key each, Zipf keys over ``--vocab`` ids per
feature, dim 128, MLPs 512-256-128 / 1024-1024-512-256, Adam rows + Adam dense, batch
16384, TF32) measured four ways in one process, each after its own warm-up:

* ``plain``: plain PyTorch, batches already on the GPU: 26 ``nn.EmbeddingBag`` of
  ``--vocab`` rows (keys taken modulo the table size and split by feature before
  timing) + ``SparseAdam``,
  the same dense model and Adam (the baseline users would write themselves);
* ``step``: terarec's training step alone on the same batches already on the GPU
  (``TrainPipeline.progress`` over pre-made device batches, no loss check, no metrics);
* ``e2e <source>``: ``terarec train`` (``train()`` in this process: data source, loop,
  metrics window, loss check, logging) on ``synthetic-torch`` (batches drawn on the GPU),
  ``columnar`` (a preprocessed dataset written from the same generator, read from the
  page cache by ``read_workers`` threads into pinned memory; ``columnar-overlap``: with
  ``train.prefetch``, the next batch copied to the GPU on a side stream during the step)
  and ``synthetic-numpy`` (the host generator, one core).

For ``e2e`` the rate is the median of the logged intervals after the first (steady state)
and the whole run's; ratios are against ``step`` and ``plain`` of the same run. With
``--breakdown`` it also times, each on its own, the step + the loss check's host sync,
the step + the metrics window's update and the GPU generator alone (ms a step, and each
against the step alone).

    python benchmarks/train_e2e.py [--device cuda] [--steps 300] [--batch 16384]
        [--vocab 1000000] [--sources synthetic-torch,columnar,synthetic-numpy] [--json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from terarec.config import Config, SyntheticBackend, config_from_dict
from terarec.data import build_source
from terarec.data.columnar import write_dataset
from terarec.data.synthetic import SyntheticGenerator, dense_names, sparse_names
from terarec.models import build_model
from terarec.trainer.loop import build_components, train
from terarec.trainer.metrics import CTRMetrics
from terarec.trainer.pipeline import TrainPipeline


def config(args: argparse.Namespace, runs: Path, **data: Any) -> Config:
    return config_from_dict({
        "name": "e2e", "seed": 0,
        "data": {"kind": "synthetic", "batch_size": args.batch, "eval_batch_size": args.batch,
                 "read_workers": args.read_workers,
                 "synthetic": {"vocab_size": args.vocab, "zipf_alpha": 1.1,
                               "eval_samples": args.batch}, **data},
        "tables": [{"name": "sparse", "dim": 128, "features": None}],
        "model": {"kind": "dlrm", "bottom_mlp": [512, 256, 128],
                  "top_mlp": [1024, 1024, 512, 256]},
        "optimizer": {"sparse": {"kind": "adam", "lr": 0.001},
                      "dense": {"kind": "adam", "lr": 0.001}},
        "train": {"steps": args.steps, "log_every": args.log_every, "device": args.device,
                  "threads": args.threads, "progress": False, "save_checkpoint": False,
                  "eval_batches": 1, "runs_dir": str(runs)},
    }, "<train_e2e>")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_batches(cfg: Config, n: int, device: torch.device) -> list[Any]:
    d = copy.deepcopy(cfg.data)
    d.synthetic.generator = SyntheticBackend.TORCH
    src = build_source(d, "train", seed=1, device=device)
    out = list(itertools.islice(iter(src), n))
    src.close()
    sync(device)
    return out


def timed(fn: Any, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn(i)`` over ``steps`` calls after ``warmup``."""
    for i in range(warmup):
        fn(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    sync(device)
    return (time.perf_counter() - t0) / steps


class PlainEBC(nn.Module):
    """One ``nn.EmbeddingBag`` (sum, sparse grads) per feature; KJT in, KeyedTensor out."""

    def __init__(self, feats: list[str], rows: int, dim: int, device: torch.device) -> None:
        super().__init__()
        self.feats, self.dim = feats, dim
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, device=device) for _ in feats)

        self.split: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def prepare(self, kjt: KeyedJaggedTensor) -> None:
        """Splits a batch by feature before timing (the data a plain model is fed)."""
        parts = []
        for f in self.feats:
            jt = kjt[f]
            lengths = jt.lengths()  # bag starts by torch ops (the KJT's would call FBGEMM)
            parts.append((jt.values(), torch.cumsum(lengths, 0) - lengths))
        self.split[id(kjt)] = parts

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        if id(kjt) not in self.split:
            self.prepare(kjt)
        parts = [bag(v, o) for (v, o), bag in zip(self.split[id(kjt)], self.bags)]
        return KeyedTensor(keys=self.feats, length_per_key=[self.dim] * len(self.feats),
                           values=torch.cat(parts, dim=1))


class PlainOneTable(nn.Module):
    """One ``nn.EmbeddingBag`` (sum, sparse grads) holding every feature's rows (feature
    ``f``'s id ``i`` is row ``f * rows + i``): one lookup and one ``SparseAdam`` step for
    all features, the faster way to write the plain model; KJT in, KeyedTensor out."""

    def __init__(self, feats: list[str], rows: int, dim: int, device: torch.device) -> None:
        super().__init__()
        self.feats, self.dim, self.rows = feats, dim, rows
        self.bag = nn.EmbeddingBag(len(feats) * rows, dim, mode="sum", sparse=True,
                                   device=device)
        self.split: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, kjt: KeyedJaggedTensor) -> None:
        """Row ids and bag starts of a batch, before timing (feature-major bags)."""
        lengths = kjt.lengths().long()
        per_key = torch.tensor(kjt.length_per_key(), device=lengths.device)
        feature = torch.repeat_interleave(torch.arange(len(self.feats), device=lengths.device),
                                          per_key)
        ids = kjt.values() % self.rows + feature * self.rows
        self.split[id(kjt)] = (ids, torch.cumsum(lengths, 0) - lengths)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        if id(kjt) not in self.split:
            self.prepare(kjt)
        ids, starts = self.split[id(kjt)]
        b = kjt.stride()
        pooled = self.bag(ids, starts).view(len(self.feats), b, self.dim)  # [F, B, D]
        return KeyedTensor(keys=self.feats, length_per_key=[self.dim] * len(self.feats),
                           values=pooled.permute(1, 0, 2).reshape(b, -1))


def plain_step_s(cfg: Config, batches: list[Any], args: argparse.Namespace,
                 device: torch.device, one_table: bool = False) -> float:
    feats = sparse_names(cfg.data.synthetic)
    ebc = (PlainOneTable if one_table else PlainEBC)(feats, args.vocab, 128, device)
    model = build_model(cfg.model, ebc, feats, [128] * len(feats), 13).to(device)
    mod = [KeyedJaggedTensor(keys=b.sparse.keys(), values=b.sparse.values() % args.vocab,
                             lengths=b.sparse.lengths()) for b in batches]
    for kjt in mod:
        ebc.prepare(kjt)
    sparse = [p for p in ebc.parameters()]
    dense = [p for n, p in model.named_parameters() if not n.startswith("embedding")
             and all(p is not s for s in sparse)]
    opts = [torch.optim.SparseAdam(sparse, lr=1e-3), torch.optim.Adam(dense, lr=1e-3)]
    loss_fn = nn.BCEWithLogitsLoss()

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        loss = loss_fn(model(b.dense, mod[i % len(batches)]), b.labels)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()

    return timed(step, args.steps, args.warmup, device)


def terarec_step_s(cfg: Config, batches: list[Any], args: argparse.Namespace,
                   device: torch.device) -> float:
    parts = build_components(cfg)
    pipe = TrainPipeline(parts.train_model, parts.dense_optimizer, parts.embedding, device,
                         nn.BCEWithLogitsLoss(), overlap=False, check_loss=None,
                         sync=parts.sync)
    it = itertools.cycle(batches)
    s = timed(lambda i: pipe.progress(it), args.steps, args.warmup, device)
    pipe.close()
    torch.cuda.empty_cache()  # no-op without CUDA
    return s


def breakdown_ms(cfg: Config, batches: list[Any], args: argparse.Namespace,
                 device: torch.device) -> dict[str, float]:
    """Milliseconds a step of what ``terarec train`` adds around the training step, each
    measured on its own in this run: the step alone, the step + the loss check's host
    sync, the step + the metrics window's update, and the GPU generator alone."""
    parts = build_components(cfg)
    out: dict[str, float] = {}
    window = CTRMetrics(device=device)
    variants = {
        "step": (None, False),
        "step+loss_sync": (lambda loss: bool(torch.isfinite(loss)), False),
        "step+metrics_window": (None, True),
    }
    for name, (check, metrics) in variants.items():
        pipe = TrainPipeline(parts.train_model, parts.dense_optimizer, parts.embedding, device,
                             nn.BCEWithLogitsLoss(), overlap=False, check_loss=check,
                             sync=parts.sync)
        it = itertools.cycle(batches)

        def one(i: int, pipe: Any = pipe, it: Any = it, metrics: bool = metrics) -> None:
            o = pipe.progress(it)
            if metrics:
                window.update(torch.sigmoid(o.logits), o.batch.labels)

        out[name] = 1000 * timed(one, args.steps, args.warmup, device)
        pipe.close()
    d = copy.deepcopy(cfg.data)
    d.synthetic.generator = SyntheticBackend.TORCH
    src = build_source(d, "train", seed=1, device=device)
    gen = iter(src)
    out["generator_torch"] = 1000 * timed(lambda i: next(gen), args.steps, args.warmup, device)
    src.close()
    torch.cuda.empty_cache()  # no-op without CUDA
    return out


def columnar_data(cfg: Config, root: Path, rows: int) -> Path:
    """A preprocessed dataset of ``rows`` samples from the numpy synthetic generator."""
    gen = SyntheticGenerator(cfg.data.synthetic, seed=2)
    chunk = 131_072
    chunks = (gen.rows(np.random.default_rng([2, i]), chunk) for i in range(rows // chunk))
    write_dataset(root, [chunks], source_kind="synthetic", dense=dense_names(cfg.data.synthetic),
                  sparse=sparse_names(cfg.data.synthetic))
    return root


def free_memory() -> None:
    """Frees the last run's tables (reference cycles too) before the next one grows its own."""
    gc.collect()
    torch.cuda.empty_cache()  # no-op without CUDA


def e2e(cfg: Config) -> dict[str, float]:
    summary = train(cfg)
    free_memory()
    lines = [json.loads(x) for x in
             (Path(cfg.train.runs_dir) / cfg.name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in lines if r.get("split") == "train"]
    steady = statistics.median(rates[1:]) if len(rates) > 1 else summary["samples_per_s"]
    return {"steady": steady, "whole_run": summary["samples_per_s"]}


def stream_batches(cfg: Config, n: int, device: torch.device) -> list[Any]:
    """The first ``n`` train batches ``terarec train`` reads with ``cfg``, on the device."""
    src = build_source(cfg.data, "train", seed=cfg.seed, device=device)
    out = [b.to(device) for b in itertools.islice(iter(src), n)]
    src.close()
    sync(device)
    return out


def step_on_batches(cfg: Config, batches: list[Any], device: torch.device) -> dict[str, float]:
    """The training step alone over ``batches`` in order, from a fresh model built as
    ``terarec train`` builds it: the same rows are created and updated as in the run.
    Rates per ``log_every`` steps (a sync at each boundary), as the run logs them."""
    parts = build_components(cfg)
    pipe = TrainPipeline(parts.train_model, parts.dense_optimizer, parts.embedding, device,
                         nn.BCEWithLogitsLoss(), overlap=False, check_loss=None,
                         sync=parts.sync)
    it = iter(batches)
    every, rates = cfg.train.log_every, []
    t_start = time.perf_counter()
    for _ in range(len(batches) // every):
        t0 = time.perf_counter()
        for _ in range(every):
            pipe.progress(it)
        sync(device)
        rates.append(every * cfg.data.batch_size / (time.perf_counter() - t0))
    whole = len(rates) * every * cfg.data.batch_size / (time.perf_counter() - t_start)
    pipe.close()
    del parts, pipe
    free_memory()
    return {"steady": statistics.median(rates[1:]) if len(rates) > 1 else rates[0],
            "whole_run": whole}


def source_config(args: argparse.Namespace, root: Path, base: Config, source: str) -> Config:
    """The ``terarec train`` config of one ``--sources`` entry."""
    if source == "synthetic-torch":
        cfg = config(args, root / "runs", synthetic={
            "vocab_size": args.vocab, "zipf_alpha": 1.1, "eval_samples": args.batch,
            "generator": "torch"})
    elif source == "synthetic-numpy":
        cfg = config(args, root / "runs")
        cfg.train.steps = args.numpy_steps
        cfg.train.log_every = max(args.numpy_steps // 4, 1)
    elif source in ("columnar", "columnar-overlap"):
        data = root / "columnar"
        if not data.exists():
            columnar_data(base, data, args.columnar_rows)
        cfg = config(args, root / "runs", kind="columnar", path=[str(data)],
                     eval_path=[str(data)])
        # overlap: the next batch's host->device copy on the pipeline's side stream
        cfg.train.prefetch = source == "columnar-overlap"
    else:
        raise SystemExit(f"--sources: unknown {source!r}")
    cfg.name = source
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--read-workers", type=int, default=2)
    ap.add_argument("--columnar-rows", type=int, default=2_097_152)
    ap.add_argument("--sources",
                    default="synthetic-torch,columnar,columnar-overlap,synthetic-numpy")
    ap.add_argument("--numpy-steps", type=int, default=60, help="steps of synthetic-numpy")
    ap.add_argument("--rounds", type=int, default=1,
                    help="times each source's end-to-end run and its step alone alternate")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the step + each addition of the training loop alone")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    root = Path(tempfile.mkdtemp(prefix="train_e2e_"))
    base = config(args, root / "runs")
    batches = device_batches(base, 64, device)
    sps: dict[str, Any] = {}
    sps["plain"] = args.batch / plain_step_s(base, batches, args, device)
    free_memory()  # the plain model's tables and optimizer state
    sps["plain, one table"] = args.batch / plain_step_s(base, batches, args, device, True)
    free_memory()
    sps["step"] = args.batch / terarec_step_s(base, batches, args, device)
    parts_ms = breakdown_ms(base, batches, args, device) if args.breakdown else None
    del batches
    torch.cuda.empty_cache()  # no-op without CUDA
    ratios: dict[str, Any] = {}
    for source in filter(None, args.sources.split(",")):
        cfg = source_config(args, root, base, source)
        runs: dict[str, list[dict[str, float]]] = {"e2e": [], "alone": []}
        for _ in range(args.rounds):
            runs["e2e"].append(e2e(cfg))
            if source != "synthetic-numpy":  # (its own step is the step of the others)
                same = stream_batches(cfg, cfg.train.steps or 0, device)
                runs["alone"].append(step_on_batches(cfg, same, device))
                del same
                free_memory()
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("steady", "whole_run")}
               for k, v in runs.items() if v}
        sps[f"e2e {source}"] = med["e2e"]
        r: dict[str, Any] = {"vs_step": round(med["e2e"]["steady"] / sps["step"], 3),
                             "vs_plain": round(med["e2e"]["steady"] / sps["plain"], 3),
                             "vs_plain_one_table": round(
                                 med["e2e"]["steady"] / sps["plain, one table"], 3),
                             "whole_run_vs_step": round(med["e2e"]["whole_run"] / sps["step"], 3)}
        if "alone" in med:
            sps[f"step alone, {source} batches"] = med["alone"]
            r["vs_step_same_batches"] = round(med["e2e"]["steady"] / med["alone"]["steady"], 3)
            r["rounds"] = [round(e["steady"] / a["steady"], 3)
                           for e, a in zip(runs["e2e"], runs["alone"])]
        ratios[f"e2e {source}"] = r
    ratios["step vs plain"] = round(sps["step"] / sps["plain"], 3)
    ratios["step vs plain, one table"] = round(sps["step"] / sps["plain, one table"], 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "batch": args.batch,
              "steps": args.steps, "samples_per_s": sps, "ratios": ratios}
    if parts_ms is not None:
        result["breakdown_ms"] = parts_ms
        result["breakdown_vs_step"] = {k: round(v / parts_ms["step"], 3)
                                       for k, v in parts_ms.items()}
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

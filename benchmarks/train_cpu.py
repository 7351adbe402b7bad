"""terarec vs TorchRec's fastest CPU setup: training samples/s on the same batches.

Both sides train the same DLRM (terarec's ``build_model``) with the same dense Adam on
the same pre-generated synthetic batches; only the embedding layer differs:

* terarec: ``HierarchicalEmbeddingBagCollection`` (unbounded int64 keys, hash index,
  rows created on first touch, fused row optimizer in backward);
* baseline: TorchRec ``FusedEmbeddingBagCollection`` on FBGEMM's CPU TBE kernels with
  the same fused optimizer, over fixed-size tables (keys taken modulo the table size
  *before* timing, which favours the baseline: it does no hashing at all).

Two table layouts: ``shared`` (one table for all features, keys feature-salted; the
natural terarec layout) and ``per-feature`` (one table per feature, TorchRec's usual
layout). Both sides train in lockstep (step ``i`` of each back to back), so load from
other processes hits them alike. Prints samples/s of each side and the ratio per layout
and, with both layouts, the headline: terarec's best vs TorchRec's fastest setup;
``--json`` prints one JSON object.

``--tiered-tables N`` measures something else, terarec against itself: the features
split over N tiered tables of one dim (each with a device tier holding ``--device-rows``
rows over an unbounded host tier), trained as one batched group (one dedup, gather,
pooling and optimizer launch; one tier chain per table) against the same tables each in
a group of its own (``group_tables=False``), in lockstep on the same batches.

    python benchmarks/train_cpu.py [--steps 60] [--layout both] [--json]
    python benchmarks/train_cpu.py --tiered-tables 4 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from torch import nn

from terarec.config import (
    DataConfig,
    ModelConfig,
    SparseOptimConfig,
    SyntheticConfig,
    TableConfig,
)
from terarec.data import build_source, sparse_feature_names
from terarec.models import build_model
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection

# terarec sparse optimizer kind -> the torch optimizer TorchRec maps to the same FBGEMM kernel
_BASELINE_OPT = {
    "sgd": lambda: torch.optim.SGD,
    "adagrad": lambda: torch.optim.Adagrad,
    "rowwise_adagrad": lambda: (
        __import__("torchrec.optim", fromlist=["RowWiseAdagrad"]).RowWiseAdagrad
    ),
}


def make_batches(args: argparse.Namespace) -> tuple[list[Any], list[str]]:
    cfg = DataConfig(
        batch_size=args.batch_size,
        prefetch_batches=0,
        synthetic=SyntheticConfig(vocab_size=args.vocab, num_sparse=args.features),
    )
    src = build_source(cfg, "train", seed=0)
    it = iter(src)
    batches = [next(it) for _ in range(args.warmup + args.steps)]
    if hasattr(src, "close"):
        src.close()
    return batches, sparse_feature_names(cfg)


def time_lockstep(
    models: list[nn.Module], batches: list[list[Any]], warmup: int, lr: float
) -> list[float]:
    """Trains every model on its batches in lockstep; returns each one's samples/s.

    Step ``i`` of every model runs back to back (in an order that alternates from step
    to step), so drift and bursts of load on a shared machine hit all sides alike.
    Times are summed over the post-warmup steps (mean throughput: amortised costs such
    as table growth count).
    """
    opts = [
        torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr) for m in models
    ]
    loss_fn = nn.BCEWithLogitsLoss()
    spent = [0.0] * len(models)
    samples = 0
    for i in range(len(batches[0])):
        order = range(len(models)) if i % 2 == 0 else reversed(range(len(models)))
        for k in order:
            b = batches[k][i]
            t0 = time.perf_counter()
            loss = loss_fn(models[k](b.dense, b.sparse), b.labels)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            if i >= warmup:
                spent[k] += time.perf_counter() - t0
        if i >= warmup:
            samples += batches[0][i].batch_size
    return [samples / t for t in spent]


def terarec_model(
    tables: list[TableConfig], feats: list[str], args: argparse.Namespace, grouped: bool = True
) -> nn.Module:
    opt = SparseOptimConfig(kind=args.optimizer, lr=0.01)
    ebc = HierarchicalEmbeddingBagCollection(tables, feats, opt, seed=0, group_tables=grouped)
    dims = [ebc.feature_dims[f] for f in ebc.out_features]
    return build_model(ModelConfig(bottom_mlp=[64, args.dim]), ebc, ebc.out_features, dims, 13)


def torchrec_model(feats: list[str], shared: bool, args: argparse.Namespace) -> nn.Module:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    if shared:
        cfgs = [
            EmbeddingBagConfig(
                name="all",
                embedding_dim=args.dim,
                num_embeddings=args.vocab * len(feats),
                feature_names=feats,
            )
        ]
    else:
        cfgs = [
            EmbeddingBagConfig(
                name=f"t_{f}", embedding_dim=args.dim, num_embeddings=args.vocab, feature_names=[f]
            )
            for f in feats
        ]
    ebc = FusedEmbeddingBagCollection(
        tables=cfgs,
        optimizer_type=_BASELINE_OPT[args.optimizer](),
        optimizer_kwargs={"lr": 0.01},
        device=torch.device("cpu"),
    )
    order = [f for c in cfgs for f in c.feature_names]
    return build_model(
        ModelConfig(bottom_mlp=[64, args.dim]), ebc, order, [args.dim] * len(order), 13
    )


def bounded(batches: list[Any], modulus: int) -> list[Any]:
    """The same batches with keys mapped into [0, modulus) for fixed-size tables."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    out = []
    for b in batches:
        kjt = b.sparse
        vals = torch.remainder(kjt.values(), modulus)
        out.append(
            type(b)(
                dense=b.dense,
                labels=b.labels,
                sparse=KeyedJaggedTensor(
                    keys=kjt.keys(), values=vals, lengths=kjt.lengths(), stride=kjt.stride()
                ),
            )
        )
    return out


def tiered(args: argparse.Namespace, batches: list[Any], feats: list[str]) -> dict[str, Any]:
    """Grouped vs per-table groups of ``--tiered-tables`` tiered tables (see above)."""
    n = args.tiered_tables
    tables = [
        TableConfig(name=f"t{i}", dim=args.dim, features=feats[i::n], device_rows=args.device_rows)
        for i in range(n)
    ]
    models = []
    for grouped in (True, False):
        torch.manual_seed(0)
        models.append(terarec_model(tables, feats, args, grouped))
    grouped_sps, per_table_sps = time_lockstep(models, [batches, batches], args.warmup, 1e-3)
    return {
        "tables": n,
        "grouped_samples_per_s": grouped_sps,
        "per_table_samples_per_s": per_table_sps,
        "ratio": grouped_sps / per_table_sps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--vocab", type=int, default=100_000, help="distinct ids per feature")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--optimizer", default="rowwise_adagrad", choices=sorted(_BASELINE_OPT))
    p.add_argument("--layout", default="both", choices=["shared", "per-feature", "both"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiered-tables", type=int, default=0,
                   help="N > 0: grouped vs per-table groups of N tiered tables")
    p.add_argument("--device-rows", type=int, default=1_000_000,
                   help="--tiered-tables: each table's device tier")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches, feats = make_batches(args)
    if args.tiered_tables:
        res = {"config": vars(args), "tiered": tiered(args, batches, feats)}
        t = res["tiered"]
        print(json.dumps(res) if args.json else
              f"{t['tables']} tiered tables: one group {t['grouped_samples_per_s']:,.0f} "
              f"samples/s | a group per table {t['per_table_samples_per_s']:,.0f} samples/s "
              f"| ratio {t['ratio']:.2f}x")
        return 0
    layouts = ["shared", "per-feature"] if args.layout == "both" else [args.layout]
    results: dict[str, Any] = {"config": vars(args), "layouts": {}}
    for layout in layouts:
        shared = layout == "shared"
        tables = (
            [TableConfig(name="all", dim=args.dim)]
            if shared
            else [TableConfig(name=f"t_{f}", dim=args.dim, features=[f]) for f in feats]
        )
        base_batches = bounded(batches, args.vocab * (len(feats) if shared else 1))
        torch.manual_seed(0)
        ours_model = terarec_model(tables, feats, args)
        torch.manual_seed(0)
        base_model = torchrec_model(feats, shared, args)
        ours, base = time_lockstep(
            [ours_model, base_model], [batches, base_batches], args.warmup, 1e-3
        )
        r = {
            "terarec_samples_per_s": ours,
            "torchrec_samples_per_s": base,
            "ratio": ours / base,
        }
        results["layouts"][layout] = r
        if not args.json:
            print(
                f"[{layout:11s}] terarec {r['terarec_samples_per_s']:>10,.0f} samples/s | "
                f"TorchRec FusedEBC (fbgemm CPU) {r['torchrec_samples_per_s']:>10,.0f} samples/s"
                f" | ratio {r['ratio']:.2f}x"
            )
    if len(layouts) > 1:
        lay = results["layouts"]
        best_ours = max(lay.values(), key=lambda r: r["terarec_samples_per_s"])
        best_base = max(lay.values(), key=lambda r: r["torchrec_samples_per_s"])
        results["headline_ratio"] = (
            best_ours["terarec_samples_per_s"] / best_base["torchrec_samples_per_s"]
        )
        if not args.json:
            print(
                f"headline: terarec best vs TorchRec's fastest CPU setup: "
                f"{results['headline_ratio']:.2f}x"
            )
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the sharded-exchange tests and their worker processes: the data, the model,
the per-rank slices of a global batch and one training run (sharded or not).

The model is the issue's equivalence set-up: a tiered table (device 96 rows, host 150
rows, SSD below: every eviction path on every rank) and a two-table group (mean pooling,
composite keys) feeding a linear layer and a logistic loss. Each step's global batch is
split over the ranks that share it; the edge cases are planted in the data:

* step 3: every sample goes to the first rank, the others train an *empty* batch;
* step 5: the second half of the batch has no keys of the two-table group;
* step 7: the second half of the batch has no keys at all (some ranks get none).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import InitConfig, Pooling, SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.ssd import SSDStore, SSDTierConfig

FEATS = ["a", "b", "c", "d"]
BATCH = 24
STEPS = 36
VOCAB = 3000
MAX_BAG = 3  # ids per bag: lengths are drawn from [0, 4)
EMPTY_STEP, NO_GROUP_STEP, NO_KEYS_STEP = 3, 5, 7


def tables() -> list[TableConfig]:
    return [
        TableConfig(name="big", dim=4, features=["a", "b"], device_rows=96, host_rows=150,
                    init=InitConfig(kind="uniform", scale=0.1)),
        TableConfig(name="u1", dim=3, features=["c"], pooling=Pooling.MEAN),
        TableConfig(name="u2", dim=3, features=["d"], pooling=Pooling.MEAN),
    ]


def optimizer(kind: str) -> SparseOptimConfig:
    return SparseOptimConfig(kind=kind, lr=0.05, initial_accumulator_value=0.1)


def global_batches(seed: int, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step ``(lengths [F, B], values [N])`` in feature-major KJT order + labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        lengths = torch.randint(0, MAX_BAG + 1, (len(FEATS), BATCH), generator=g)
        if step == NO_GROUP_STEP:
            lengths[2:, BATCH // 2 :] = 0
        if step == NO_KEYS_STEP:
            lengths[:, BATCH // 2 :] = 0
        n = int(lengths.sum())
        hot = torch.randint(0, 30, (n,), generator=g)
        cold = torch.randint(0, VOCAB, (n,), generator=g)
        ids = torch.where(torch.rand(n, generator=g) < 0.3, hot, cold) * 104729 - 3 * 2**40
        out.append((lengths, ids))
    return out


def labels(seed: int, steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.rand(BATCH, generator=g) < 0.3).float() for _ in range(steps)]


def cut(step: int, parts: int, index: int) -> tuple[int, int]:
    """Samples ``[lo, hi)`` of the global batch for member ``index`` of ``parts``."""
    if step == EMPTY_STEP:
        return (0, BATCH) if index == 0 else (BATCH, BATCH)
    per = BATCH // parts
    return index * per, (index + 1) * per


def kjt_slice(lengths: torch.Tensor, ids: torch.Tensor, lo: int, hi: int) -> KeyedJaggedTensor:
    """The KJT of samples ``[lo, hi)`` (every feature)."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths.reshape(-1), 0, out=offsets[1:])
    parts = []
    for f in range(len(FEATS)):
        start = int(offsets[f * BATCH + lo])
        end = int(offsets[f * BATCH + hi])
        parts.append(ids[start:end])
    return KeyedJaggedTensor.from_lengths_sync(
        FEATS, torch.cat(parts), lengths[:, lo:hi].reshape(-1).contiguous()
    )


def build(kind: str, ssd_dir: Path, seed: int = 11, **dist_args: Any):
    """The collection (tiers with an SSD store in ``ssd_dir``) and the dense head."""
    store = SSDStore(ssd_dir, SSDTierConfig(path=str(ssd_dir)))
    ebc = HierarchicalEmbeddingBagCollection(
        tables(), FEATS, optimizer(kind), seed=seed, ssd_store=store, **dist_args
    )
    torch.manual_seed(0)
    head = nn.Linear(4 * 2 + 3 * 2, 1)
    return ebc, head, store


def train(
    ebc: HierarchicalEmbeddingBagCollection,
    model: nn.Module,
    data_seed: int,
    parts: int = 1,
    index: int = 0,
    prefetch: bool = False,
    loss_group: Optional[Any] = None,
    grads: Optional[list[float]] = None,
) -> list[float]:
    """Trains member ``index`` of ``parts`` ranks sharing each global batch.

    The rank's loss is its samples' summed loss times ``parts / BATCH`` (the mean over
    the global batch once the ranks' gradients are averaged, as DDP does; equal to the
    local mean when the split is even). Returns the global mean loss per step (summed
    over ``loss_group`` when given). ``grads``, when given, gets a bound per step on any
    row's gradient entry: a row sums the pooled gradients of the bags it is in, at most
    ``MAX_BAG`` times each.
    """
    import torch.distributed as dist

    data, ys = global_batches(data_seed), labels(data_seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step, ((lengths, ids), y) in enumerate(zip(data, ys)):
        lo, hi = cut(step, parts, index)
        kjt = kjt_slice(lengths, ids, lo, hi)
        pooled = ebc(kjt).values()
        if grads is not None and pooled.requires_grad:
            pooled.register_hook(lambda g: grads.append(MAX_BAG * float(g.abs().sum())))
        logits = model(pooled).squeeze(1)
        total = nn.functional.binary_cross_entropy_with_logits(logits, y[lo:hi], reduction="sum")
        loss = total * (parts / BATCH)
        worker = None
        if prefetch and step + 1 < len(data):
            lo2, hi2 = cut(step + 1, parts, index)
            nxt = kjt_slice(*data[step + 1], lo2, hi2)
            worker = threading.Thread(target=ebc.prefetch, args=(nxt,))
            worker.start()
        opt.zero_grad()
        loss.backward()
        if worker is not None:
            worker.join()
        opt.step()
        seen = total.detach().reshape(1)
        if loss_group is not None:
            dist.all_reduce(seen, group=loss_group)
        losses.append(float(seen) / BATCH)
    return losses


def eval_pooled(
    ebc: HierarchicalEmbeddingBagCollection, data_seed: int, parts: int = 1, index: int = 0
) -> torch.Tensor:
    """Pooled embeddings ``[b, 14]`` of this rank's slice of the last batch (every other
    id replaced by one never trained), in eval mode
    (owners look rows up, never create them) and back in training mode after."""
    lengths, ids = global_batches(data_seed)[-1]
    unseen = torch.arange(ids.numel()) % 2 == 1  # every other id: a key never trained
    ids = torch.where(unseen, ids * 3 + 1, ids)
    lo, hi = cut(1, parts, index)
    ebc.eval()
    with torch.no_grad():
        out = ebc(kjt_slice(lengths, ids, lo, hi)).values()
    ebc.train()
    return out


def rows_of(
    ebc: HierarchicalEmbeddingBagCollection,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per table ``(keys [R], rows [R, width])`` sorted by key."""
    out = {}
    for name, st in ebc.tables_state_dict().items():
        k, r = st["keys"], st["rows"]
        order = torch.argsort(k)
        out[name] = (k[order], r[order])
    return out

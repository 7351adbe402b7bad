"""``HierarchicalEmbeddingBagCollection``: KJT in, pooled ``KeyedTensor`` out.

The module owns no ``nn.Parameter``: rows live in the tables' tiers and are updated by
the fused row optimizer during backward (as TorchRec's fused EBC / FBGEMM TBE do), so
the dense optimizer never sees them. One forward, per table::

    values [N] --unique--> keys [U], inverse [N] --tier--> slots [U], weights [U, D]
    embedding_bag(inverse, weights, offsets) -> pooled [F*B, D] -> [B, F*D]
    backward: grad [U, D] (summed per key) -> row optimizer -> rows written back
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from terarec.config import Pooling, SparseOptimConfig, TableConfig
from terarec.ps.table import EmbeddingTable


def resolve_table_features(tables: list[TableConfig], feature_names: list[str]) -> list[list[str]]:
    """Features of each table; the table with ``features: None`` takes the rest."""
    known = set(feature_names)
    taken: set[str] = set()
    for t in tables:
        for f in t.features or []:
            if f not in known:
                raise ValueError(
                    f"table {t.name!r}: feature {f!r} is not in the data "
                    f"(data features: {', '.join(feature_names)})"
                )
            taken.add(f)
    rest = [f for f in feature_names if f not in taken]
    out = [list(t.features) if t.features is not None else rest for t in tables]
    if any(not fs for fs in out):
        raise ValueError("a table with features: null has no features left to take")
    unused = [f for f in feature_names if f not in {x for fs in out for x in fs}]
    if unused:
        raise ValueError(
            f"features {unused} are in the data but in no table; add them to a table "
            "or give one table `features: null`"
        )
    return out


class HierarchicalEmbeddingBagCollection(nn.Module):
    """Pooled embedding lookups over unbounded-key tables.

    Args:
        tables: table configs (dim, pooling, init, features).
        feature_names: every sparse feature of the data, in KJT key order.
        optimizer: the fused sparse row optimizer config.
        device: where rows live and compute happens.
        seed: run seed for first-touch row initialisation.

    Example::

        ebc = HierarchicalEmbeddingBagCollection(tables, ["C1", "C2"], SparseOptimConfig())
        kt = ebc(kjt)            # KeyedTensor, kt["C1"] is [B, dim]
    """

    def __init__(
        self,
        tables: list[TableConfig],
        feature_names: list[str],
        optimizer: SparseOptimConfig,
        device: Optional[torch.device] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.device = torch.device(device or "cpu")
        self.feature_names = list(feature_names)
        self.table_features = resolve_table_features(tables, self.feature_names)
        self.tables = [EmbeddingTable(t, optimizer, self.device, seed) for t in tables]
        self._pooling = [t.pooling for t in tables]
        self.out_features = [f for fs in self.table_features for f in fs]
        self.feature_dims = {
            f: t.dim for t, fs in zip(self.tables, self.table_features) for f in fs
        }
        self._perm_cache: dict[tuple[str, ...], list[int]] = {}

    def _permutation(self, keys: list[str]) -> list[int]:
        key = tuple(keys)
        if key not in self._perm_cache:
            pos = {k: i for i, k in enumerate(keys)}
            missing = [f for f in self.out_features if f not in pos]
            extra = [k for k in keys if k not in self.feature_dims]
            if missing or extra:
                raise ValueError(
                    f"KJT features do not match the tables: missing {missing}, unknown {extra}"
                )
            self._perm_cache[key] = [pos[f] for f in self.out_features]
        return self._perm_cache[key]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pools each feature's keys.

        Args:
            features: KJT of int64 keys, ``B = features.stride()``.
        Returns:
            KeyedTensor with keys ``out_features`` (grouped by table), values
            ``[B, sum of dims]``.
        """
        keys = features.keys()
        perm = self._permutation(keys)
        if perm != list(range(len(keys))):
            features = features.permute(perm)
        parts = features.split([len(fs) for fs in self.table_features])
        train = self.training and torch.is_grad_enabled()
        pooled = [
            self._pool_table(t, kjt, pool, train)
            for t, kjt, pool in zip(self.tables, parts, self._pooling)
        ]
        lengths = [t.dim for t, fs in zip(self.tables, self.table_features) for _ in fs]
        return KeyedTensor(
            keys=self.out_features, length_per_key=lengths, values=torch.cat(pooled, dim=1)
        )

    def _pool_table(
        self, table: EmbeddingTable, kjt: KeyedJaggedTensor, pooling: Pooling, train: bool
    ) -> torch.Tensor:
        batch = kjt.stride()
        n_feat = len(kjt.keys())
        values = kjt.values().to(self.device, torch.int64)
        offsets = kjt.offsets().to(self.device)
        dedup = _dedup(values)
        if train:
            slots, rows = table.lookup_for_training(dedup.keys)
            weights = rows[:, : table.dim].contiguous().requires_grad_(True)
            weights.register_hook(_RowUpdate(table, slots, rows))
        else:
            weights = table.lookup_for_inference(dedup.keys)
        pooled = _Pool.apply(weights, dedup, offsets, pooling == Pooling.MEAN)
        return pooled.view(n_feat, batch, table.dim).transpose(0, 1).reshape(batch, -1)

    # -- state ---------------------------------------------------------------------
    def num_rows(self) -> dict[str, int]:
        return {t.name: len(t) for t in self.tables}

    def table_stats(self) -> dict[str, dict[str, float]]:
        return {t.name: t.tier.stats() for t in self.tables}

    def tables_state_dict(self) -> dict[str, Any]:
        return {t.name: t.state_dict() for t in self.tables}

    def load_tables_state_dict(self, state: dict[str, Any]) -> None:
        missing = [t.name for t in self.tables if t.name not in state]
        if missing:
            raise ValueError(f"checkpoint has no rows for tables {missing}")
        for t in self.tables:
            t.load_state_dict(state[t.name])


@dataclass
class _Dedup:
    """Unique keys of a flat value list and the maps between the two.

    For ``values = [7, 3, 7]``: ``keys = [3, 7]``, ``inverse = [1, 0, 1]`` (value ->
    unique key), ``order = [1, 0, 2]`` (values grouped by key), ``key_offsets = [0, 1, 3]``.
    """

    keys: torch.Tensor  # [U]
    inverse: torch.Tensor  # [N]
    order: torch.Tensor  # [N]
    key_offsets: torch.Tensor  # [U + 1]


def _dedup(values: torch.Tensor) -> _Dedup:
    sorted_vals, order = torch.sort(values)
    keys, counts = torch.unique_consecutive(sorted_vals, return_counts=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.repeat_interleave(
        torch.arange(keys.numel(), device=values.device), counts, output_size=values.numel()
    )
    key_offsets = torch.zeros(keys.numel() + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(counts, 0, out=key_offsets[1:])
    return _Dedup(keys, inverse, order, key_offsets)


class _Pool(torch.autograd.Function):
    """Bag pooling over the gathered unique rows, with a sort-free backward.

    The gradient of unique row ``u`` is the sum of the bag gradients of every value that
    maps to ``u``. With the values already grouped by key (``_Dedup.order``), that is
    itself an ``embedding_bag`` over the bag gradients: one bag per unique key. It gives
    the fused row optimizer exactly what it needs (one summed gradient per key) without
    ``embedding_bag``'s dense backward, which sorts again and scatters.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, weights: torch.Tensor, dedup: _Dedup, offsets: torch.Tensor, mean: bool
    ) -> torch.Tensor:
        """weights ``[U, D]``, offsets ``[bags + 1]`` into the values -> ``[bags, D]``."""
        mode = "mean" if mean else "sum"
        out = F.embedding_bag(
            dedup.inverse, weights, offsets, mode=mode, include_last_offset=True
        )
        ctx.dedup = dedup
        ctx.save_for_backward(offsets)
        ctx.mean = mean
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (offsets,) = ctx.saved_tensors
        d: _Dedup = ctx.dedup
        lengths = offsets[1:] - offsets[:-1]
        bag_of_value = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=lengths.device),
            lengths,
            output_size=d.inverse.numel(),
        )
        bag_sorted = bag_of_value[d.order]
        psw = None
        if ctx.mean:
            psw = (1.0 / lengths.clamp(min=1).to(grad_out.dtype))[bag_sorted]
        grad_w = F.embedding_bag(
            bag_sorted,
            grad_out.contiguous(),
            d.key_offsets,
            mode="sum",
            per_sample_weights=psw,
            include_last_offset=True,
        )
        return grad_w, None, None, None


class _RowUpdate:
    """Backward hook: applies the fused row optimizer to the rows a forward gathered.

    The rows gathered in forward are reused unless the table was updated in between
    (e.g. two forwards before one backward); then they are read again.
    """

    def __init__(self, table: EmbeddingTable, slots: torch.Tensor, rows: torch.Tensor) -> None:
        self.table = table
        self.slots = slots
        self.rows = rows
        self.version = table.version

    def __call__(self, grad: torch.Tensor) -> None:
        rows = self.rows if self.table.version == self.version else None
        self.table.apply_gradients(self.slots, grad, rows)
        self.rows = None
        return None

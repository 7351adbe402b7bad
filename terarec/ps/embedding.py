"""``HierarchicalEmbeddingBagCollection``: KJT in, pooled ``KeyedTensor`` out.

The module owns no ``nn.Parameter``: rows live in the tables' tiers and are updated by
the fused row optimizer during backward (as TorchRec's fused EBC / FBGEMM TBE do), so
the dense optimizer never sees them. One forward, per table::

    values [N] --unique--> keys [U], inverse [N] --tier--> slots [U], weights [U, D]
    embedding_bag(inverse, weights, offsets) -> pooled [F*B, D] -> [B, F*D]
    backward: grad [U, D] (summed per key) -> row optimizer -> rows written back
"""

from __future__ import annotations

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
        uniq, inverse = torch.unique(values, return_inverse=True)
        if train:
            slots, weights = table.lookup_for_training(uniq)
            weights.requires_grad_(True)
            weights.register_hook(_RowUpdate(table, slots))
        else:
            weights = table.lookup_for_inference(uniq)
        mode = "sum" if pooling == Pooling.SUM else "mean"
        pooled = F.embedding_bag(
            inverse, weights, offsets, mode=mode, include_last_offset=True
        )  # [F*B, D], feature-major
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


class _RowUpdate:
    """Backward hook: applies the fused row optimizer to the rows a forward gathered."""

    def __init__(self, table: EmbeddingTable, slots: torch.Tensor) -> None:
        self.table = table
        self.slots = slots

    def __call__(self, grad: torch.Tensor) -> None:
        self.table.apply_gradients(self.slots, grad)
        return None

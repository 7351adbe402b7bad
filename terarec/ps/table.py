"""One logical embedding table: a namespace of rows inside a :class:`TableGroup`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from terarec.config import TableConfig
from terarec.optim.sparse import RowOptimizer
from terarec.ps.group import TableGroup, group_key, table_seed
from terarec.ps.initializer import init_rows

__all__ = ["EmbeddingTable", "feature_order", "resolve_table_features", "table_seed"]


class EmbeddingTable:
    """Rows of one table keyed by int64 ids; weights and optimizer state side by side.

    The rows live in the table's group (tables of one dim, pooling and initializer share
    a store and are trained in one batched step); this view reads and writes only this
    table's namespace.

    Args:
        cfg: the table's config (dim, init, ...).
        group: the group holding its rows.
        index: the table's position in the group.
    """

    def __init__(self, cfg: TableConfig, group: TableGroup, index: int) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.dim = cfg.dim
        self.group = group
        self.index = index
        self.seed = group.seeds[index]

    @property
    def optimizer(self) -> RowOptimizer:
        return self.group.optimizer

    @property
    def row_width(self) -> int:
        return self.group.row_width

    def __len__(self) -> int:
        return self.group.rows_per_table()[self.index]

    def _tables(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.full((n,), self.index, dtype=torch.int64, device=device)

    def initial_weights(self, keys: torch.Tensor) -> torch.Tensor:
        """Weights a key gets on first touch ``[N, dim]`` (the dense reference's init)."""
        return init_rows(keys, self.dim, self.cfg.init, self.seed)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Rows of ``keys`` ``[N, row_width]`` (duplicates allowed); absent keys read as
        zeros and are not created."""
        tables = self._tables(keys.numel(), keys.device)
        rows, _ = self.group.lookup_rows(self.group.composite(keys, tables), tables)
        return rows

    def insert_rows(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Creates or overwrites the rows of unique ``keys`` (tools and tests)."""
        tables = self._tables(keys.numel(), keys.device)
        comp, order = torch.sort(self.group.composite(keys, tables), stable=True)
        rows = rows.to(torch.float32)[order]
        slots = self.group.slots_for(comp, tables, create=lambda pos: rows[pos])
        self.group.write(slots, rows)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys [R], rows [R, row_width])`` of every row of this table."""
        return self.group.export_table(self.index)

    def export_chunks(self, chunk_rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`export` as consecutive ``(keys [C], rows [C, row_width])`` chunks, the
        same rows in the same order; an untiered table never copies all its rows at
        once (tiered ones may come as one chunk)."""
        return self.group.export_table_chunks(self.index, chunk_rows)

    @property
    def in_ssd(self) -> bool:
        """Whether every row of the table lives in the SSD tier (it has ``host_rows``)."""
        return self.cfg.host_rows is not None

    def state_dict(self, rows: bool = True) -> dict[str, Any]:
        """``keys``, ``rows``, ``optimizer``; the group's first table also carries the
        group's step counter (``group_step``) and its admission sketch (``admission``),
        when it has one. Without ``rows`` (a
        table whose SSD tier is checkpointed as a snapshot): ``ssd: True`` and the row
        count (``num_rows``) instead of keys and rows."""
        if rows:
            keys, rows_t = self.export()
            state: dict[str, Any] = {"keys": keys, "rows": rows_t}
        else:
            state = {"ssd": True, "num_rows": len(self)}
        state["optimizer"] = self.optimizer.state_dict()
        if self.index == 0:
            # the group's clock: rows' last-use steps (TTL, recency) are read against it
            state["group_step"] = self.group.step
            if self.group.admission is not None:
                state["admission"] = self.group.admission.state_dict()
        return state

    def check_state(self, state: dict[str, Any]) -> None:
        """Raises ValueError unless ``state`` fits this table's row layout."""
        if state.get("ssd"):
            if not self.in_ssd:
                raise ValueError(
                    f"table {self.name}: its rows were saved in an SSD tier snapshot, but "
                    "this run gives it no SSD tier (host_rows)"
                )
            return
        rows = state["rows"]
        if rows.dim() != 2 or rows.shape[1] != self.row_width:
            raise ValueError(
                f"table {self.name}: checkpoint rows are {tuple(rows.shape)}, expected "
                f"[*, {self.row_width}] (dim {self.dim} + optimizer state); was it saved "
                "with another dim or optimizer?"
            )
        if state["keys"].numel() != rows.shape[0]:
            raise ValueError(f"table {self.name}: checkpoint has a key count != row count")


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


def table_groups(tables: list[TableConfig], group_tables: bool = True) -> list[list[int]]:
    """Indices of the tables that train as one group (one dim, pooling and initializer:
    ``group_key``), groups in order of their first table, tables in config order."""
    by_key: dict[tuple, list[int]] = {}
    for i, t in enumerate(tables):
        by_key.setdefault(group_key(t) if group_tables else (i,), []).append(i)
    return list(by_key.values())


def feature_order(tables: list[TableConfig], feature_names: list[str]
                  ) -> tuple[list[str], dict[str, int]]:
    """The pooled output order of the embedding module (features grouped by table
    group, as ``HierarchicalEmbeddingBagCollection.group_features``) and each feature's
    table index."""
    per_table = resolve_table_features(tables, feature_names)
    order = [f for members in table_groups(tables) for i in members for f in per_table[i]]
    return order, {f: i for i, fs in enumerate(per_table) for f in fs}


"""``HierarchicalEmbeddingBagCollection``: KJT in, pooled ``KeyedTensor`` out.

The module owns no ``nn.Parameter``: rows live in the tables' tiers and are updated by
the fused row optimizer during backward (as TorchRec's fused EBC / FBGEMM TBE do), so
the dense optimizer never sees them. Tables of one dim, pooling and initializer form a
group (``ps/group.py``) that trains as one batch. One forward, per group::

    values [N] --unique (table, key)--> keys [U], inverse [N]
    --group tier--> slots [U], weights [U, D]
    embedding_bag(inverse, weights, offsets) -> pooled [F*B, D] -> [B, F*D]
    backward: grad [U, D] (summed per key) -> row optimizer -> rows written back
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from terarec.config import Pooling, SparseOptimConfig, TableConfig
from terarec.ps.features import expand_variable_batch, permute_features
from terarec.ps.group import TableGroup
from terarec.ps.pooling import Dedup, Pool, dedup, kjt_offsets
from terarec.ps.shard.sharded import ShardedLookup
from terarec.ps.state import (
    PREFIX,
    RowsNotInStateDict,
    check_tables,
    table_entries,
    tables_state,
)
from terarec.ps.table import EmbeddingTable, resolve_table_features, table_groups
from terarec.ps.tiers.ssd import SSDStore


class HierarchicalEmbeddingBagCollection(nn.Module):
    """Pooled embedding lookups over unbounded-key tables.

    Args:
        tables: table configs (dim, pooling, init, features).
        feature_names: every sparse feature of the data, in KJT key order.
        optimizer: the fused sparse row optimizer config.
        device: where rows live and compute happens.
        seed: run seed for first-touch row initialisation.
        ssd_store: the rank's SSD store; tables with a ``host_rows`` budget keep the rows
            their host tier evicts there (table id = the table's index in ``tables``).
        process_group: the shard group (a fast group): every ``(table, key)`` has one
            owner rank in it that holds the row (``ps/shard/exchange.py``); None = one rank
            holds every row (the single-process path, unchanged).
        replica_group: the ranks holding the same shard in other shard groups (a cross
            group); with ``sync_replicas`` the owners' row gradients are summed over it
            every step, so every replica applies the same update. None = no replicas.
        sync_replicas: combine row gradients over ``replica_group`` every step (k = 1);
            the k-step merger turns it off (attribute ``sync_replicas``) and merges
            replicas every k steps instead.
        prefetch_group: a second group with the members of ``process_group`` (in the
            same order) for :meth:`prefetch`, which runs on a background thread while
            the main thread's collectives use ``process_group``. Without it a sharded
            collection's prefetch does nothing.
        group_tables: batch the tables that can share a group (default); False puts
            every table in a group of its own (the unbatched layout, for comparisons).

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
        ssd_store: Optional[SSDStore] = None,
        *,
        process_group: Optional[Any] = None,
        replica_group: Optional[Any] = None,
        sync_replicas: bool = True,
        prefetch_group: Optional[Any] = None,
        group_tables: bool = True,
    ) -> None:
        super().__init__()
        self.process_group = process_group
        self.replica_group = replica_group
        self.sync_replicas = sync_replicas
        self.prefetch_group = prefetch_group
        self.ssd_store = ssd_store
        self.device = torch.device(device or "cpu")
        self.feature_names = list(feature_names)
        table_features = resolve_table_features(tables, self.feature_names)
        # Tables of one dim, pooling and initializer train as one group (one batched
        # step); groups in order of their first table, tables in config order inside.
        self.groups: list[TableGroup] = []
        self.tables: list[EmbeddingTable] = [None] * len(tables)  # type: ignore[list-item]
        self._group_features: list[list[str]] = []
        self._feature_table: list[torch.Tensor] = []  # per group: table index per feature
        for members in table_groups(tables, group_tables):
            group = TableGroup(
                [tables[i] for i in members], optimizer, self.device, seed,
                ssd_store=ssd_store, table_ids=members,
            )
            self.groups.append(group)
            feats: list[str] = []
            owner: list[int] = []
            for j, i in enumerate(members):
                self.tables[i] = EmbeddingTable(tables[i], group, j)
                feats += table_features[i]
                owner += [j] * len(table_features[i])
            self._group_features.append(feats)
            self._feature_table.append(torch.tensor(owner, dtype=torch.int64))
        self.table_features = table_features
        self.feature_dims = {
            f: t.dim for t, fs in zip(self.tables, table_features) for f in fs
        }
        # What the groups pool, in order, and what the KeyedTensor shows: TorchRec's order
        # (tables in config order, each table's features in order); the columns are
        # moved table by table only when the groups interleave the tables.
        self.group_features = [f for fs in self._group_features for f in fs]
        self.out_features = [f for fs in table_features for f in fs]
        self._table_columns = _table_columns(
            self.group_features, table_features, self.feature_dims
        ) if self.out_features != self.group_features else None
        self._perm_cache: dict[tuple[str, ...], list[int]] = {}
        # model.state_dict() holds the rows of in-memory tables (ps/state.py); terarec's
        # checkpoints turn this off (state.dense_state_only) and save the rows their way
        self.rows_in_state_dict = True
        self._sharded: Optional[ShardedLookup] = None
        if process_group is not None:
            self._sharded = ShardedLookup(
                self.groups, self.device, process_group, replica_group, prefetch_group
            )

    @property
    def sharded(self) -> Optional[ShardedLookup]:
        """The exchange of a sharded collection (None on a single rank)."""
        return self._sharded

    def _permutation(self, keys: list[str]) -> list[int]:
        key = tuple(keys)
        if key not in self._perm_cache:
            pos = {k: i for i, k in enumerate(keys)}
            missing = [f for f in self.group_features if f not in pos]
            extra = [k for k in keys if k not in self.feature_dims]
            if missing or extra:
                raise ValueError(
                    f"KJT features do not match the tables: missing {missing}, unknown {extra}"
                )
            self._perm_cache[key] = [pos[f] for f in self.group_features]
        return self._perm_cache[key]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pools each feature's keys.

        Args:
            features: KJT of int32 or int64 keys, ``B = features.stride()``; weighted
                (per-value weights scale the rows in sum pooling) or not; a variable
                batch per key (VBE) is expanded by its inverse indices, as TorchRec's
                ``EmbeddingBagCollection`` does.
        Returns:
            KeyedTensor with keys ``out_features`` (TorchRec's order: tables in config
            order, each table's features in order), values ``[B, sum of dims]``.
        """
        parts = self._group_parts(features)
        train = self.training and torch.is_grad_enabled()
        if self._sharded is not None:
            return self._keyed(self._forward_sharded(parts, train))
        return self._keyed(
            [
                self._pool_group(g, kjt, ft, train)
                for g, kjt, ft in zip(self.groups, parts, self._feature_table)
            ]
        )

    def prefetch(self, features: KeyedJaggedTensor) -> list[str]:
        """Makes the rows of the *next* batch resident in the device tier of every tiered
        table (a no-op for unbounded ones), e.g. on a background thread while the
        current batch trains (after its forward). Rows it shares with the current batch
        are not moved; keys without a row are left for the next forward to create, so
        what the tables hold does not change (see ``TableGroup.prefetch``).

        Returns:
            The names of the tables whose next batch did not fit in the device tier
            beside the current one: nothing of theirs moved, the next forward makes
            their rows resident itself.
        """
        parts = self._group_parts(features)
        if self._sharded is not None:
            return self._prefetch_sharded(parts)
        skipped: list[str] = []
        for g, kjt, ft in zip(self.groups, parts, self._feature_table):
            if g.tiered:
                dedup, _ = self._dedup_group(g, kjt, ft)
                if not g.prefetch(dedup.keys, dedup.tables):
                    skipped += g.names
        return skipped

    def _group_parts(self, features: KeyedJaggedTensor) -> list[KeyedJaggedTensor]:
        """One KJT per table group (its features, in the group's order); a VBE KJT is
        first expanded to one bag per sample and key, as TorchRec pools it."""
        if features.variable_stride_per_key():
            features = expand_variable_batch(features)
        keys = features.keys()
        perm = self._permutation(keys)
        if perm != list(range(len(keys))):
            features = permute_features(features, perm)
        return features.split([len(fs) for fs in self._group_features])

    def _dedup_group(
        self, group: TableGroup, kjt: KeyedJaggedTensor, feature_table: torch.Tensor
    ) -> tuple[Dedup, torch.Tensor]:
        """The group's unique (table, key) pairs and the bag offsets ``[F*B + 1]``."""
        batch = kjt.stride()
        values = kjt.values().to(self.device, torch.int64)
        offsets = kjt_offsets(kjt).to(self.device)
        if group.num_tables == 1 or values.numel() == 0:
            return dedup(values), offsets
        bounds = offsets[::batch]  # value offset of each feature: [F + 1]
        tables = torch.repeat_interleave(
            feature_table.to(self.device), bounds[1:] - bounds[:-1], output_size=values.numel()
        )
        return dedup(group.composite(values, tables), tables), offsets

    # -- sharded tables (ps/shard/sharded.py) ---------------------------------------------
    def _forward_sharded(self, parts: list[KeyedJaggedTensor], train: bool) -> list[torch.Tensor]:
        """Pooled ``[B, F_g * D_g]`` per group; the rows come from their owners."""
        assert self._sharded is not None
        dedups = [
            self._dedup_group(g, kjt, ft)
            for g, kjt, ft in zip(self.groups, parts, self._feature_table)
        ]
        counts = [
            d.key_offsets[1:] - d.key_offsets[:-1] if g.admission is not None else None
            for g, (d, _) in zip(self.groups, dedups)
        ]
        weights = self._sharded.lookup(
            [d.keys for d, _ in dedups],
            [d.tables for d, _ in dedups],
            counts,
            train,
            sync_replicas=self.sync_replicas,
        )
        out = []
        for g, kjt, w, (d, offsets) in zip(self.groups, parts, weights, dedups):
            batch, n_feat = kjt.stride(), len(kjt.keys())
            mean = g.cfgs[0].pooling == Pooling.MEAN
            vw = self._value_weights(g, kjt, mean)
            out.append(Pool.apply(w, d, offsets, mean, n_feat, batch, vw))  # [B, F*D]
        return out

    def _prefetch_sharded(self, parts: list[KeyedJaggedTensor]) -> list[str]:
        """:meth:`prefetch` of a sharded collection: the tiered groups' pairs go to their
        owners over the prefetch group (nothing happens without one)."""
        assert self._sharded is not None
        which = [i for i, g in enumerate(self.groups) if g.tiered]
        if self._sharded.prefetcher is None or not which:
            return []
        dedups = [
            self._dedup_group(self.groups[i], parts[i], self._feature_table[i])[0]
            for i in which
        ]
        fitted = self._sharded.prefetch(
            which, [d.keys for d in dedups], [d.tables for d in dedups]
        )
        return [n for i, ok in zip(which, fitted) if not ok for n in self.groups[i].names]

    def _keyed(self, pooled: list[torch.Tensor]) -> KeyedTensor:
        lengths = [self.feature_dims[f] for f in self.out_features]
        values = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
        if self._table_columns is not None:  # groups interleave the tables: one copy
            values = torch.cat([values[:, a:b] for a, b in self._table_columns], dim=1)
        return KeyedTensor(keys=self.out_features, length_per_key=lengths, values=values)

    def _pool_group(
        self, group: TableGroup, kjt: KeyedJaggedTensor, feature_table: torch.Tensor, train: bool
    ) -> torch.Tensor:
        batch = kjt.stride()
        n_feat = len(kjt.keys())
        dedup, offsets = self._dedup_group(group, kjt, feature_table)
        if train:
            counts = None
            if group.admission is not None:  # occurrences per pair: the sketch's input
                counts = dedup.key_offsets[1:] - dedup.key_offsets[:-1]
            slots = group.slots_for(dedup.keys, dedup.tables, counts=counts)
            if group.fused:  # the optimizer reads the rows in place: gather the weights
                rows = None
                weights = group.read(slots, group.dim).requires_grad_(True)
            else:  # zeros where admission left a pair out (slot -1)
                rows = group.read(slots)
                weights = rows[:, : group.dim].contiguous().requires_grad_(True)
            weights.register_hook(_RowUpdate(group, slots, rows))
            group.record_touched(dedup.keys, dedup.tables, slots, rows)  # k-step merging
        else:
            rows, _ = group.lookup_rows(dedup.keys, dedup.tables)
            weights = rows[:, : group.dim].contiguous()
        mean = group.cfgs[0].pooling == Pooling.MEAN
        vw = self._value_weights(group, kjt, mean)
        return Pool.apply(weights, dedup, offsets, mean, n_feat, batch, vw)  # [B, F*D]

    def _value_weights(
        self, group: TableGroup, kjt: KeyedJaggedTensor, mean: bool
    ) -> Optional[torch.Tensor]:
        """A weighted KJT's per-value weights ``[N]`` (float32 on the device), or None.
        Weights scale each value's row in sum pooling, as in TorchRec's weighted
        ``EmbeddingBagCollection``; mean pooling has no weighted form (an error)."""
        w = kjt.weights_or_none()
        if w is None:
            return None
        if mean:
            raise ValueError(
                f"tables {group.names}: a weighted KJT (per-value weights) needs sum "
                "pooling; these tables pool by mean")
        return w.to(self.device, torch.float32)

    # -- state ---------------------------------------------------------------------
    def num_rows(self) -> dict[str, int]:
        counts = {g: g.rows_per_table() for g in self.groups}
        return {t.name: counts[t.group][t.index] for t in self.tables}

    def table_stats(self) -> dict[str, dict[str, float]]:
        """Tier counters per group (keyed by its tables' names joined with ``+``)."""
        return {"+".join(g.names): g.stats() for g in self.groups}

    def flush(self) -> None:
        """Makes every row durable in every tier (checkpoints)."""
        for g in self.groups:
            g.flush()

    def persist(self) -> list[str]:
        """Every table with an SSD tier: its SSD tier holds the freshest copy of each row
        (cached copies written through), flushed; a snapshot of the SSD store is then a
        checkpoint of those tables (see ``SSDStore.checkpoint``). Returns the tables
        whose cached rows (the recently trained ones) hold NaN/Inf."""
        return [name for g in self.groups for name in g.persist()]

    def ssd_cached_rows(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per table with an SSD tier, the copies its caches hold above it (what
        :meth:`persist` would write through): ``(keys [C], rows [C, row_width], meta
        [C, 2])`` on the CPU, where a key may repeat and its last copy is the freshest."""
        out = {}
        for g in self.groups:
            for name, parts in g.cached_rows().items():
                parts = parts or [(torch.empty(0, dtype=torch.int64), torch.empty(
                    0, g.row_width), torch.empty(0, 2, dtype=torch.int64))]
                out[name] = tuple(torch.cat([p[i].cpu() for p in parts]) for i in range(3))
        return {t.name: out[t.name] for t in self.tables if t.in_ssd}  # type: ignore[misc]

    def track_changes(self, on: bool = True) -> None:
        """Starts (or stops) recording the pairs changed since the last checkpoint, for
        delta checkpoints (``TableGroup.track_changes``)."""
        for g in self.groups:
            g.track_changes(on)

    def changed_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per table, what changed since the last :meth:`clear_changes`: ``keys`` int64
        ``[C]`` ascending, their ``rows`` ``[C, dim + state]`` and ``last`` int64 ``[C]``
        (each row's last training step), and ``deleted`` int64 ``[D]``, keys without a
        row now (this rank's pairs when sharded)."""
        per_group = {g: g.changed_tables() for g in self.groups}
        out = {}
        for t in self.tables:
            keys, rows, deleted, last = per_group[t.group][t.index]
            out[t.name] = {"keys": keys, "rows": rows, "deleted": deleted, "last": last}
        return out

    def clear_changes(self) -> None:
        """Forgets the changes recorded: a checkpoint holding them is in place."""
        for g in self.groups:
            if g.changes is not None:
                g.changes.clear()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.rows_in_state_dict:
            for k, v in table_entries(self.tables).items():
                destination[prefix + k] = v

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        mine = prefix + PREFIX
        rest = {k: v for k, v in state_dict.items() if not k.startswith(mine)}
        if self.rows_in_state_dict:
            entries = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(mine)}
            try:
                check_tables(self.tables)
                state = tables_state(entries, self.tables, missing_keys, prefix)
                if len(state) == len(self.tables):
                    self.load_tables_state_dict(state)
            except (ValueError, RowsNotInStateDict) as e:
                error_msgs.append(str(e))
        else:
            unexpected_keys += [k for k in state_dict if k.startswith(mine)]
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def tables_state_dict(self, ssd_rows: bool = True) -> dict[str, Any]:
        """Every table's state (``EmbeddingTable.state_dict``); without ``ssd_rows`` the
        tables with an SSD tier leave their rows out (a snapshot of the store holds them,
        after :meth:`persist`)."""
        return {t.name: t.state_dict(rows=ssd_rows or not t.in_ssd) for t in self.tables}

    def owned(self, name: str, keys: torch.Tensor) -> torch.Tensor:
        """bool ``[N]`` on ``keys``' device: which of table ``name``'s int64 ``keys [N]``
        this rank owns (all of them unsharded; a resharded resume keeps these)."""
        if self._sharded is None:
            return torch.ones(keys.shape, dtype=torch.bool, device=keys.device)
        table = next(t for t in self.tables if t.name == name)
        k = keys.to(self.device, torch.int64)
        comp = table.group.composite(k, torch.full_like(k, table.index))
        return self._sharded.owned(comp).to(keys.device)

    def _owned_rows(
        self, table: EmbeddingTable, state: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A table's saved ``(keys, rows)``; sharded: only the pairs this rank owns (so
        any rank count can load a checkpoint holding every row, e.g. the shards of all
        ranks concatenated)."""
        keys, rows = state["keys"], state["rows"]
        if self._sharded is None:
            return keys, rows
        mine = self.owned(table.name, keys.to(self.device)).nonzero().squeeze(1)
        return keys.to(self.device, torch.int64)[mine], rows.to(self.device)[mine]

    def load_tables_state_dict(self, state: dict[str, Any]) -> None:
        """Loads every table's rows (see :meth:`_owned_rows` for sharded tables); a table
        saved with ``ssd: True`` takes its rows from its SSD tier as it is now (the
        caller restored the store's snapshot first)."""
        missing = [t.name for t in self.tables if t.name not in state]
        if missing:
            raise ValueError(f"checkpoint has no rows for tables {missing}")
        for t in self.tables:
            t.check_state(state[t.name])
        for g in self.groups:
            mine = [t for t in self.tables if t.group is g]
            # the saved clock (older checkpoints: none, the count restarts)
            g.step = int(state[mine[0].name].get("group_step", g.step))
            g.load_tables([
                None if state[t.name].get("ssd") else self._owned_rows(t, state[t.name])
                for t in mine
            ])
            g.optimizer.load_state_dict(state[mine[0].name]["optimizer"])
            if g.admission is not None:  # saved without admission: counting starts now
                g.admission.load_state_dict(state[mine[0].name].get("admission") or {})


def _table_columns(group_features: list[str], table_features: list[list[str]],
                   dims: dict[str, int]) -> list[tuple[int, int]]:
    """Each table's columns ``[a, b)`` in the groups' pooled output (its features are
    adjacent there), tables in config order."""
    start, at = {}, 0
    for f in group_features:
        start[f] = at
        at += dims[f]
    return [(start[fs[0]], start[fs[0]] + sum(dims[f] for f in fs))
            for fs in table_features if fs]


class _RowUpdate:
    """Backward hook: applies the fused row optimizer to the rows a forward gathered.

    The rows gathered in forward are reused unless the table was updated in between
    (e.g. two forwards before one backward); then they are read again.
    """

    def __init__(
        self, table: TableGroup, slots: torch.Tensor, rows: Optional[torch.Tensor]
    ) -> None:
        self.table = table
        self.slots = slots
        self.rows = rows
        self.version = table.version

    def __call__(self, grad: torch.Tensor) -> None:
        rows = self.rows if self.table.version == self.version else None
        self.table.apply_gradients(self.slots, grad, rows)
        self.rows = None
        return None

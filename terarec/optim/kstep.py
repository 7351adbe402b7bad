"""k-step model merging across nodes (the ``sync:`` config; docs/kstep.md).

Inside a fast group (one node) ranks sync every step. Across fast groups each replica
trains locally with its own optimizers for ``k`` steps, then the replicas merge over
the cross group (the same local rank of every node). With ``R`` replicas, at a merge::

    dense  params:          w <- mean_r w_r
           params+moments:  w, m, v <- mean_r (w_r, m_r, v_r)     (the optimizer's state)
           diloco:          g = w_anchor - mean_r w_r             (outer "gradient")
                            b <- mu b + g;  w_anchor <- w_anchor - lr (g + mu b)
                            w <- w_anchor                         (SGD-Nesterov outer step)
           dense_dtype bf16 (params, diloco): mean_r w_r = w_anchor + mean_r c_r, each
                            replica's change c_r = w_r - w_anchor sent as bfloat16, its
                            rounding error added to its next change (error feedback)
    sparse delta:           for every pair touched on any replica since the last merge
                            row <- snap + (1/R) sum_r [r touched it] (row_r - snap)
           delta+m:         the same over the weights and Adam's first moment
           delta+moments:   the same over the whole row (weights + optimizer state)

``snap`` is the row at the last merge, the same on every replica: a replica that
touched the row kept it (``TouchedRows`` in ps/), the others still hold it (or, never
having had the row, create it with the deterministic initializer). So only the touched
rows' deltas travel (``all_gather`` of counts, then of one padded message per replica:
a bitmap over the keys the last merge wrote, their deltas, then the other keys with
theirs; the deltas encoded as ``sync.sparse_dtype`` says: ``optim/row_codec.py``; the
message layout is at the end of this file), and every replica computes the same merged
row, bit for bit (the same decoded messages, one summation order).

``k = 1`` is fully synchronous training and merges nothing: the dense gradients are
averaged over the cross group before every optimizer step and the embedding collection
combines the rows' gradients over its replica group (``sync_replicas``). A warm-up
(``warmup_steps``) runs the first steps that way too (post-local SGD), then turns the
every-step sync off and starts tracking touched rows.

Communication is counted as the bytes one replica sends under ring collectives:
``all_reduce`` of ``n`` bytes sends ``2 (R - 1) / R * n``, ``all_gather`` of ``m`` bytes
per rank sends ``(R - 1) * m`` (the padding included).

The merger is a ``ReplicaSync`` (``trainer/sync.py``): the training loop calls
:meth:`KStepMerger.before_optimizer_step` after backward and
:meth:`KStepMerger.after_optimizer_step` after the dense optimizer step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn

from terarec.config import DenseMerge, SparseMerge, SyncConfig, WireDtype
from terarec.optim.row_codec import RowCodec, bytes_as


class RowGroup(Protocol):
    """What a table group offers the merger (``terarec.ps.group.TableGroup``)."""

    dim: int
    row_width: int
    num_tables: int
    touched: Any  # ``TouchedRows`` or None

    def track_touched(self, on: bool) -> None: ...

    def lookup_rows(
        self, comp: torch.Tensor, tables: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def new_rows(self, keys: torch.Tensor, tables: torch.Tensor) -> torch.Tensor: ...

    def keys_of(self, comp: torch.Tensor, tables: torch.Tensor) -> torch.Tensor: ...

    def overwrite_rows(
        self, comp: torch.Tensor, tables: torch.Tensor, rows: torch.Tensor
    ) -> None: ...


class CommCounter:
    """Bytes one replica sends over the cross group (ring model, see the module)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.dense = 0  # dense merges (or, k = 1, the dense gradient all-reduces)
        self.sparse = 0  # row merges

    @property
    def total(self) -> int:
        return self.dense + self.sparse

    def all_reduce(self, nbytes: int) -> int:
        return (2 * (self.size - 1) * nbytes) // self.size

    def all_gather(self, nbytes_per_rank: int) -> int:
        return (self.size - 1) * nbytes_per_rank


class KStepMerger:
    """Keeps ``R`` replicas in step: every step (k = 1, warm-up) or every ``k`` steps.

    Args:
        cfg: the ``sync:`` section.
        params: the dense parameters (the model's, not a DDP wrapper's).
        optimizer: the dense optimizer (its state is merged with ``params+moments``).
        groups: the embedding collection's table groups (``HEBC.groups``).
        group: the cross group; ``size`` its number of ranks (replicas).
        embedding: the embedding collection, whose ``sync_replicas`` flag (row gradients
            combined over the cross group every step) the merger turns on and off; None
            when it has none.
        start_step: steps already trained (a resumed run).

    Example::

        merger = KStepMerger(cfg.sync, model.parameters(), opt, ebc.groups,
                             ctx.cross_group, len(ctx.cross_ranks), ebc)
        for step in range(1, steps + 1):
            loss.backward(); merger.before_optimizer_step(); opt.step()
            merger.after_optimizer_step(step)
        merger.finish()            # merges what the last steps trained
    """

    def __init__(
        self,
        cfg: SyncConfig,
        params: Iterable[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        groups: Sequence[RowGroup],
        group: Optional[dist.ProcessGroup],
        size: int,
        embedding: Optional[Any] = None,
        start_step: int = 0,
    ) -> None:
        self.cfg = cfg
        self.k = cfg.k
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = optimizer
        self.groups = list(groups)
        self.group = group
        self.size = size
        self.embedding = embedding
        self.step = start_step
        self.comm = CommCounter(size)
        self.merges = 0
        self.rows_merged = 0  # distinct rows written by merges (this replica)
        self.merge_s = 0.0  # wall time in merges
        self._merged_at = start_step  # the step of the last merge (or phase change)
        self._anchor: Optional[torch.Tensor] = None  # weights at the last merge (diloco,
        # and params with dense_dtype bf16: the merge sends the change since then)
        self._momentum: Optional[torch.Tensor] = None  # diloco: outer momentum buffer
        self._residual: Optional[torch.Tensor] = None  # bf16 dense: rounding carried over
        # per table group: the keys (and tables) the last merge wrote, sorted, the same on
        # every replica; a row message names a key among them by one bit of a bitmap
        self._prev: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if cfg.sparse == SparseMerge.DELTA_M:
            for g in self.groups:
                self._first_moment_width(g)  # an error now, not at the first merge
        self._set_phase(self.every_step(self.step + 1))

    # -- the ReplicaSync hook --------------------------------------------------------
    def every_step(self, step: int) -> bool:
        """Whether training step ``step`` (1-based) syncs its gradients (k = 1, warm-up)."""
        return self.k == 1 or step <= self.cfg.warmup_steps

    def before_optimizer_step(self) -> None:
        """k = 1 and warm-up: the dense gradients averaged over the cross group."""
        if self.size > 1 and self.every_step(self.step + 1):
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                self.comm.dense += self._all_reduce_mean(grads)

    def after_optimizer_step(self, step: int) -> None:
        """After the optimizer step of ``step``: the end of the warm-up starts local
        steps; every ``k``-th local step merges."""
        self.step = step
        if self.k == 1 or step < self.cfg.warmup_steps:
            return
        if step == self.cfg.warmup_steps:
            self._set_phase(every_step=False)
            self._merged_at = step
        elif (step - self.cfg.warmup_steps) % self.k == 0:
            self.merge()

    def finish(self) -> None:
        """Merges the steps trained since the last merge (call once training ends, so
        every replica evaluates and saves the same model); idempotent."""
        if self.k > 1 and self.step > max(self.cfg.warmup_steps, self._merged_at):
            self.merge()

    # -- merging ---------------------------------------------------------------------
    def merge(self) -> None:
        """Merges the replicas now (every rank of the cross group calls it)."""
        t0 = time.perf_counter()
        if self.size > 1:
            self._merge_dense()
            for gi, g in enumerate(self.groups):
                self._merge_rows(g, gi)
        else:  # one replica: nothing to combine, the tracking starts over
            self._prev = {}
            for g in self.groups:
                if g.touched is not None:
                    g.touched.clear()
        self.merges += 1
        self._merged_at = self.step
        self.merge_s += time.perf_counter() - t0

    def _merge_dense(self) -> None:
        mode = self.cfg.dense
        if mode == DenseMerge.PARAMS_MOMENTS:
            tensors = [p.data for p in self.params] + self._optimizer_state()
            self.comm.dense += self._all_reduce_mean(tensors)
            return
        if mode == DenseMerge.PARAMS and self.cfg.dense_dtype == WireDtype.FP32:
            self.comm.dense += self._all_reduce_mean([p.data for p in self.params])
            return
        # The change since the last merge, averaged: diloco's outer gradient, and with
        # dense_dtype bf16 the params merge (it travels rounded, the rounding error is
        # kept by the sender and added to its next change: error feedback).
        if self._anchor is None:  # _set_phase sets it when local steps start
            raise RuntimeError("k-step merge: no dense anchor (the weights at the last merge)")
        flat = torch.cat([p.data.reshape(-1) for p in self.params])
        change = flat.sub_(self._anchor)
        if self.cfg.dense_dtype == WireDtype.BF16:
            if self._residual is not None:
                change.add_(self._residual)
            wire = change.to(torch.bfloat16)
            self._residual = change - wire.to(torch.float32)
            dist.all_reduce(wire, group=self.group)
            self.comm.dense += self.comm.all_reduce(wire.numel() * wire.element_size())
            mean_change = wire.to(torch.float32).div_(self.size)
        else:
            self.comm.dense += self._all_reduce_mean([change])
            mean_change = change
        if mode == DenseMerge.PARAMS:
            self._anchor.add_(mean_change)
        else:  # diloco: an outer SGD-Nesterov step on the outer gradient -mean_change
            outer_grad = mean_change.neg_()
            mu = self.cfg.outer_momentum
            if self._momentum is None:
                self._momentum = outer_grad.clone()
            else:
                self._momentum.mul_(mu).add_(outer_grad)
            self._anchor.add_(outer_grad.add(self._momentum, alpha=mu), alpha=-self.cfg.outer_lr)
        _unflatten_into(self._anchor, [p.data for p in self.params])

    def _optimizer_state(self) -> list[torch.Tensor]:
        """The dense optimizer's per-parameter float state (Adam: exp_avg, exp_avg_sq),
        in parameter order; the step counters are equal on every replica already."""
        out = []
        for p in self.params:
            state = self.optimizer.state.get(p, {})
            for name in sorted(state):
                t = state[name]
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == p.shape:
                    out.append(t)
        return out

    def _merge_rows(self, g: RowGroup, gi: int = 0) -> None:
        """The sparse merge of table group ``g`` (``gi``: its index; see the module
        docstring, and the row message at the end of this file)."""
        if g.touched is None:
            raise RuntimeError("k-step merge: the table group is not tracking touched rows")
        comp, tables, snap = g.touched.take()
        dev = snap.device
        cols = self._merged_columns(g).to(dev)
        width = cols.numel()
        int8_cols = g.dim + (self._first_moment_width(g) if self._merges_m() else 0)
        codec = RowCodec(self.cfg.sparse_dtype, width, g.dim, int8_cols)
        multi = g.num_tables > 1
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        prev_comp, prev_tab = self._prev.get(gi, (empty, empty))
        # rows the last merge wrote first (in its key order: a bitmap names them), then
        # the others with their keys
        known, order = _split_known(comp, tables, prev_comp, prev_tab)
        comp, tables, snap = comp[order], tables[order], snap[order]
        cur, _ = g.lookup_rows(comp, tables)  # touched rows always exist
        delta = cur[:, cols].to(dev) - snap[:, cols]
        payload, n_known = _encode_rows(codec, delta, comp, tables, known, prev_comp, multi)
        counts = self._all_gather_counts([n_known, comp.numel() - max(n_known, 0)], dev)
        n_max = max(_message_bytes(codec, prev_comp.numel(), c, multi) for c in counts)
        padded = torch.zeros(n_max, dtype=torch.uint8, device=dev)
        padded[: payload.numel()] = payload
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded, group=self.group)
        self.comm.sparse += self.comm.all_gather(n_max + 16)  # the wire bytes
        msgs = [
            _decode_rows(codec, t, c, prev_comp, prev_tab, multi)
            for t, c in zip(gathered, counts)
        ]
        all_comp = torch.cat([m[0] for m in msgs])
        uniq, inv = torch.unique(all_comp, sorted=True, return_inverse=True)
        u_tables = torch.zeros(uniq.numel(), dtype=torch.int64, device=dev)
        if multi:
            all_tab = torch.cat([m[1] for m in msgs])
            u_tables[inv] = all_tab
            if bool((u_tables[inv] != all_tab).any()):
                raise ValueError(
                    "k-step merge: two tables of one group share a composite key across "
                    "replicas (put the tables in separate groups)"
                )
        # Sum of the decoded deltas per row, replica by replica in rank order: every
        # replica adds the same numbers in the same order (indices unique per replica).
        acc = torch.zeros(uniq.numel(), width, device=dev)
        touches = torch.zeros(uniq.numel(), device=dev)  # replicas that touched each row
        start = 0
        for _, _, d in msgs:
            n = d.shape[0]
            acc.index_add_(0, inv[start : start + n], d)
            touches.index_add_(0, inv[start : start + n], torch.ones(n, device=dev))
            start += n
        # The snapshot: this replica's where it touched the row, else its current row.
        base = torch.empty(uniq.numel(), g.row_width, device=dev)
        mine = torch.zeros(uniq.numel(), dtype=torch.bool, device=dev)
        pos = torch.searchsorted(uniq, comp)
        mine[pos] = True
        others = (~mine).nonzero().squeeze(1)
        if others.numel():
            rows, found = g.lookup_rows(uniq[others], u_tables[others])
            rows = rows.to(dev)
            absent = (~found.to(dev)).nonzero().squeeze(1)
            if absent.numel():  # never had the row: the initializer's (every replica's)
                at = others[absent]
                rows[absent] = g.new_rows(g.keys_of(uniq[at], u_tables[at]), u_tables[at])
            base[others] = rows
        merged = base.clone()
        merged[pos] = cur.to(dev)  # this replica's own state where it touched the row
        base[pos] = snap
        merged[:, cols] = base[:, cols] + self._mean_delta(acc, touches)
        g.overwrite_rows(uniq, u_tables, merged)
        self._prev[gi] = (uniq, u_tables)
        self.rows_merged += uniq.numel()

    def _merges_m(self) -> bool:
        return self.cfg.sparse == SparseMerge.DELTA_M

    def _first_moment_width(self, g: RowGroup) -> int:
        """Columns of the rows' first moment (after the weights) for ``delta+m``."""
        opt = getattr(g, "optimizer", None)
        width = int(getattr(opt, "first_moment_width", 0))
        if width <= 0:
            kind = getattr(getattr(opt, "cfg", None), "kind", "?")
            raise ValueError(
                f"sync.sparse: delta+m merges the rows' first moment, but the row optimizer "
                f"({getattr(kind, 'value', kind)}) has none: use the adam row optimizer, or "
                "sparse: delta | delta+moments"
            )
        return width

    def _merged_columns(self, g: RowGroup) -> torch.Tensor:
        """The row columns a merge combines: the weights (``delta``), the weights and
        the first moment (``delta+m``) or the whole row (``delta+moments``); the
        benchmark's diagnostics pick other sets."""
        if self.cfg.sparse == SparseMerge.DELTA:
            return torch.arange(g.dim)
        if self._merges_m():
            return torch.arange(g.dim + self._first_moment_width(g))
        return torch.arange(g.row_width)

    def _mean_delta(self, total: torch.Tensor, touches: torch.Tensor) -> torch.Tensor:
        """The merged change of each row: ``total [U, c]`` (the replicas' deltas summed)
        over all ``R`` replicas, those that did not touch a row contributing 0.
        ``touches [U]`` (how many replicas touched each row) is unused here; the
        benchmark's diagnostic divides by it instead (``--diagnose``)."""
        return total / self.size

    # -- helpers ---------------------------------------------------------------------
    def _set_phase(self, every_step: bool) -> None:
        """Every-step sync on (tracking off) or local steps (tracking on, anchor set)."""
        if self.embedding is not None and hasattr(self.embedding, "sync_replicas"):
            self.embedding.sync_replicas = every_step
        if self.k == 1:
            return
        for g in self.groups:
            g.track_touched(not every_step)
        if not every_step and self._uses_anchor():
            self._anchor = torch.cat([p.data.reshape(-1) for p in self.params]).clone()
            self._residual = None

    def _uses_anchor(self) -> bool:
        """Whether the dense merge sends the change since the last merge."""
        return self.cfg.dense == DenseMerge.DILOCO or self.cfg.dense_dtype != WireDtype.FP32

    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> int:
        """Averages ``tensors`` in place over the cross group; returns the bytes sent."""
        payloads = all_reduce_mean(tensors, self.group, self.size)
        return sum(self.comm.all_reduce(n) for n in payloads)

    def _all_gather_counts(self, n: list[int], device: torch.device) -> list[tuple[int, ...]]:
        mine = torch.tensor(n, dtype=torch.int64, device=device)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(out, mine, group=self.group)
        return [tuple(int(x) for x in t.tolist()) for t in out]

    def _exchange_bytes(self) -> int:
        """Bytes the embedding exchange sent to the replicas for the every-step sync
        (``ShardExchange.replica_bytes``; 0 without a sharded exchange)."""
        exchange = getattr(getattr(self.embedding, "sharded", None), "exchange", None)
        return int(getattr(exchange, "replica_bytes", 0))

    def stats(self) -> dict[str, float]:
        """Counters: ``merges``, ``bytes`` (= ``dense_bytes`` + ``sparse_bytes``, sent
        by this replica: merges, the dense gradient all-reduces of k = 1 and warm-up,
        and the exchange's every-step row sync), ``rows_merged``, ``merge_s``."""
        sparse = self.comm.sparse + self._exchange_bytes()
        return {
            "merges": float(self.merges),
            "bytes": float(self.comm.dense + sparse),
            "dense_bytes": float(self.comm.dense),
            "sparse_bytes": float(sparse),
            "rows_merged": float(self.rows_merged),
            "merge_s": self.merge_s,
        }

    def state_dict(self) -> dict[str, Any]:
        """The step, the counters, the dense anchor (diloco, bf16 dense: the weights at
        the last merge) and DiLoCo's momentum: the same on every replica. Taken at a merge
        (the trainer checkpoints on merges only): no touched rows are pending then."""
        return {
            "step": self.step,
            "dense_bytes": self.comm.dense,
            "sparse_bytes": self.comm.sparse + self._exchange_bytes(),
            "merges": self.merges,
            "rows_merged": self.rows_merged,
            "anchor": self._anchor,
            "momentum": self._momentum,
        }

    def local_state_dict(self) -> Optional[dict[str, Any]]:
        """This replica's own state at a checkpoint (with ``k > 1`` the replicas' dense
        optimizer states differ too: the checkpoint saves each rank's): the bf16 dense
        merge's rounding residual. None for ``k = 1`` (replicas identical)."""
        return None if self.k == 1 else {"residual": self._residual}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        self._residual = state.get("residual")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.comm.dense = int(state["dense_bytes"])
        self.comm.sparse = int(state["sparse_bytes"])
        self.merges = int(state["merges"])
        self.rows_merged = int(state["rows_merged"])
        self._merged_at = self.step  # checkpoints are taken at merges
        self._prev = {}  # every replica resumes from the same checkpoint: none known
        self._residual = None
        self._set_phase(self.every_step(self.step + 1))  # anchor: the loaded weights
        if state.get("anchor") is not None:  # (the same: checkpoints are taken at merges)
            self._anchor = state["anchor"]
        self._momentum = state.get("momentum")


def all_reduce_mean(
    tensors: list[torch.Tensor], group: dist.ProcessGroup, size: int
) -> list[int]:
    """Averages ``tensors`` in place over ``group`` (``size`` ranks): one flat all-reduce
    per dtype and device. Returns each all-reduce's payload in bytes."""
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    payloads = []
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        _unflatten_into(flat, bucket)
        payloads.append(flat.numel() * flat.element_size())
    return payloads


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copies consecutive pieces of ``flat`` into ``tensors`` (their shapes)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


# -- the row message -------------------------------------------------------------------
# One replica's message for a table group (one uint8 buffer, padded to the longest):
#   bitmap  ceil(P / 8) bytes: bit i set = this replica touched the i-th key the last
#           merge wrote (P of them, sorted; every replica knows them)
#   known   n_known x nbytes: those rows' encoded deltas, in the bitmap's order
#   new     n_new x (8 key [+ 4 table] + nbytes): the other rows, keys spelled out
# Hot rows are merged again and again, so most keys cost one bit instead of 8 bytes. A
# replica that touched fewer than P / 64 of them again names every key instead (no
# bitmap, n_known = NO_BITMAP): a message is never longer than the keys spelled out.

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)
NO_BITMAP = -1  # n_known of a message that names every key (no bitmap)


def _split_known(
    comp: torch.Tensor, tables: torch.Tensor, prev: torch.Tensor, prev_tables: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(known [N] bool, order [N])``: ``comp[order]`` holds the pairs found in the
    sorted ``prev`` (same key, same table) first, ascending, then the others in their
    order; ``known`` says which."""
    dev = comp.device
    if prev.numel() == 0 or comp.numel() == 0:
        return torch.zeros(comp.numel(), dtype=torch.bool, device=dev), torch.arange(
            comp.numel(), device=dev
        )
    pos = torch.searchsorted(prev, comp).clamp_(max=prev.numel() - 1)
    found = (prev[pos] == comp) & (prev_tables[pos] == tables)
    idx_known = found.nonzero().squeeze(1)
    idx_known = idx_known[torch.argsort(pos[idx_known])]
    order = torch.cat([idx_known, (~found).nonzero().squeeze(1)])
    return found[order], order


def _message_bytes(codec: RowCodec, n_prev: int, counts: tuple[int, ...], multi: bool) -> int:
    """Bytes of a message with ``counts = (n_known, n_new)`` rows (``n_known`` =
    ``NO_BITMAP``: every key spelled out, no bitmap)."""
    n_known, n_new = counts
    head = 0 if n_known == NO_BITMAP else (n_prev + 7) // 8 + n_known * codec.nbytes
    return head + n_new * (8 + 4 * multi + codec.nbytes)


def _encode_rows(
    codec: RowCodec,
    delta: torch.Tensor,
    comp: torch.Tensor,
    tables: torch.Tensor,
    known: torch.Tensor,
    prev: torch.Tensor,
    multi: bool,
) -> tuple[torch.Tensor, int]:
    """The message of ``delta [N, cols]`` for keys ``comp [N]`` (``tables [N]``) in the
    order of :func:`_split_known` (``known [N]`` first); returns it flat (uint8) and the
    number of known rows, or ``NO_BITMAP`` when naming them by key is shorter than the
    bitmap (few of the last merge's keys touched again)."""
    dev = delta.device
    n_known = int(known.sum())
    enc = codec.encode(delta)  # [N, nbytes]
    parts = []
    if 8 * n_known <= (prev.numel() + 7) // 8:  # keys are cheaper than the bitmap
        n_known = NO_BITMAP
    else:
        bits = torch.zeros((prev.numel() + 7) // 8 * 8, dtype=torch.bool, device=dev)
        bits[torch.searchsorted(prev, comp[:n_known])] = True
        w = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=dev)
        parts.append((bits.view(-1, 8).to(torch.uint8) * w).sum(1, dtype=torch.uint8))
        parts.append(enc[:n_known].reshape(-1))
    start = max(n_known, 0)
    new = [comp[start:].contiguous().view(torch.uint8).view(-1, 8)]
    if multi:
        new.append(tables[start:].to(torch.int32).contiguous().view(torch.uint8).view(-1, 4))
    new.append(enc[start:])
    parts.append(torch.cat(new, dim=1).reshape(-1))
    return torch.cat(parts), n_known


def _decode_rows(
    codec: RowCodec,
    buf: torch.Tensor,
    counts: tuple[int, ...],
    prev: torch.Tensor,
    prev_tables: torch.Tensor,
    multi: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One replica's message ``buf`` (uint8, padded) with ``counts = (n_known, n_new)``
    -> ``(keys [n], tables [n], decoded deltas [n, cols])``."""
    n_known, n_new = counts
    nb, at = codec.nbytes, (prev.numel() + 7) // 8
    if n_known == NO_BITMAP:
        n_known, at = 0, 0
        idx = torch.empty(0, dtype=torch.int64, device=buf.device)
    elif prev.numel():
        w = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=buf.device)
        bits = (buf[:at].unsqueeze(1) & w).ne(0).reshape(-1)[: prev.numel()]
        idx = bits.nonzero().squeeze(1)
    else:
        idx = torch.empty(0, dtype=torch.int64, device=buf.device)
    if idx.numel() != n_known:
        raise RuntimeError(
            f"k-step merge: a row message names {idx.numel()} known keys, its count "
            f"says {n_known} (the replicas disagree on the last merge's keys)"
        )
    known = buf[at : at + n_known * nb].view(n_known, nb)
    at += n_known * nb
    kb = 8 + 4 * multi
    new = buf[at : at + n_new * (kb + nb)].view(n_new, kb + nb)
    keys = torch.cat([prev[idx], bytes_as(new[:, :8], torch.int64).view(-1)])
    if multi:
        new_tab = bytes_as(new[:, 8:12], torch.int32).view(-1).to(torch.int64)
        tables = torch.cat([prev_tables[idx], new_tab])
    else:
        tables = torch.zeros(keys.numel(), dtype=torch.int64, device=buf.device)
    deltas = codec.decode(torch.cat([known, new[:, kb:]]))
    return keys, tables, deltas

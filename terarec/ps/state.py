"""The rows of in-memory tables in ``model.state_dict()``, as a TorchRec user expects.

``HierarchicalEmbeddingBagCollection`` owns no ``nn.Parameter`` (its rows live in tiers
and are updated by the fused row optimizer), so ``torch.save(model.state_dict())`` used
to drop every row without a word. Now each table adds (under the module's prefix)::

    tables.<name>.keys            int64 [R]         the table's keys
    tables.<name>.rows            float32 [R, W]    their rows: weights [:, :dim], then
                                                    the row optimizer's state
    tables.<name>.optimizer_step  int64 []          the row optimizer's step counter
    tables.<name>.group_step      int64 []          (first table of a group) its clock

and ``load_state_dict`` puts them back (every row replaced). A table with budgets
(``device_rows`` / ``host_rows``: its rows may be terabytes, partly on SSD) or with
admission (a count-min sketch) is not put in a state dict: asking for one raises an
error naming ``tables_state_dict()`` and terarec's checkpoints, which save them at any
size. :func:`to_torchrec` / :func:`from_torchrec` and :func:`to_tbe` / :func:`from_tbe`
convert the rows to and from a TorchRec ``EmbeddingBagCollection`` state dict and an
FBGEMM table-batched embedding's weights, with the key vocabulary terarec produces. terarec's own
checkpoints, DDP and the k-step merge keep the dense state apart from the rows
(:func:`dense_state_only`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

PREFIX = "tables."


class RowsNotInStateDict(RuntimeError):
    """A table whose rows a state dict cannot hold (names the table and what to use)."""


def check_tables(tables: list[Any]) -> None:
    """Raises :class:`RowsNotInStateDict` for a tiered table of ``tables`` or one with
    admission."""
    for t in tables:
        if t.group.tiered or t.group.admission is not None:
            why = ("tiered (device/host budgets, maybe SSD)" if t.group.tiered
                   else "counted by admission")
            raise RowsNotInStateDict(
                f"table {t.name} is {why}: its rows are not put in model.state_dict(); "
                "save them with the collection's tables_state_dict() / "
                "load_tables_state_dict() (every tier's rows and optimizer state), or "
                "terarec's checkpoints (terarec train writes them), and use "
                "state_dict() inside terarec.ps.state.dense_state_only(model) for the "
                "dense weights alone")


def table_entries(tables: list[Any]) -> dict[str, torch.Tensor]:
    """The state-dict entries (without the module prefix) of ``tables``
    (``EmbeddingTable``); see :func:`check_tables` for the tables that raise."""
    check_tables(tables)
    out: dict[str, torch.Tensor] = {}
    for t in tables:
        state = t.state_dict()
        out[f"{PREFIX}{t.name}.keys"] = state["keys"]
        out[f"{PREFIX}{t.name}.rows"] = state["rows"]
        out[f"{PREFIX}{t.name}.optimizer_step"] = torch.tensor(state["optimizer"]["step"])
        if "group_step" in state:
            out[f"{PREFIX}{t.name}.group_step"] = torch.tensor(state["group_step"])
    return out


def tables_state(entries: dict[str, Any], tables: list[Any], missing: list[str],
                 prefix: str) -> dict[str, Any]:
    """``entries`` (state-dict keys without ``prefix``) back to the per-table states
    ``load_tables_state_dict`` takes; absent required keys are appended to ``missing``."""
    state: dict[str, Any] = {}
    for t in tables:
        base = f"{PREFIX}{t.name}."
        need = [base + k for k in ("keys", "rows", "optimizer_step")]
        absent = [k for k in need if k not in entries]
        if absent:
            missing += [prefix + k for k in absent]
            continue
        s: dict[str, Any] = {
            "keys": entries[base + "keys"], "rows": entries[base + "rows"],
            "optimizer": {"step": int(entries[base + "optimizer_step"])},
        }
        if base + "group_step" in entries:
            s["group_step"] = int(entries[base + "group_step"])
        state[t.name] = s
    return state


@contextlib.contextmanager
def dense_state_only(model: nn.Module) -> Iterator[nn.Module]:
    """Within it, ``model.state_dict()`` / ``load_state_dict`` leave the embedding rows
    out (every terarec embedding collection in ``model``): the dense weights alone, as
    terarec's checkpoints keep them beside the tables they save their own way."""
    mods = [m for m in model.modules() if hasattr(m, "rows_in_state_dict")]
    before = [m.rows_in_state_dict for m in mods]
    for m in mods:
        m.rows_in_state_dict = False
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.rows_in_state_dict = b


def to_torchrec(ebc: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A TorchRec ``EmbeddingBagCollection`` state dict of ``ebc``'s in-memory tables and
    the vocabulary behind it.

    Returns:
        ``(state, vocab)``: ``state["embedding_bags.<t>.weight"]`` ``[R_t, dim_t]`` and
        ``vocab[t]`` int64 ``[R_t]`` ascending: row ``i`` is key ``vocab[t][i]`` (a
        TorchRec table has ids ``0 .. R_t - 1``; map a key to its id with
        ``torch.searchsorted(vocab[t], key)``). The row optimizer's state is not part of
        it (TorchRec keeps it in its optimizer).
    """
    check_tables(ebc.tables)
    state, vocab = {}, {}
    for t in ebc.tables:
        keys, rows = t.export()
        order = torch.argsort(keys)
        vocab[t.name] = keys[order].cpu()
        state[f"embedding_bags.{t.name}.weight"] = rows[order, : t.dim].cpu()
    return state, vocab


def from_torchrec(ebc: nn.Module, state: dict[str, torch.Tensor],
                  vocab: dict[str, torch.Tensor]) -> None:
    """Writes a TorchRec ``EmbeddingBagCollection`` state dict into ``ebc``'s tables:
    key ``vocab[t][i]`` gets row ``i`` of ``embedding_bags.<t>.weight`` (fresh optimizer
    state); tables missing from ``state`` are left as they are.

    Raises:
        ValueError: a weight whose dim or row count does not fit the table / vocabulary.
    """
    for t in ebc.tables:
        w = state.get(f"embedding_bags.{t.name}.weight")
        if w is None:
            continue
        keys = vocab[t.name]
        if w.dim() != 2 or w.shape[1] != t.dim or w.shape[0] != keys.numel():
            raise ValueError(f"table {t.name}: weight {tuple(w.shape)} does not fit dim "
                             f"{t.dim} and a vocabulary of {keys.numel()} keys")
        dev = t.group.device
        extra = torch.zeros(keys.numel(), t.row_width - t.dim, device=dev)
        t.insert_rows(keys.to(dev, torch.int64), torch.cat([w.detach().to(dev).float(), extra], 1))


def to_tbe(ebc: nn.Module, tables: Sequence[str]
           ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The rows of ``ebc``'s in-memory tables as FBGEMM's table-batched embedding
    (``SplitTableBatchedEmbeddingBagsCodegen``) holds them: one ``[R_t, dim_t]`` weight
    per entry of ``tables`` (the TBE's table order: copy weight ``i`` into
    ``tbe.split_embedding_weights()[i]``), and the vocabulary as :func:`to_torchrec`'s."""
    state, vocab = to_torchrec(ebc)
    unknown = [t for t in tables if f"embedding_bags.{t}.weight" not in state]
    if unknown:
        raise ValueError(f"tables {unknown} are not tables of the collection "
                         f"(it has {sorted(vocab)})")
    return [state[f"embedding_bags.{t}.weight"] for t in tables], vocab


def from_tbe(ebc: nn.Module, weights: Sequence[torch.Tensor], tables: Sequence[str],
             vocab: dict[str, torch.Tensor]) -> None:
    """Writes FBGEMM TBE weights (``tbe.split_embedding_weights()``, table ``tables[i]``
    in entry ``i``) into ``ebc``'s tables through ``vocab`` (see :func:`from_torchrec`)."""
    if len(weights) != len(tables):
        raise ValueError(f"{len(weights)} weights for {len(tables)} table names")
    from_torchrec(ebc, {f"embedding_bags.{t}.weight": w for t, w in zip(tables, weights)},
                  vocab)

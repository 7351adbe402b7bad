"""Data positions carried to another rank layout (``terarec.data.reshard``).

Old ranks each take some batches and save their positions; the ranks of a new layout
continue from ``reshard_state`` to the end of the pass. What the old ranks trained plus
what the new ranks read must be every train row: exactly once where the rule is exact
(text rows strided by rank, no shuffling), else with the replay the rule states.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from terarec.config import DataConfig, DataKind, SyntheticConfig
from terarec.data import DataError, build_source
from tests.data.test_data_source import cfg_for, ids


def _split_run(cfg: DataConfig, old: int, new: int, batches: int) -> tuple[list[int], list[int]]:
    """(rows the ``old`` ranks trained in ``batches`` batches each, rows the ``new``
    ranks read from the resharded positions to the end of the pass)."""
    trained, states = [], []
    for r in range(old):
        src = build_source(cfg, "train", seed=4, rank=r, world_size=old, epochs=1)
        it = iter(src)
        trained += ids(next(it) for _ in range(batches))
        states.append(src.state_dict())
    rest = []
    for r in range(new):
        src = build_source(cfg, "train", seed=4, rank=r, world_size=new, epochs=1)
        src.load_state_dict(src.reshard_state(states))
        rest += ids(src)
    return trained, rest


def _train_rows(cfg: DataConfig) -> list[int]:
    return ids(build_source(cfg, "train", seed=4, epochs=1))


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (2, 4), (3, 2), (4, 4)])
def test_unshuffled_rows_strided_by_rank_continue_exactly(
    tmp_path: Path, write_criteo, old: int, new: int
) -> None:
    f = write_criteo("one.tsv", range(1000))
    cfg = cfg_for([f], batch_size=8, chunk_rows=16)
    trained, rest = _split_run(cfg, old, new, batches=9)
    assert len(trained) == old * 9 * 8
    assert sorted(trained + rest) == list(range(1000))  # every row once


def test_with_an_eval_hold_out_no_row_is_lost_and_few_are_seen_twice(
    tmp_path: Path, write_criteo
) -> None:
    f = write_criteo("held.tsv", range(2000))
    cfg = cfg_for([f], batch_size=8, chunk_rows=32, eval_fraction=0.1)
    trained, rest = _split_run(cfg, 3, 2, batches=11)
    counts = Counter(trained + rest)
    assert sorted(counts) == sorted(_train_rows(cfg))  # no train row lost
    twice = sum(c - 1 for c in counts.values())
    # rows of a saved rank that ran ahead of the slowest one: a few per rank
    assert twice <= 3 * 8, twice


def test_shuffled_rows_restart_the_earliest_window(tmp_path: Path, write_criteo) -> None:
    f = write_criteo("mixed.tsv", range(1500))
    shuffle, chunk = 64, 16
    cfg = cfg_for([f], batch_size=8, chunk_rows=chunk, shuffle_buffer=shuffle)
    trained, rest = _split_run(cfg, 2, 3, batches=13)
    counts = Counter(trained + rest)
    assert sorted(counts) == list(range(1500))  # no row lost
    twice = sum(c - 1 for c in counts.values())
    # at most each saved rank's current window: >= shuffle rows, < shuffle + a chunk
    assert 0 < twice <= 2 * (shuffle + chunk), twice


def _reshard_twice(cfg: DataConfig, worlds: tuple[int, ...], batches: int
                   ) -> tuple[Counter, int]:
    """Every row read by layouts ``worlds`` in turn (each rank of each layout but the
    last takes ``batches`` batches; the last reads to the end of the pass), and the
    most rows any layout's change may read again: one window per saved rank."""
    seen: Counter = Counter()
    states: list[dict] = []
    for i, world in enumerate(worlds):
        new_states = []
        for r in range(world):
            src = build_source(cfg, "train", seed=4, rank=r, world_size=world, epochs=1)
            if states:
                src.load_state_dict(src.reshard_state(states))
            if i + 1 == len(worlds):
                seen.update(ids(src))
            else:
                it = iter(src)
                seen.update(ids(next(it) for _ in range(batches)))
                new_states.append(src.state_dict())
        states = new_states
    return seen, sum(worlds[:-1])


@pytest.mark.parametrize("shuffle", [0, 48])
@pytest.mark.parametrize("worlds", [(2, 1), (2, 3), (4, 2), (2, 3, 1), (3, 8)])
def test_files_split_between_ranks_skip_the_files_done(
    tmp_path: Path, write_criteo, worlds: tuple[int, ...], shuffle: int
) -> None:
    """Finished files are not read again; a half-read file continues from the window
    its reader was in (with two layout changes, the first one's plan carries over)."""
    files = [write_criteo(f"part{i}.tsv", range(i * 1000, i * 1000 + 300)) for i in range(4)]
    chunk = 16
    cfg = cfg_for(files, batch_size=8, chunk_rows=chunk, shuffle_buffer=shuffle)
    seen, windows = _reshard_twice(cfg, worlds, batches=3)
    assert sorted(seen) == sorted(_train_rows(cfg))  # no row lost
    twice = sum(c - 1 for c in seen.values())
    assert twice <= windows * (max(shuffle, 1) + chunk), twice
    assert twice < len(seen) // 2  # not a pass again


@pytest.mark.parametrize("shuffle", [0, 100])
@pytest.mark.parametrize("parts,worlds", [(4, (2, 1)), (4, (2, 4)), (1, (2, 3)), (3, (2, 3, 1))])
def test_preprocessed_chunks_done_are_not_read_again(
    tmp_path: Path, write_criteo, parts: int, worlds: tuple[int, ...], shuffle: int
) -> None:
    from terarec.config import DenseTransform
    from terarec.data.preprocess import preprocess

    files = [write_criteo(f"p{i}.tsv", range(i * 200, i * 200 + 150)) for i in range(parts)]
    text = DataConfig(kind=DataKind.CRITEO, path=[str(f) for f in files],
                      dense_transform=DenseTransform.NONE)
    preprocess(text, tmp_path / "out", chunk_rows=32, show_progress=False)
    cfg = DataConfig(kind=DataKind.COLUMNAR, path=[str(tmp_path / "out" / "train")],
                     batch_size=8, prefetch_batches=0, shuffle_buffer=shuffle)
    seen, windows = _reshard_twice(cfg, worlds, batches=4)
    assert sorted(seen) == sorted(_train_rows(cfg))  # no row lost
    twice = sum(c - 1 for c in seen.values())
    assert twice <= windows * (shuffle + 32), twice
    assert twice < len(seen) // 2


def test_synthetic_streams_continue_at_the_batch_count_reached() -> None:
    cfg = DataConfig(kind=DataKind.SYNTHETIC, batch_size=16, prefetch_batches=0,
                     synthetic=SyntheticConfig(vocab_size=1000, eval_samples=64))
    states = []
    for r in range(2):
        src = build_source(cfg, "train", seed=1, rank=r, world_size=2)
        it = iter(src)
        for _ in range(5):
            next(it)
        states.append(src.state_dict())
    for world in (1, 4):
        for r in range(world):
            src = build_source(cfg, "train", seed=1, rank=r, world_size=world)
            state = src.reshard_state(states)
            assert state["batch"] == 5 and state["world_size"] == world and state["rank"] == r
            src.load_state_dict(state)


def test_positions_of_another_kind_of_source_are_refused(tmp_path: Path, write_criteo) -> None:
    f = write_criteo("k.tsv", range(50))
    src = build_source(cfg_for([f]), "train", seed=0)
    with pytest.raises(DataError, match=r"\['synthetic'\] source cannot continue a file source"):
        src.reshard_state([{"kind": "synthetic", "batch": 3}])

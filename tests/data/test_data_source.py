"""BatchSource: files, sharding, splits, epochs, resume, prefetch, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from terarec.config import DataConfig, DataKind, LibfmConfig
from terarec.data import DataError, build_source


def cfg_for(paths: list[Path | str], **kw) -> DataConfig:
    kw.setdefault("batch_size", 8)
    kw.setdefault("eval_batch_size", 8)
    kw.setdefault("prefetch_batches", 0)
    return DataConfig(kind=DataKind.CRITEO, path=[str(p) for p in paths], **kw)


def ids(batches) -> list[int]:
    return [int(x) for b in batches for x in b.dense[:, 0].tolist()]


def test_paths_dir_glob_and_missing(tmp_path: Path, write_criteo) -> None:
    (tmp_path / "d").mkdir()
    write_criteo("d/b.tsv", range(10, 20))
    write_criteo("d/a.tsv", range(0, 10))
    write_criteo("c.tsv", range(20, 25))
    src = build_source(cfg_for([tmp_path / "d", str(tmp_path / "c*.tsv")]), "train", seed=0,
                       epochs=1)
    assert ids(src) == list(range(25))  # dir sorted, then glob
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataError, match=f"{missing}: no such file"):
        build_source(cfg_for([missing]), "train", seed=0)
    with pytest.raises(DataError, match="glob matches no files"):
        build_source(cfg_for([str(tmp_path / "*.parquet")]), "train", seed=0)


@pytest.mark.parametrize("n_files,world", [(4, 2), (5, 2), (1, 3), (2, 3)])
def test_sharding_disjoint_and_complete(tmp_path: Path, write_criteo, n_files, world) -> None:
    files = [write_criteo(f"f{i}.tsv", range(i * 100, i * 100 + 37)) for i in range(n_files)]
    seen = []
    for r in range(world):
        got = ids(build_source(cfg_for(files), "train", seed=0, rank=r, world_size=world,
                               epochs=1))
        assert got, f"rank {r} got no rows"
        seen += got
    assert sorted(seen) == sorted(i * 100 + j for i in range(n_files) for j in range(37))


def test_eval_fraction_split_disjoint_and_complete(tmp_path: Path, write_criteo) -> None:
    f = write_criteo("x.tsv", range(1000))
    cfg = cfg_for([f], eval_fraction=0.2)
    tr = ids(build_source(cfg, "train", seed=0, epochs=1))
    ev = ids(build_source(cfg, "eval", seed=0))
    assert not set(tr) & set(ev) and sorted(tr + ev) == list(range(1000))
    assert 150 < len(ev) < 250
    ev2 = ids(build_source(cfg_for([f], eval_fraction=0.2, chunk_rows=7), "eval", seed=5))
    assert ev2 == ev  # independent of chunking and seed
    with pytest.raises(DataError, match="no eval data"):
        build_source(cfg_for([f]), "eval", seed=0)
    g = write_criteo("y.tsv", range(5000, 5010))
    assert ids(build_source(cfg_for([f], eval_path=[str(g)]), "eval", seed=0)) == list(
        range(5000, 5010))


def test_epochs_endless_and_fractional(tmp_path: Path, write_criteo) -> None:
    f = write_criteo("e.tsv", range(20))
    two = ids(build_source(cfg_for([f]), "train", seed=0, epochs=2))
    assert two == list(range(20)) * 2
    half = ids(build_source(cfg_for([f]), "train", seed=0, epochs=1.5))
    assert half[:20] == list(range(20)) and 8 <= len(half) - 20 <= 12
    it = iter(build_source(cfg_for([f], batch_size=7), "train", seed=0))
    endless = ids([next(it) for _ in range(10)])
    assert endless == (list(range(20)) * 4)[:70]


def test_shuffle_buffer_is_a_seeded_permutation(tmp_path: Path, write_criteo) -> None:
    files = [write_criteo(f"s{i}.tsv", range(i * 50, i * 50 + 50)) for i in range(3)]
    cfg = cfg_for(files, shuffle_buffer=64, chunk_rows=16)
    a = ids(build_source(cfg, "train", seed=1, epochs=2))
    b = ids(build_source(cfg, "train", seed=1, epochs=2))
    c = ids(build_source(cfg, "train", seed=2, epochs=2))
    assert a == b and a != c
    assert sorted(a[:150]) == list(range(150)) and a[:150] != list(range(150))
    assert a[:150] != a[150:]  # a new order each pass


def _resume_check(make, n_first: int, n_total: int, as_tuple) -> None:
    ref = make()
    it = iter(ref)
    want = [as_tuple(next(it)) for _ in range(n_total)]
    ref.close()
    src = make()
    it = iter(src)
    got = [as_tuple(next(it)) for _ in range(n_first)]
    state = src.state_dict()
    src.close()
    fresh = make()
    fresh.load_state_dict(state)
    it = iter(fresh)
    got += [as_tuple(next(it)) for _ in range(n_total - n_first)]
    fresh.close()
    assert got == want


@pytest.mark.parametrize("shuffle", [0, 40])
def test_resume_criteo_exact(tmp_path: Path, write_criteo, as_tuple, shuffle) -> None:
    files = [write_criteo(f"r{i}.tsv", range(i * 100, i * 100 + 45)) for i in range(3)]

    def make():
        cfg = cfg_for(files, batch_size=11, chunk_rows=13, prefetch_batches=3,
                      shuffle_buffer=shuffle)
        return build_source(cfg, "train", seed=7)

    for n_first in (1, 4, 12, 13):  # inside a chunk, across files, across passes
        _resume_check(make, n_first, 30, as_tuple)


def test_resume_libfm_and_synthetic(tmp_path: Path, as_tuple) -> None:
    p = tmp_path / "l.libfm"
    p.write_text("".join(f"{(-1) ** i} {i}:1 {i + 1000}:1\n" for i in range(97)))

    def libfm():
        cfg = DataConfig(kind=DataKind.LIBFM, path=[str(p)], libfm=LibfmConfig(["a", "b"]),
                         batch_size=10, chunk_rows=17, prefetch_batches=2, eval_fraction=0.3)
        return build_source(cfg, "train", seed=0)

    _resume_check(libfm, 5, 25, as_tuple)

    def synth():
        return build_source(DataConfig(batch_size=32, prefetch_batches=4), "train", seed=0)

    _resume_check(synth, 3, 8, as_tuple)


def test_resume_eval_pass_and_end_state(tmp_path: Path, write_criteo, as_tuple) -> None:
    f = write_criteo("v.tsv", range(30))
    cfg = cfg_for([f], eval_path=[str(f)], eval_batch_size=8)
    src = build_source(cfg, "eval", seed=0)
    it = iter(src)
    next(it)
    fresh = build_source(cfg, "eval", seed=0)
    fresh.load_state_dict(src.state_dict())
    src.close()
    assert ids(fresh) == list(range(8, 30))
    assert list(fresh) == []  # at the end of the pass: nothing left
    other = build_source(cfg_for([f]), "train", seed=0)
    with pytest.raises(DataError, match="does not match"):
        other.load_state_dict(fresh.state_dict())


def test_prefetch_propagates_errors_and_stats(tmp_path: Path, write_criteo) -> None:
    f = write_criteo("p.tsv", range(40), {33: "oops"})
    src = build_source(cfg_for([f], strict=True, prefetch_batches=2, chunk_rows=10), "train",
                       seed=0, epochs=1)
    it = iter(src)
    got = [next(it) for _ in range(3)]  # rows 0..23 come from good chunks
    with pytest.raises(DataError, match=rf"{f}:34: wrong_column_count"):
        next(it)
    assert src.state_dict() == got[-1].position
    src.close()
    ok = build_source(cfg_for([f], prefetch_batches=2), "train", seed=0, epochs=1)
    n = sum(b.batch_size for b in ok)
    st = ok.stats()
    assert n == 40 and st["batches"] == 5 and st["rows_skipped"] == {"wrong_column_count": 1}
    assert st["rows_read"] == 41


def test_endless_with_no_rows_fails_clearly(tmp_path: Path) -> None:
    p = tmp_path / "bad.tsv"
    p.write_text("x\ny\n")
    src = build_source(cfg_for([p], prefetch_batches=1), "train", seed=0)
    with pytest.raises(DataError, match="gave no rows"):
        next(iter(src))

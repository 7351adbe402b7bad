"""The preprocessed columnar format: `terarec preprocess` and the `columnar` reader.

The reference is the text reader: without shuffling, the columnar reader must hand out
byte-identical batches (same rows, keys, dense values, order, batch cuts) to what the
text reader gives on the file the dataset was made from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from terarec.config import (
    CategoricalColumn,
    CsvSchema,
    DataConfig,
    DataKind,
    DenseTransform,
    LibfmConfig,
)
from terarec.data import DataError, build_source, dense_feature_names, sparse_feature_names
from terarec.data import preprocess as prep_mod
from terarec.data.columnar import open_dataset
from terarec.data.preprocess import preprocess


def criteo_cfg(paths: list[Path], **kw: Any) -> DataConfig:
    kw.setdefault("dense_transform", DenseTransform.LOG1P)
    return DataConfig(kind=DataKind.CRITEO, path=[str(p) for p in paths], **kw)


def columnar_cfg(out: Path, eval_dir: bool = False, **kw: Any) -> DataConfig:
    return DataConfig(kind=DataKind.COLUMNAR, path=[str(out / "train")],
                      eval_path=[str(out / "eval")] if eval_dir else None, **kw)


def batches(cfg: DataConfig, split: str = "train", **kw: Any) -> list:
    src = build_source(cfg, split, seed=3, **kw)
    try:
        return list(src)
    finally:
        src.close()


BAD = "1\tx\t" + "\t".join(["0"] * 11 + ["ab"] * 26)  # 39 columns


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_criteo_batches_equal_the_text_reader(tmp_path: Path, write_criteo, as_tuple,
                                              workers: int) -> None:
    files = [write_criteo("a.tsv", range(0, 700), extra={5: BAD, 300: ""}),
             write_criteo("b.tsv", range(700, 1000))]
    text = criteo_cfg(files, batch_size=96, chunk_rows=128)
    summary = preprocess(text, tmp_path / "out", chunk_rows=128, show_progress=False)
    assert summary["train"]["rows"] == 1000
    assert summary["train"]["bad_rows"] == {"wrong_column_count": 1, "empty_line": 1}
    col = columnar_cfg(tmp_path / "out", batch_size=96, read_workers=workers)
    want = [as_tuple(b) for b in batches(text, epochs=2)]
    got = [as_tuple(b) for b in batches(col, epochs=2)]
    assert got == want  # 2 passes of 1000 rows in batches of 96 across 8 chunks of <= 128
    assert sparse_feature_names(col) == sparse_feature_names(text)
    assert dense_feature_names(col) == dense_feature_names(text)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("prefetch", [0, 3])
def test_cuda_device_gets_batches_on_the_gpu(tmp_path: Path, write_criteo, as_tuple,
                                             prefetch: int) -> None:
    """With a CUDA device the source's background thread copies each batch there (on
    its own stream); the values are the host batches'. Without that thread
    (prefetch_batches 0) batches stay on the host."""
    files = [write_criteo("a.tsv", range(0, 500))]
    preprocess(criteo_cfg(files), tmp_path / "out", chunk_rows=128, show_progress=False)
    col = columnar_cfg(tmp_path / "out", batch_size=96, read_workers=2, prefetch_batches=prefetch)
    host = batches(col, epochs=1)
    dev = batches(col, epochs=1, device=torch.device("cuda"))
    assert all(b.labels.is_cuda == bool(prefetch) and b.dense.is_cuda == bool(prefetch)
               and b.sparse.values().is_cuda == bool(prefetch) for b in dev)
    assert [as_tuple(b.to(torch.device("cpu"))) for b in dev] == [as_tuple(b) for b in host]


def test_csv_multivalued_and_libfm_equal_the_text_reader(tmp_path: Path, as_tuple) -> None:
    csv = tmp_path / "d.csv"
    rows = ["click,price,site,tags"] + [
        f"{i % 2},{i * 0.5},s{i % 7},{'|'.join(f't{j}' for j in range(i % 4))}"
        for i in range(300)]
    csv.write_text("\n".join(rows) + "\n")
    schema = CsvSchema(label="click", dense=["price"], categorical=[
        CategoricalColumn("site"), CategoricalColumn("tags", "tag", "|")])
    libfm = tmp_path / "f.libfm"
    libfm.write_text("".join(f"{i % 2} {i}:1 {i % 13 + 100}:1 {i % 5 + 200}:1\n"
                             for i in range(250)))
    for k, (text, name) in enumerate([
        (DataConfig(kind=DataKind.CSV, path=[str(csv)], csv=schema, batch_size=37), "csv"),
        (DataConfig(kind=DataKind.LIBFM, path=[str(libfm)], batch_size=37), "libfm"),
    ]):
        out = tmp_path / f"out{k}"
        preprocess(text, out, chunk_rows=50, show_progress=False)
        assert open_dataset(out / "train").source_kind == name
        for shuffle in (0, 64):  # shuffled windows of multi-key rows: the ragged gather
            col = columnar_cfg(out, batch_size=37, read_workers=2, shuffle_buffer=shuffle)
            got = batches(col, epochs=1)
            want = batches(text, epochs=1)
            if shuffle == 0:
                assert [as_tuple(b) for b in got] == [as_tuple(b) for b in want]
            else:
                assert sorted(rows_of(got)) == sorted(rows_of(want))


def rows_of(bs: list) -> list[tuple]:
    """Every sample as (label, dense, keys of each feature) for multiset comparisons."""
    out = []
    for b in bs:
        kjt = b.sparse
        per_f = [kjt[k] for k in kjt.keys()]
        offs = [np.concatenate([[0], np.cumsum(j.lengths().numpy())]) for j in per_f]
        vals = [j.values().numpy() for j in per_f]
        for i in range(b.batch_size):
            keys = tuple(tuple(v[o[i]:o[i + 1]].tolist()) for v, o in zip(vals, offs))
            out.append((float(b.labels[i]), tuple(b.dense[i].tolist()), keys))
    return out


def test_eval_fraction_is_split_like_the_text_reader(tmp_path: Path, write_criteo,
                                                     as_tuple) -> None:
    f = write_criteo("a.tsv", range(600))
    text = criteo_cfg([f], eval_fraction=0.25, batch_size=50, eval_batch_size=64)
    summary = preprocess(text, tmp_path / "out", chunk_rows=100, show_progress=False)
    assert summary["train"]["rows"] + summary["eval"]["rows"] == 600
    col = columnar_cfg(tmp_path / "out", eval_dir=True, batch_size=50, eval_batch_size=64)
    for split in ("train", "eval"):
        kw = {"epochs": 1} if split == "train" else {}
        assert ([as_tuple(b) for b in batches(col, split, **kw)]
                == [as_tuple(b) for b in batches(text, split, **kw)])


@pytest.mark.parametrize("shuffle", [0, 200])
def test_resume_from_any_batch(tmp_path: Path, write_criteo, as_tuple, shuffle: int) -> None:
    files = [write_criteo("a.tsv", range(500))]
    preprocess(criteo_cfg(files), tmp_path / "out", chunk_rows=70, show_progress=False)
    col = columnar_cfg(tmp_path / "out", batch_size=45, shuffle_buffer=shuffle, read_workers=2)
    full = batches(col, epochs=2.5)
    for k in (0, 3, 11, len(full) - 2):
        src = build_source(col, "train", seed=3, epochs=2.5)
        src.load_state_dict(json.loads(json.dumps(full[k].position)))
        rest = list(src)
        src.close()
        assert [as_tuple(b) for b in rest] == [as_tuple(b) for b in full[k + 1:]], k
    n = sum(b.batch_size for b in full)
    assert n == 500 * 2 + 250  # the half pass: half of this rank's rows


def test_shuffle_is_a_seeded_permutation_of_each_pass(tmp_path: Path, write_criteo) -> None:
    files = [write_criteo("a.tsv", range(640))]
    preprocess(criteo_cfg(files), tmp_path / "out", chunk_rows=64, show_progress=False)
    plain = rows_of(batches(columnar_cfg(tmp_path / "out", batch_size=64), epochs=1))
    col = columnar_cfg(tmp_path / "out", batch_size=64, shuffle_buffer=150, read_workers=2)
    two = rows_of(batches(col, epochs=2))
    first, second = two[:640], two[640:]
    assert sorted(first) == sorted(plain) == sorted(second)  # each pass: every row once
    assert first != plain and first != second  # permuted, and differently per pass
    assert rows_of(batches(col, epochs=2)) == two  # deterministic
    col.read_workers = 0
    assert rows_of(batches(col, epochs=2)) == two  # independent of the thread count


@pytest.mark.parametrize("n_files,world", [(1, 2), (3, 2), (2, 3)])
def test_ranks_are_disjoint_and_complete(tmp_path: Path, write_criteo, n_files: int,
                                         world: int) -> None:
    files = [write_criteo(f"{i}.tsv", range(i * 300, (i + 1) * 300)) for i in range(n_files)]
    preprocess(criteo_cfg(files), tmp_path / "out", chunk_rows=64, show_progress=False)
    col = columnar_cfg(tmp_path / "out", batch_size=50)
    ids = [sorted(round(np.expm1(float(x))) for b in batches(col, rank=r, world_size=world,
                                                            epochs=1) for x in b.dense[:, 0])
           for r in range(world)]
    allids = sorted(i for r in ids for i in r)
    assert allids == list(range(300 * n_files))  # I1 is the row id (log1p applied)


def test_preprocess_resumes_after_an_interruption(tmp_path: Path, write_criteo,
                                                  monkeypatch) -> None:
    files = [write_criteo("a.tsv", range(900)), write_criteo("b.tsv", range(900, 1000))]
    cfg = criteo_cfg(files, eval_fraction=0.2)
    clean = preprocess(cfg, tmp_path / "clean", chunk_rows=100, show_progress=False)
    real = prep_mod.write_chunk
    calls = {"n": 0}

    def dying(f: Any, rows: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")
        return real(f, rows)

    monkeypatch.setattr(prep_mod, "write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        preprocess(cfg, tmp_path / "out", chunk_rows=100, show_progress=False)
    assert not (tmp_path / "out" / "train" / "meta.json").exists()  # not a dataset yet
    with pytest.raises(DataError, match="meta.json"):
        open_dataset(tmp_path / "out" / "train")
    monkeypatch.setattr(prep_mod, "write_chunk", real)
    again = preprocess(cfg, tmp_path / "out", chunk_rows=100, show_progress=False)
    assert {k: v["rows"] for k, v in again.items()} == {k: v["rows"] for k, v in clean.items()}
    for split in ("train", "eval"):
        for name in ("part-00000.bin", "part-00001.bin", "meta.json"):
            a = (tmp_path / "clean" / split / name).read_bytes()
            b = (tmp_path / "out" / split / name).read_bytes()
            if name == "meta.json":
                a, b = (json.dumps({k: v for k, v in json.loads(x).items() if k != "parts"})
                        for x in (a, b))
            assert a == b, (split, name)
    with pytest.raises(DataError, match="another config"):
        preprocess(criteo_cfg(files), tmp_path / "out", chunk_rows=100, show_progress=False)


def test_bad_datasets_and_configs_name_the_problem(tmp_path: Path, write_criteo) -> None:
    files = [write_criteo("a.tsv", range(300))]
    preprocess(criteo_cfg(files), tmp_path / "out", chunk_rows=64, show_progress=False)
    with pytest.raises(DataError, match="no meta.json"):
        batches(columnar_cfg(tmp_path / "nothing"))
    # dense_transform unset (none): the dataset's own (log1p here) is what was applied
    assert batches(columnar_cfg(tmp_path / "out", batch_size=300), epochs=1)[0].batch_size == 300
    other = tmp_path / "other"
    preprocess(criteo_cfg(files, dense_transform=DenseTransform.NONE), other,
               show_progress=False)
    bad = DataConfig(kind=DataKind.COLUMNAR, path=[str(other / "train")],
                     dense_transform=DenseTransform.LOG1P)
    with pytest.raises(DataError, match="preprocessed with dense_transform none"):
        batches(bad)
    with pytest.raises(DataError, match="no eval data"):
        batches(columnar_cfg(tmp_path / "out"), "eval")
    with pytest.raises(ValueError, match="eval_fraction"):
        DataConfig(kind=DataKind.COLUMNAR, path=["x"], eval_fraction=0.1)
    with pytest.raises(ValueError, match="one preprocessed directory"):
        DataConfig(kind=DataKind.COLUMNAR, path=["x", "y"])
    part = tmp_path / "out" / "train" / "part-00000.bin"
    part.write_bytes(part.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated part"):
        batches(columnar_cfg(tmp_path / "out"), epochs=1)
    meta = tmp_path / "out" / "train" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 99}))
    with pytest.raises(DataError, match="version 99"):
        batches(columnar_cfg(tmp_path / "out"))
    with pytest.raises(DataError, match="preprocess reads text data"):
        preprocess(DataConfig(), tmp_path / "x", show_progress=False)


def test_libfm_fields_config_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "f.libfm"
    p.write_text("1 3:1 7:1\n0 4:1 8:1\n")
    cfg = DataConfig(kind=DataKind.LIBFM, path=[str(p)], libfm=LibfmConfig(["u", "i"]))
    preprocess(cfg, tmp_path / "out", show_progress=False)
    assert sparse_feature_names(columnar_cfg(tmp_path / "out")) == ["u", "i"]
    assert dense_feature_names(columnar_cfg(tmp_path / "out")) == []


def test_gzip_source_gives_the_same_dataset(tmp_path: Path, write_criteo) -> None:
    import gzip

    plain = write_criteo("a.tsv", range(500), extra={7: BAD})
    gz = tmp_path / "a.tsv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    for name, src in (("p", plain), ("g", gz)):
        preprocess(criteo_cfg([src], eval_fraction=0.3), tmp_path / name, chunk_rows=64,
                   show_progress=False)
    for split in ("train", "eval"):
        a = (tmp_path / "p" / split / "part-00000.bin").read_bytes()
        assert a == (tmp_path / "g" / split / "part-00000.bin").read_bytes()
        assert len(a) > 0

"""gzip input (``.gz``) and line chunking: a compressed file reads exactly like the plain one.

Offsets are decompressed bytes, so batches *and* their resume positions are identical;
chunking is checked against a plain-Python reference, also with tiny read blocks so
chunks span several blocks.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from terarec.config import CategoricalColumn, CsvSchema, DataConfig, DataKind, DenseTransform
from terarec.data import DataError, build_source
from terarec.data import files as F
from terarec.data.files import (
    data_size,
    header_bytes,
    is_compressed,
    iter_line_chunks,
    open_data,
    read_first_line,
)

# --------------------------------------------------------------------------- helpers


def gz(src: Path, dst: Path | None = None, members: int = 1) -> Path:
    """``src`` gzip-compressed into ``dst`` (default ``src.gz``), split into ``members``
    gzip members at arbitrary byte positions (mid-line), as ``cat a.gz b.gz`` makes."""
    data = src.read_bytes()
    dst = dst or src.with_name(src.name + ".gz")
    cuts = [len(data) * i // members for i in range(members + 1)]
    dst.write_bytes(b"".join(gzip.compress(data[a:b]) for a, b in zip(cuts, cuts[1:])))
    return dst


def zst(src: Path, dst: Path | None = None) -> Path:
    """``src`` zstd-compressed into ``dst`` (default ``src.zst``; pyarrow's codec)."""
    import pyarrow as pa

    dst = dst or src.with_name(src.name + ".zst")
    dst.write_bytes(pa.Codec("zstd").compress(src.read_bytes(), asbytes=True))
    return dst


def ref_chunks(data: bytes, offset: int, first_line: int, rows: int, stop: int | None):
    """Plain-Python line chunking: (bytes, bounds, ends, first_line, next_offset)."""
    lines = []
    p = offset
    while p < len(data) and (stop is None or p < stop):
        e = data.find(b"\n", p)
        e = len(data) if e < 0 else e + 1
        lines.append((p, e))
        p = e
    out = []
    for i in range(0, len(lines), rows):
        group = lines[i : i + rows]
        a, b = group[0][0], group[-1][1]
        bounds = [s - a for s, _ in group] + [b - a]
        ends = []
        for s, e in group:
            c = e - (data[e - 1 : e] == b"\n")
            c -= c > s and data[c - 1 : c] == b"\r"
            ends.append(c - a)
        out.append((data[a:b], bounds, ends, first_line + i, b))
    return out


def got_chunks(path: Path, offset: int, first_line: int, rows: int, stop: int | None):
    return [
        (c.buf.tobytes(), c.bounds.tolist(), c.ends.tolist(), c.first_line, c.next_offset)
        for c in iter_line_chunks(str(path), offset, first_line, rows, stop)
    ]


def random_text(rng: np.random.Generator, n_lines: int, trailing_newline: bool) -> bytes:
    out = []
    for _ in range(n_lines):
        k = int(rng.choice([0, 1, 5, 40, 300]))
        line = bytes(rng.choice(list(b"abc\t 0123456789"), size=k).tolist())
        out.append(line + (b"\r\n" if rng.random() < 0.2 else b"\n"))
    data = b"".join(out)
    return data if trailing_newline else data.rstrip(b"\n")


@pytest.fixture
def tiny_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read and skip in blocks of a few bytes, so chunks span many blocks."""
    monkeypatch.setattr(F, "_MIN_READ", 7)
    monkeypatch.setattr(F, "_MAX_READ", 61)
    monkeypatch.setattr(F, "_SKIP_BLOCK", 13)


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("small_blocks", [False, True])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_chunks_match_reference_plain_and_gzip(
    tmp_path: Path, request: pytest.FixtureRequest, small_blocks: bool, trailing_newline: bool
) -> None:
    if small_blocks:
        request.getfixturevalue("tiny_reads")
    rng = np.random.default_rng(int(small_blocks) * 2 + int(trailing_newline))
    data = random_text(rng, 120, trailing_newline)
    plain = tmp_path / "t.txt"
    plain.write_bytes(data)
    one = gz(plain)
    multi = gz(plain, tmp_path / "m.txt.gz", members=3)
    unnamed = gz(plain, tmp_path / "gz_without_suffix.txt")  # found by its magic number
    zstd = zst(plain)
    zstd_unnamed = zst(plain, tmp_path / "zst_without_suffix.txt")
    starts = [0] + [i + 1 for i in range(len(data)) if data[i] == 10][:-1]
    for rows in (1, 4, 37, 1000):
        for start_line in (0, 1, 50):
            offset = starts[start_line]
            for stop in (None, offset + 1, len(data) // 2, len(data) + 5):
                want = ref_chunks(data, offset, start_line, rows, stop)
                for path in (plain, one, multi, unnamed, zstd, zstd_unnamed):
                    assert got_chunks(path, offset, start_line, rows, stop) == want, (
                        path.name, rows, start_line, stop)


def test_empty_and_single_line_files(tmp_path: Path) -> None:
    for content in (b"", b"x", b"x\n", b"\n\n"):
        p = tmp_path / "e.txt"
        p.write_bytes(content)
        g = gz(p)
        want = ref_chunks(content, 0, 0, 3, None)
        assert got_chunks(p, 0, 0, 3, None) == want
        assert got_chunks(g, 0, 0, 3, None) == want
        assert data_size(str(g)) == data_size(str(p)) == len(content)


def test_first_line_header_bytes_and_size(tmp_path: Path, tiny_reads: None) -> None:
    data = b"a,b,c\r\n1,2,3\n4,5,6"
    p = tmp_path / "h.csv"
    p.write_bytes(data)
    g = gz(p, members=2)
    for path in (str(p), str(g)):
        assert read_first_line(path) == b"a,b,c"
        assert header_bytes(path) == 7
        assert data_size(path) == len(data)
        with open_data(path, 7) as f:  # skip in tiny blocks
            assert f.read() == data[7:]
        with open_data(path, 1000) as f:  # past the end: nothing, like a plain file
            assert f.read() == b""
    assert is_compressed(str(g)) and not is_compressed(str(p))


def test_data_size_counts_all_members_not_isize(tmp_path: Path) -> None:
    p = tmp_path / "m.txt.gz"
    parts = [b"abc\n" * 1000, b"defg\n" * 3]
    p.write_bytes(b"".join(gzip.compress(x) for x in parts))
    isize = int.from_bytes(p.read_bytes()[-4:], "little")
    assert isize == len(parts[-1])  # the trailer only knows the last member
    assert data_size(str(p)) == sum(len(x) for x in parts)
    # cached per (path, size, mtime): a rewritten file is counted again
    p.write_bytes(gzip.compress(b"x\n"))
    os.utime(p, ns=(1, 1))
    assert data_size(str(p)) == 2


def test_bad_gzip_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv.gz"
    bad.write_bytes(b"this is not gzip\n")
    with pytest.raises(DataError, match="bad.tsv.gz"):
        list(iter_line_chunks(str(bad), 0, 0, 10))
    with pytest.raises(DataError, match="bad.tsv.gz"):
        read_first_line(str(bad))
    with pytest.raises(DataError, match="bad.tsv.gz"):
        data_size(str(bad))
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(gzip.compress(os.urandom(200_000))[:-100])  # truncated
    with pytest.raises(DataError, match="cut.tsv.gz"):
        list(iter_line_chunks(str(cut), 0, 0, 10))
    with pytest.raises(DataError, match="cut.tsv.gz"):
        list(iter_line_chunks(str(cut), 150_000, 0, 10))  # while skipping to the offset
    with pytest.raises(DataError, match="missing.tsv.gz"):
        list(iter_line_chunks(str(tmp_path / "missing.tsv.gz"), 0, 0, 10))
    bad_zst = tmp_path / "bad.tsv.zst"
    bad_zst.write_bytes(b"this is not zstd\n")
    with pytest.raises(DataError, match="bad.tsv.zst"):
        list(iter_line_chunks(str(bad_zst), 0, 0, 10))
    flipped = bytearray(gzip.compress(b"abc\n" * 100))
    flipped[-8] ^= 0xFF  # CRC of the member
    (tmp_path / "crc.gz").write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="crc.gz"):
        list(iter_line_chunks(str(tmp_path / "crc.gz"), 0, 0, 10))


# --------------------------------------------------------------------------- readers


def batches_and_positions(cfg: DataConfig, state: dict | None = None, **kw) -> list:
    src = build_source(cfg, "train", seed=0, epochs=kw.get("epochs", 1))
    if state is not None:
        src.load_state_dict(state)
    return [(b.position, b) for b in src]


def same(a: list, b: list, as_tuple) -> None:
    assert len(a) == len(b)
    for (pa_, ba), (pb, bb) in zip(a, b):
        assert pa_ == pb
        assert as_tuple(ba) == as_tuple(bb)


def cfg_for(kind: DataKind, path: Path, **kw) -> DataConfig:
    kw.setdefault("batch_size", 7)
    kw.setdefault("chunk_rows", 16)
    kw.setdefault("prefetch_batches", 0)
    return DataConfig(kind=kind, path=[str(path)], **kw)


@pytest.mark.parametrize("shuffle", [0, 40])
@pytest.mark.parametrize("packed", ["gzip", "gzip-3-members", "gzip-unnamed", "zstd",
                                    "zstd-unnamed", "url", "url-gzip", "url-zstd"])
def test_criteo_gzip_same_batches_and_resume(
    tmp_path: Path, write_criteo, as_tuple, shuffle: int, packed: str
) -> None:
    """A compressed day (gzip, several gzip members, zstd; named so or not: found by its
    first bytes), or one named by a ``file://`` URL (read through pyarrow.fs, as any
    remote store is), reads as the plain one: the same batches and resume positions."""
    plain = write_criteo("c.tsv", range(200), {37: "0\t1\t2", 90: ""})  # bad + empty rows
    plain.write_bytes(plain.read_bytes().rstrip(b"\n"))  # no trailing newline
    unnamed = tmp_path / "day_0"
    g = {"gzip": lambda: gz(plain), "gzip-3-members": lambda: gz(plain, members=3),
         "gzip-unnamed": lambda: gz(plain, unnamed), "zstd": lambda: zst(plain),
         "zstd-unnamed": lambda: zst(plain, unnamed),
         "url": lambda: f"file://{plain}", "url-gzip": lambda: f"file://{gz(plain)}",
         "url-zstd": lambda: f"file://{zst(plain, unnamed)}"}[packed]()
    kw = dict(shuffle_buffer=shuffle, dense_transform=DenseTransform.LOG1P)
    want = batches_and_positions(cfg_for(DataKind.CRITEO, plain, **kw))
    got = batches_and_positions(cfg_for(DataKind.CRITEO, g, **kw))
    same(got, want, as_tuple)
    mid = len(want) // 2  # resume the gz stream from a mid-file position
    assert want[mid][0]["offset"] > 0 and want[mid][0]["offset"] < os.path.getsize(plain)
    rest = batches_and_positions(cfg_for(DataKind.CRITEO, g, **kw), state=want[mid][0])
    same(rest, want[mid + 1 :], as_tuple)
    # plain and gz positions are interchangeable
    rest_plain = batches_and_positions(cfg_for(DataKind.CRITEO, plain, **kw),
                                       state=got[mid][0])
    same(rest_plain, want[mid + 1 :], as_tuple)


def test_csv_with_header_gzip(tmp_path: Path, as_tuple) -> None:
    rows = ["click,price,site,tags"]
    rows += [f"{i % 2},{i * 0.5},s{i % 7},{'a|b' if i % 3 else ''}" for i in range(60)]
    plain = tmp_path / "d.csv"
    plain.write_text("\r\n".join(rows))  # CRLF, no trailing newline
    g = gz(plain, members=2)
    schema = CsvSchema(label="click", dense=["price"],
                       categorical=[CategoricalColumn(column="site"),
                                    CategoricalColumn(column="tags", name="tag", sep="|")],
                       delimiter=",", header=True)
    want = batches_and_positions(cfg_for(DataKind.CSV, plain, csv=schema))
    got = batches_and_positions(cfg_for(DataKind.CSV, g, csv=schema))
    assert sum(b.labels.shape[0] for _, b in want) == 60
    same(got, want, as_tuple)
    mid = next(i for i, (pos, _) in enumerate(want) if pos["offset"] > 0 and pos["skip"] > 0)
    rest = batches_and_positions(cfg_for(DataKind.CSV, g, csv=schema), state=want[mid][0])
    same(rest, want[mid + 1 :], as_tuple)


def test_libfm_gzip(tmp_path: Path, as_tuple) -> None:
    lines = [f"{1 if i % 3 else -1} {i % 11}:1 {100 + i % 5}:1 {200 + i}:0.5" for i in range(90)]
    plain = tmp_path / "f.libfm"
    plain.write_text("\n".join(lines) + "\n")
    g = gz(plain, members=2)
    want = batches_and_positions(cfg_for(DataKind.LIBFM, plain))
    got = batches_and_positions(cfg_for(DataKind.LIBFM, g))
    same(got, want, as_tuple)
    assert want[5][0]["offset"] > 0
    rest = batches_and_positions(cfg_for(DataKind.LIBFM, g), state=want[5][0])
    same(rest, want[6:], as_tuple)


def test_real_criteo_and_frappe_gzip(tmp_path: Path, shared_data: Path, as_tuple) -> None:
    for kind, name in ((DataKind.CRITEO, "criteo_kaggle_head10k.tsv"),
                       (DataKind.LIBFM, "frappe_validation.libfm")):
        plain = tmp_path / name
        shutil.copyfile(shared_data / name, plain)
        g = gz(plain, members=2)
        kw = dict(batch_size=1000, chunk_rows=4096)
        want = batches_and_positions(cfg_for(kind, plain, **kw))
        got = batches_and_positions(cfg_for(kind, g, **kw))
        same(got, want, as_tuple)
        mid = len(want) // 2
        assert want[mid][0]["offset"] > 0
        rest = batches_and_positions(cfg_for(kind, g, **kw), state=want[mid][0])
        same(rest, want[mid + 1 :], as_tuple)
        assert data_size(str(g)) == os.path.getsize(plain)

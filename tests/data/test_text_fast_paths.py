"""The fast paths of the text readers give the same bits as the general ones.

* fixed-width hashing (``fnv1a64_fixed``, Criteo's 8 hex digits) = ragged hashing;
* the all-bytes-allowed shortcut of the validity check = the per-byte check;
* the integer dense path (values buffer, nulls zeroed) = ``fill_null`` + cast;
* libFM ids by match + split on ':' = the capture group of ``extract_regex``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from terarec.config import DenseTransform
from terarec.data.delimited import (
    _HEX,
    CRITEO_SPARSE,
    FLOAT_RE,
    INT_RE,
    _numbers,
    criteo_parser,
)
from terarec.data.errors import BadRows
from terarec.data.files import iter_line_chunks
from terarec.data.keys import (
    arrow_string_parts,
    fnv1a64_fixed,
    fnv1a64_ragged,
    fnv1a64_ref,
    int_keys,
    salted,
    string_keys,
)
from terarec.data.libfm import ALL_TOKENS, TOKEN_RE, LibfmParser


def ragged_keys(arr: pa.Array, feature: str, allowed=None, max_len=None):
    """string_keys as it was before the fixed-width path: always ragged."""
    data, starts, lengths = arrow_string_parts(arr)
    present = lengths > 0
    h, ok = fnv1a64_ragged(data, starts[present], lengths[present], allowed)
    if max_len is not None:
        ok &= lengths[present] <= max_len
    valid = np.ones(len(present), dtype=bool)
    valid[present] = ok
    return present, salted(h, feature), valid


def check_same(arr: pa.Array, allowed=None, max_len=None) -> None:
    got = string_keys(arr, "C7", allowed, max_len)
    want = ragged_keys(arr, "C7", allowed, max_len)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_fixed_equals_ragged_and_reference() -> None:
    rng = np.random.default_rng(0)
    for w in (1, 3, 8, 9):
        mat = rng.choice(np.frombuffer(b"0123456789abcdefXz-", np.uint8), size=(300, w))
        h, ok = fnv1a64_fixed(mat, _HEX)
        words = [bytes(r) for r in mat]
        assert h.tolist() == [fnv1a64_ref(x) for x in words]
        assert ok.tolist() == [all(_HEX[b] for b in x) for x in words]
        h2, ok2 = fnv1a64_fixed(mat)
        assert h2.tolist() == h.tolist() and ok2.all()


@pytest.mark.parametrize("alphabet", [b"0123456789abcdef", b"0123456789abcdefXz-"])
def test_ragged_validity_with_and_without_the_shortcut(alphabet: bytes) -> None:
    rng = np.random.default_rng(2)
    words = [bytes(rng.choice(list(alphabet), size=int(rng.integers(0, 12))).tolist())
             for _ in range(400)]
    data = np.frombuffer(b"".join(words), np.uint8)
    lens = np.array([len(x) for x in words])
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    h, ok = fnv1a64_ragged(data, starts, lens, _HEX)
    assert h.tolist() == [fnv1a64_ref(x) for x in words]
    assert ok.tolist() == [all(_HEX[b] for b in x) for x in words]


@pytest.mark.parametrize("case", ["hex8", "nulls", "empty", "bad_hex", "mixed_len",
                                  "sliced", "all_missing", "gap_under_null", "long"])
def test_string_keys_fast_path_same_as_ragged(case: str) -> None:
    rng = np.random.default_rng(1)
    vals: list = [f"{x:08x}" for x in rng.integers(0, 2**32, 500)]
    if case == "nulls":
        vals = [v if i % 7 else None for i, v in enumerate(vals)]
    elif case == "empty":
        vals = [v if i % 5 else "" for i, v in enumerate(vals)]
    elif case == "bad_hex":
        vals[3], vals[100] = "0000zz00", "-1234567"
    elif case == "mixed_len":
        vals[10] = "abc"
    elif case == "all_missing":
        vals = [None, ""] * 20
    elif case == "long":
        vals = [v * 3 for v in vals]  # 24 hex digits: fixed width, too long for Criteo
    arr = pa.array(vals, pa.string())
    if case == "sliced":
        arr = arr.slice(17, 300)
    if case == "gap_under_null":  # a null slot that still spans bytes: not contiguous
        offsets = np.arange(0, 8 * 41, 8, dtype=np.int32)
        data = b"".join(f"{i:08x}".encode() for i in range(40))
        valid = np.ones(40, bool)
        valid[5] = False
        arr = pa.StringArray.from_buffers(40, pa.py_buffer(offsets.tobytes()),
                                          pa.py_buffer(data),
                                          pa.array(valid).buffers()[1], 1)
    check_same(arr)
    check_same(arr, _HEX, 16)


def test_real_criteo_keys_same_as_ragged(shared_data: Path) -> None:
    path = str(shared_data / "criteo_kaggle_head10k.tsv")
    parser = criteo_parser(DenseTransform.LOG1P, BadRows(False, 0))
    parser.start_file(path)
    n = 0
    for chunk in iter_line_chunks(path, 0, 0, 4096):
        table = parser._read(chunk.buf, fail_fast=False)
        for c in CRITEO_SPARSE:
            col = table.column(c).combine_chunks()
            got = string_keys(col, c, _HEX, max_len=16)
            want = ragged_keys(col, c, _HEX, max_len=16)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
            n += int(got[0].sum())
    assert n > 200_000


def test_int_dense_path_same_as_fill_null() -> None:
    vals = ["1", None, "-3", "0", "9223372036854775807", None, "42"]
    col = pa.array(vals, pa.string())
    for arr in (col, col.slice(1), col.slice(2, 3), pa.array([None, None], pa.string())):
        v, ok, big = _numbers(arr, INT_RE, missing_ok=True)
        assert not big.any()
        want = pc.fill_null(pc.cast(arr, pa.int64()), 0).to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(v, want.astype(np.float64))
        assert v.dtype == np.float64 and ok.all()
        _, ok, _ = _numbers(arr, INT_RE, missing_ok=False)
        np.testing.assert_array_equal(ok, arr.is_valid().to_numpy(zero_copy_only=False))
    v, ok, _ = _numbers(pa.array(["1", "1.5", None], pa.string()), INT_RE, missing_ok=True)
    assert v.tolist() == [1.0, 0.0, 0.0] and ok.tolist() == [True, False, True]
    # hex and values beyond float32: invalid whatever the rest of the column holds
    for vals in (["0x10", "5"], ["0x10", "a"], ["1" * 40, "5"]):
        v, ok, big = _numbers(pa.array(vals, pa.string()), INT_RE, missing_ok=True)
        assert not ok[0] and v[0] == 0.0 and big[0] == (vals[0] == "1" * 40)


@pytest.mark.parametrize("fields", [None, ["a", "b"]])
def test_libfm_ids_same_as_extract_regex(tmp_path: Path, fields) -> None:
    """libFM token ids via match + split equal the capture group of ``TOKEN_RE``."""
    lines = ["1 3:1 000017:0.5", "-1 :1 2:1", "0 12: 4:1", "1 1234567890123456789:1 1:1",
             "1 a:1 2:1", "1 3:1:2 5:1", "x 1:1 2:1", "1 7:1e-3 8:.5", "", "  0 9:1 10:-2  ",
             "1 123456789012345678:1 4:+1"]
    p = tmp_path / "t.libfm"
    p.write_text("\n".join(lines) + "\n")
    parser = LibfmParser(fields, BadRows(False, 0))
    parser.start_file(str(p))
    (chunk,) = iter_line_chunks(str(p), 0, 0, 100)
    rows = parser.parse(chunk, np.ones(chunk.n, bool))
    want_ids, want_labels = [], []
    for line in lines:
        toks = line.split()
        if not toks:
            continue
        parts = pc.extract_regex(pa.array(toks[1:], pa.string()), TOKEN_RE)
        ok = (parts.is_valid().to_numpy(zero_copy_only=False).all()
              and pc.match_substring_regex(pa.array([toks[0]]), FLOAT_RE)[0].as_py()
              and (fields is None or len(toks) - 1 == len(fields)))
        if ok:
            want_ids.append([int(x) for x in parts.field("idx").to_pylist()])
            want_labels.append(float(float(toks[0]) > 0))
    assert rows.labels.tolist() == want_labels and len(want_ids) == 4
    if fields:
        for f, name in enumerate(fields):
            assert rows.values[f].tolist() == int_keys(
                np.array([r[f] for r in want_ids]), name).tolist()
    else:
        flat = np.array([i for r in want_ids for i in r])
        assert rows.values[0].tolist() == int_keys(flat, ALL_TOKENS).tolist()
        assert rows.lengths[0].tolist() == [len(r) for r in want_ids]
    assert parser.bad.counts["bad_token"] == 5 and parser.bad.counts["bad_label"] == 1

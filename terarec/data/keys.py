"""Raw feature values → int64 keys, vectorised and deterministic across processes.

A categorical *string* ``s`` of feature ``f`` becomes::

    key = int64(mix64(fnv1a64(utf8 bytes of s) ^ salt_for(f)))

and an integer id ``i`` (libFM index, synthetic id) becomes::

    key = int64(mix64(uint64(i) ^ salt_for(f)))

``fnv1a64`` is the 64-bit FNV-1a hash over the bytes (offset basis 0xcbf29ce484222325,
prime 0x100000001b3). The salt separates features: the same raw value in two features
gives unrelated keys. Nothing here depends on chunk boundaries, on the longest string in
a chunk, or on Python's randomised ``hash``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import pyarrow as pa

from terarec.hashing import MASK64, mix64_np, salt_for

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def fnv1a64_ref(data: bytes) -> int:
    """Plain-Python FNV-1a 64 (the reference the vectorised version is tested against)."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & ((1 << 64) - 1)
    return h


def fnv1a64_ragged(
    data: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    allowed: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FNV-1a 64 of ``n`` byte strings stored back to back.

    Loops over byte *positions* (the longest string's length), never over strings; rows
    that have ended drop out, so an outlier long string costs only its own bytes.

    Args:
        data: uint8 ``[nbytes]`` the concatenated bytes.
        starts: int64 ``[n]`` start of each string in ``data``.
        lengths: int64 ``[n]`` length of each string (0 allowed).
        allowed: optional bool ``[256]``: bytes a valid string may contain.

    Returns:
        uint64 ``[n]`` hashes (empty strings hash to the offset basis) and bool ``[n]``
        whether every byte of the string is ``allowed`` (all True without ``allowed``).
    """
    n = len(starts)
    out = np.full(n, FNV_OFFSET, dtype=np.uint64)
    valid = np.ones(n, dtype=bool)
    pos = np.flatnonzero(lengths > 0)
    if pos.size == 0:
        return out, valid
    st = starts[pos].astype(np.int64)
    ln = lengths[pos].astype(np.int64)
    if allowed is not None:
        lo_b, hi_b = int(st.min()), int((st + ln).max())
        if _all_allowed(data[lo_b:hi_b], allowed):
            allowed = None  # every string is valid: skip the per-byte check
    h = out[pos]
    ok = np.ones(len(pos), dtype=bool)
    lo, hi = int(ln.min()), int(ln.max())
    with np.errstate(over="ignore"):
        for j in range(lo):  # every remaining string has a byte j: no bookkeeping
            b = data[st + j]
            if allowed is not None:
                ok &= allowed[b]
            h ^= b
            h *= FNV_PRIME
        if lo == hi:
            out[pos], valid[pos] = h, ok
            return out, valid
        j = lo
        while pos.size:
            done = ln == j
            if done.any():
                out[pos[done]], valid[pos[done]] = h[done], ok[done]
                keep = ~done
                pos, st, ln, h, ok = pos[keep], st[keep], ln[keep], h[keep], ok[keep]
                if not pos.size:
                    break
            b = data[st + j]
            if allowed is not None:
                ok &= allowed[b]
            h ^= b
            h *= FNV_PRIME
            j += 1
    return out, valid


def fnv1a64_fixed(
    mat: np.ndarray, allowed: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
    """FNV-1a 64 of ``n`` byte strings of one length ``w``: the rows of a matrix.

    ``w`` vectorised steps over the ``[n]`` columns, without :func:`fnv1a64_ragged`'s
    gathers and bookkeeping; the hashes are the same.

    Args:
        mat: uint8 ``[n, w]``; row ``i`` is string ``i``.
        allowed: optional bool ``[256]``: bytes a valid string may contain.

    Returns:
        uint64 ``[n]`` hashes and bool ``[n]`` validity, as :func:`fnv1a64_ragged`.
    """
    n, w = mat.shape
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(w):
            np.bitwise_xor(h, mat[:, j], out=h)
            np.multiply(h, FNV_PRIME, out=h)
    ok = np.ones(n, dtype=bool)
    if allowed is not None and not _all_allowed(mat, allowed):
        ok = np.logical_and.reduce(allowed.astype(bool)[mat], axis=1)
    return h, ok


def _all_allowed(data: np.ndarray, allowed: np.ndarray) -> bool:
    """Whether every byte of ``data`` is ``allowed`` (one C pass: delete the allowed bytes
    and see if anything is left)."""
    keep = bytes(np.flatnonzero(allowed).astype(np.uint8))
    return not np.ascontiguousarray(data).tobytes().translate(None, keep)


def arrow_string_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-copy view of an arrow (large_)string array as (bytes, starts, lengths).

    Returns:
        ``data`` uint8 ``[nbytes]``, ``starts`` int64 ``[n]``, ``lengths`` int64 ``[n]``.
        Null entries have length 0.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, off_buf, data_buf = arr.buffers()
    off_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(off_buf, dtype=off_type)[arr.offset : arr.offset + n + 1]
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(
        0, np.uint8
    )
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths = np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    return data, offsets[:-1], lengths


def feature_salts(features: Sequence[str]) -> np.ndarray:
    """uint64 ``[F]``: each feature's ``salt_for``, as :func:`salted_by` takes them."""
    return np.array([salt_for(f) & MASK64 for f in features], np.uint64)


def salted_by(h: np.ndarray, salts: np.ndarray) -> np.ndarray:
    """``int64(mix64(h ^ salts))``: the key of uint64/int64 ``h`` under uint64 ``salts``
    (:func:`feature_salts`; broadcast against ``h``, e.g. ``[F, 1]`` over ``[F, n]``)."""
    return mix64_np(np.asarray(h).astype(np.uint64, copy=False) ^ salts).view(np.int64)


def salted(h: np.ndarray, feature: str) -> np.ndarray:
    """``int64(mix64(h ^ salt_for(feature)))`` for uint64/int64 ``h`` of any shape."""
    return salted_by(h, feature_salts([feature])[0])


def string_keys(
    arr: pa.Array,
    feature: str,
    allowed: Optional[np.ndarray] = None,
    max_len: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys of the non-empty strings of ``arr`` for ``feature``.

    When every non-empty string has the same length and they lie back to back in the
    arrow data buffer (Criteo's 8 hex digits), they are hashed as one ``[n, w]`` byte
    matrix (:func:`fnv1a64_fixed`); otherwise by :func:`fnv1a64_ragged`. Both give the
    same hashes.

    Args:
        arr: arrow (large_)string array ``[n]``; empty or null = missing.
        feature: the feature name (salt).
        allowed: optional bool ``[256]`` of the bytes a valid value may contain.
        max_len: optional longest valid value in bytes.

    Returns:
        ``present`` bool ``[n]`` (False for missing), ``keys`` int64 ``[present.sum()]``
        in row order, ``valid`` bool ``[n]`` (False where a byte is not ``allowed`` or
        the value is longer than ``max_len``).
    """
    data, starts, lengths = arrow_string_parts(arr)
    present = lengths > 0
    st, ln = starts[present], lengths[present]
    m = len(st)
    w = int(ln[0]) if m else 0
    if m and int(st[-1] - st[0]) == (m - 1) * w and bool((ln == w).all()):
        # equal lengths and offsets non-decreasing: the strings are back to back
        h, ok = fnv1a64_fixed(data[st[0] : st[0] + m * w].reshape(m, w), allowed)
    else:
        h, ok = fnv1a64_ragged(data, st, ln, allowed)
    if max_len is not None:
        ok &= ln <= max_len
    valid = np.ones(len(present), dtype=bool)
    valid[present] = ok
    return present, salted(h, feature), valid


def int_keys(ids: np.ndarray, feature: str) -> np.ndarray:
    """Keys of integer ids (int64/uint64 ``[n]``) for ``feature``; int64 ``[n]``."""
    return salted(ids, feature)


def str_key(value: str, feature: str) -> int:
    """Key of one string (slow path for tests, tools and serving lookups)."""
    return int(salted(np.array([fnv1a64_ref(value.encode())], dtype=np.uint64), feature)[0])


def semantic_id_keys(tokens: np.ndarray, lengths: np.ndarray, feature: str) -> np.ndarray:
    """Keys of semantic ids: one key per prefix of each token sequence.

    A semantic id is a path of codebook tokens (level 1 first). Its ``l``-th key hashes
    the prefix ``t_1 .. t_l``: ``h_0 = salt(feature)``, ``h_l = mix64(h_{l-1} ^ t_l)``,
    key ``l`` = ``int64(h_l)``. Two ids that share their first ``m`` tokens share their
    first ``m`` keys, so an id never seen in training still finds the rows of the
    prefixes it shares with seen ones. Training (the synthetic ads, a CSV column with
    ``semantic_id: true``) and serving both go through here.

    Args:
        tokens: int64/uint64 ``[M]``: the sequences back to back (tokens >= 0).
        lengths: int ``[n]`` tokens per sequence (``sum == M``; 0 = missing).
        feature: the feature name (salts the chain).

    Returns:
        int64 ``[M]``: each token's prefix key, in place of the token.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = np.asarray(tokens).astype(np.int64, copy=False).view(np.uint64)
    if tokens.size != int(lengths.sum()):
        raise ValueError(f"{feature}: {tokens.size} tokens for lengths summing to "
                         f"{int(lengths.sum())}")
    starts = np.cumsum(lengths) - lengths
    h = np.full(len(lengths), salt_for(feature) & ((1 << 64) - 1), dtype=np.uint64)
    out = np.empty(tokens.size, dtype=np.uint64)
    for lv in range(int(lengths.max(initial=0))):  # over levels, not sequences
        seqs = np.flatnonzero(lengths > lv)
        at = starts[seqs] + lv
        h[seqs] = mix64_np(h[seqs] ^ tokens[at])
        out[at] = h[seqs]
    return out.view(np.int64)

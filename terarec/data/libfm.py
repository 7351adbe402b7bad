"""libFM text (``label idx:val idx:val ...``) → :class:`Rows`, vectorised with pyarrow.

With ``LibfmConfig.fields`` the i-th token of a row is feature ``fields[i]`` (one key per
feature; a row with another token count is malformed); without, all tokens of a row are
one multi-valued feature named ``features``. Labels ``1``/``-1`` or ``1``/``0`` map to
{1, 0} (label = 1 iff value > 0). Token values are validated but not used: features are
treated as present/absent (one-hot / multi-hot), the usual CTR reading of libFM data.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from terarec.data.delimited import FLOAT_RE
from terarec.data.errors import BadRows
from terarec.data.files import LineChunk
from terarec.data.keys import int_keys
from terarec.data.rows import Rows, empty_rows

TOKEN_RE = r"^(?P<idx>[0-9]{1,18}):(?P<val>[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)$"
ALL_TOKENS = "features"


class LibfmParser:
    """Parses chunks of libFM lines.

    Args:
        fields: feature name per token position, or None for one feature ``features``.
        bad: the source's malformed-row policy.
    """

    def __init__(self, fields: Optional[list[str]], bad: BadRows) -> None:
        self.fields = fields
        self.bad = bad
        self.path = ""

    @property
    def features(self) -> list[str]:
        return list(self.fields) if self.fields else [ALL_TOKENS]

    def start_file(self, path: str) -> int:
        self.path = path
        return 0  # no header

    def parse(self, chunk: LineChunk, keep: np.ndarray) -> Rows:
        """Parses the lines ``keep`` (bool ``[n]``) of ``chunk``; bad ones are reported."""
        nf = len(self.features)
        idx = np.flatnonzero(keep)
        offsets = pa.py_buffer(chunk.bounds.astype(np.int32))
        lines = pa.StringArray.from_buffers(chunk.n, offsets, pa.py_buffer(chunk.buf))
        if len(idx) != chunk.n:
            lines = lines.take(pa.array(idx))
        lines = pc.ascii_trim_whitespace(lines)
        empty = pc.equal(pc.binary_length(lines), 0).to_numpy(zero_copy_only=False)
        self.bad.count("empty_line", int(empty.sum()))
        if empty.any():
            idx = idx[~empty]
            lines = lines.filter(pa.array(~empty))
        m = len(idx)
        if m == 0:
            return empty_rows(0, nf)
        toks = pc.ascii_split_whitespace(lines)
        ntok = pc.list_value_length(toks).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = toks.flatten()
        first = np.concatenate([[0], np.cumsum(ntok)[:-1]])
        label_tok = flat.take(pa.array(first))
        is_feat = np.ones(len(flat), dtype=bool)
        is_feat[first] = False
        feat_tok = flat.filter(pa.array(is_feat))
        row_of = np.repeat(np.arange(m), ntok - 1)

        label_ok = pc.match_substring_regex(label_tok, FLOAT_RE).to_numpy(zero_copy_only=False)
        # validate with a match (no capture: ~4x cheaper than extract_regex); a valid
        # token's idx is its text before the first ':' (split below, good rows only)
        tok_ok = pc.match_substring_regex(feat_tok, TOKEN_RE).to_numpy(zero_copy_only=False)
        row_tok_bad = np.zeros(m, dtype=bool)
        row_tok_bad[row_of[~tok_ok]] = True
        count_bad = (ntok - 1 != nf) if self.fields else np.zeros(m, dtype=bool)

        bad = np.zeros(m, dtype=bool)
        lines_out: list[int] = []
        reasons: list[str] = []
        details: list[Any] = []

        def flag(mask: np.ndarray, reason: str, what: Any) -> None:
            new = np.flatnonzero(mask & ~bad)
            bad[new] = True
            for i in new:
                lines_out.append(chunk.first_line + int(idx[i]) + 1)
                reasons.append(reason)
                details.append(lambda i=i: what(int(i)))

        flag(~label_ok, "bad_label", lambda i: f"label {label_tok[i].as_py()!r} is not a number")
        first_bad_tok = np.full(m, -1, dtype=np.int64)
        bad_pos = np.flatnonzero(~tok_ok)[::-1]  # reversed so the first bad token wins
        first_bad_tok[row_of[bad_pos]] = bad_pos
        flag(row_tok_bad, "bad_token",
             lambda i: f"token {feat_tok[int(first_bad_tok[i])].as_py()!r} is not idx:value")
        flag(count_bad, "wrong_token_count",
             lambda i: f"expected {nf} idx:value tokens, got {int(ntok[i]) - 1}")
        if lines_out:
            order = np.argsort(np.asarray(lines_out), kind="stable")
            self.bad.report(self.path, np.asarray(lines_out)[order],
                            [reasons[i] for i in order], [details[i] for i in order])

        good = ~bad
        labels = pc.cast(label_tok.filter(pa.array(good)) if not good.all() else label_tok,
                         pa.float64()).to_numpy(zero_copy_only=False) > 0
        tok_keep = good[row_of]
        kept_tok = feat_tok if tok_keep.all() else feat_tok.filter(pa.array(tok_keep))
        ids_str = pc.list_element(pc.split_pattern(kept_tok, ":", max_splits=1), 0)
        ids = pc.cast(ids_str, pa.int64()).to_numpy(zero_copy_only=False)
        n = int(good.sum())
        if self.fields:
            ids = ids.reshape(n, nf)
            lengths = np.ones((nf, n), dtype=np.int32)
            values = [int_keys(ids[:, f], name) for f, name in enumerate(self.fields)]
        else:
            lengths = (ntok[good] - 1).astype(np.int32)[None, :]
            values = [int_keys(ids, ALL_TOKENS)]
        return Rows(
            labels=labels.astype(np.float32),
            dense=np.zeros((n, 0), dtype=np.float32),
            lengths=lengths,
            values=values,
        )

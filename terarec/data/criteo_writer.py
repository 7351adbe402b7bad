"""A small synthetic Criteo TSV writer for tests, examples and benchmarks.

Writes lines in the Criteo Kaggle layout the ``criteo`` reader reads
(``docs/data.md``)::

    label \t I1 .. I13 (ints) \t C1 .. C26 (8-digit hex)

Categories are Zipf-like (a few hot keys, a long tail, at most ``vocab`` distinct values
per feature) and the labels depend on them and on ``I1``, so a model has something to
learn. Unlike :mod:`terarec.data.synthetic` (an in-process stream with a planted
teacher), this produces a *file*, for runs that exercise the file readers, sharding by
row and several processes reading one dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from terarec.data.delimited import CRITEO_DENSE, CRITEO_SPARSE


def write_criteo(path: Union[str, Path], rows: int, seed: int, vocab: int = 400) -> Path:
    """Writes ``rows`` synthetic Criteo lines to ``path``.

    Args:
        path: the TSV file to write (replaced).
        rows: how many lines.
        seed: the sampling seed (the same arguments write the same bytes).
        vocab: distinct values per categorical feature, at most.
    Returns:
        ``path``.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    dense = rng.poisson(3.0, size=(rows, len(CRITEO_DENSE)))
    ranks = np.minimum(rng.zipf(1.3, size=(rows, len(CRITEO_SPARSE))), vocab) - 1
    cats = (ranks * 2654435761 + np.arange(len(CRITEO_SPARSE)) * 97) % (1 << 32)
    score = (ranks % 7).sum(axis=1) + 2.0 * dense[:, 0]
    logit = (score - score.mean()) / (2.0 * score.std() + 1e-9)
    labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(int)
    with open(path, "w") as f:
        for i in range(rows):
            f.write("\t".join([str(labels[i]), *map(str, dense[i]),
                               *(f"{c:08x}" for c in cats[i])]) + "\n")
    return path

"""Input pipeline throughput: samples/s of each data source with no training.

Builds one Criteo-shaped dataset (13 dense + 26 categorical features; the synthetic Criteo
writer, or ``--criteo FILE`` repeated) as plain TSV, TSV.gz, the preprocessed columnar
format (``terarec preprocess``) and, for the format decision, Parquet (pyarrow, snappy and
uncompressed, read with ``iter_batches`` into the same batches). Then, ``--repeats``
times in turn, each source hands out batches of ``--batch`` through ``build_source`` (the
background producer thread included) for at least ``--seconds``; the figure is the median
samples/s, and every ratio is against the TSV reader measured in the same run.

    python benchmarks/loader_bench.py [--rows 500000] [--batch 16384] [--repeats 3]
        [--seconds 2] [--criteo FILE] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import DataConfig, DataKind, DenseTransform, SyntheticBackend
from terarec.data import build_source
from terarec.data.batch import Batch
from terarec.data.columnar import open_dataset
from terarec.data.criteo_writer import write_criteo
from terarec.data.preprocess import preprocess


def make_data(root: Path, rows: int, criteo: str | None) -> dict[str, Path]:
    tsv = root / "data.tsv"
    if criteo:
        src = Path(criteo).read_bytes()
        n = src.count(b"\n")
        with open(tsv, "wb") as f:
            for _ in range(max(1, rows // n)):
                f.write(src)
    else:
        write_criteo(tsv, rows, seed=0, vocab=100_000)
    gz = root / "data.tsv.gz"
    with open(tsv, "rb") as fi, gzip.open(gz, "wb", compresslevel=6) as fo:
        shutil.copyfileobj(fi, fo, 1 << 24)
    cfg = DataConfig(kind=DataKind.CRITEO, path=[str(tsv)], dense_transform=DenseTransform.LOG1P)
    preprocess(cfg, root / "columnar", show_progress=False)
    out = {"tsv": tsv, "gz": gz, "columnar": root / "columnar" / "train"}
    for comp in ("snappy", "none"):
        out[f"parquet-{comp}"] = to_parquet(out["columnar"], root / f"data-{comp}.parquet", comp)
    return out


def to_parquet(columnar: Path, path: Path, compression: str) -> Path:
    """The columnar dataset as one Parquet file: label, I*, C* as list<int64>."""
    ds = open_dataset(columnar)
    writer = None
    for pi in range(len(ds.parts)):
        r = ds.reader(pi)
        for ci in range(len(ds.parts[pi].chunks)):
            rows = r.chunk(ci)
            cols: dict[str, Any] = {"label": pa.array(rows.labels)}
            for j, name in enumerate(ds.dense):
                cols[name] = pa.array(rows.dense[:, j])
            off = rows.offsets()
            for f, name in enumerate(ds.sparse):
                cols[name] = pa.ListArray.from_arrays(pa.array(off[:, f].astype(np.int32)),
                                                      pa.array(rows.values[f]))
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression=compression)
            writer.write_table(table, row_group_size=len(rows.labels))
    assert writer is not None
    writer.close()
    return path


def parquet_batches(path: Path, batch: int, dense: list[str], sparse: list[str]
                    ) -> Iterator[Batch]:
    """Endless batches of a Parquet file, read with pyarrow's threads."""
    f = pq.ParquetFile(path)
    while True:
        for rb in f.iter_batches(batch_size=batch, use_threads=True):
            lengths, values = [], []
            for name in sparse:
                col = rb.column(name)
                lengths.append(np.diff(col.offsets.to_numpy()).astype(np.int32))
                values.append(col.flatten().to_numpy())
            dense_np = np.stack([rb.column(n).to_numpy() for n in dense], axis=1)
            kjt = KeyedJaggedTensor(keys=list(sparse), values=torch.from_numpy(
                np.concatenate(values)), lengths=torch.from_numpy(np.concatenate(lengths)),
                stride=rb.num_rows)
            yield Batch(dense=torch.from_numpy(dense_np), sparse=kjt,
                        labels=torch.from_numpy(rb.column("label").to_numpy()))


def rate(make: Callable[[], Any], seconds: float) -> float:
    """Samples/s handed out by the iterable ``make()`` over >= ``seconds`` (after one
    warm-up batch)."""
    src = make()
    it = iter(src)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it).batch_size
    dt = time.perf_counter() - t0
    if hasattr(src, "close"):
        src.close()
    return n / dt


def sources(data: dict[str, Path], batch: int) -> dict[str, Callable[[], Any]]:
    def text(path: Path) -> Callable[[], Any]:
        cfg = DataConfig(kind=DataKind.CRITEO, path=[str(path)], batch_size=batch,
                         dense_transform=DenseTransform.LOG1P)
        return lambda: build_source(cfg, "train", seed=0)

    def columnar(workers: int, shuffle: int = 0) -> Callable[[], Any]:
        cfg = DataConfig(kind=DataKind.COLUMNAR, path=[str(data["columnar"])],
                         batch_size=batch, read_workers=workers, shuffle_buffer=shuffle)
        return lambda: build_source(cfg, "train", seed=0)

    def synthetic(backend: SyntheticBackend) -> Callable[[], Any]:
        # (the torch generator is for GPUs: benchmarks/train_e2e.py measures it there)
        cfg = DataConfig(batch_size=batch)
        cfg.synthetic.generator = backend
        return lambda: build_source(cfg, "train", seed=0)

    ds = open_dataset(data["columnar"])
    out = {
        "tsv": text(data["tsv"]),
        "tsv.gz": text(data["gz"]),
        "columnar, 1 worker": columnar(1),
        "columnar, 2 workers": columnar(2),
        "columnar shuffled, 2 workers": columnar(2, shuffle=4 * batch),
        "synthetic numpy": synthetic(SyntheticBackend.NUMPY),
    }
    for comp in ("snappy", "none"):
        out[f"parquet ({comp})"] = (
            lambda c=comp: parquet_batches(data[f"parquet-{c}"], batch, ds.dense, ds.sparse))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--criteo", help="a Criteo TSV to repeat instead of synthetic lines")
    ap.add_argument("--only", help="comma list of sources to run (default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="loader_bench_"))
    try:
        t0 = time.perf_counter()
        data = make_data(root, args.rows, args.criteo)
        build_s = time.perf_counter() - t0
        srcs = sources(data, args.batch)
        if args.only:
            keep = set(args.only.split(",")) | {"tsv"}
            srcs = {k: v for k, v in srcs.items() if k in keep}
        runs: dict[str, list[float]] = {k: [] for k in srcs}
        for _ in range(args.repeats):
            for name, make in srcs.items():
                runs[name].append(rate(make, args.seconds))
        med = {k: statistics.median(v) for k, v in runs.items()}
        base = med["tsv"]
        result = {
            "batch": args.batch, "rows": args.rows, "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(), "build_s": round(build_s, 1),
            "sizes_mb": {k: round(sum(f.stat().st_size for f in ([p] if p.is_file() else
                                  p.iterdir())) / 2**20, 1) for k, p in data.items()},
            "samples_per_s": {k: round(v) for k, v in med.items()},
            "ratio_vs_tsv": {k: round(v / base, 2) for k, v in med.items()},
            "runs": {k: [round(x) for x in v] for k, v in runs.items()},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"batch {args.batch}, {args.rows} rows, median of {args.repeats}; "
              f"ratio against the TSV reader of the same run")
        for k, v in med.items():
            print(f"  {k:32s} {v / 1e6:7.3f} M samples/s  {v / base:6.2f}x")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

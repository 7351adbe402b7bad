"""The rows of in-memory tables in a full checkpoint: streamed chunk files.

An untiered table's rows go to ``rows.<i>.safetensors`` a chunk at a time
(``terarec.trainer.checkpoint.rows``): the save adds about a chunk of memory, where
exporting the table (the way ``tables.pt`` held rows) adds a copy of it. Measured in a
child process (its own resident memory, ``VmHWM`` reset through ``clear_refs``), so
torch's and the allocator's memory count, not only Python objects.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from terarec.config import SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.trainer.checkpoint import rows

CHILD = r"""
import ctypes, gc, json, sys, tempfile
from pathlib import Path
import torch
from terarec.config import SparseOptimConfig, TableConfig
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.trainer.checkpoint import rows

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def peak_added(fn):
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back: growth shows again
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before

n, chunk_mb = int(sys.argv[1]), int(sys.argv[2])
ebc = HierarchicalEmbeddingBagCollection(
    [TableConfig(name="t", dim=16)], ["f"], SparseOptimConfig(kind="rowwise_adagrad"), seed=0)
state = ebc.tables_state_dict()
state["t"].update(keys=torch.randperm(4 * n)[:n] * 7 - 2**40, rows=torch.randn(n, 17))
ebc.load_tables_state_dict(state)
del state
rows.CHUNK_BYTES = chunk_mb << 20
out = Path(tempfile.mkdtemp())
streamed = peak_added(lambda: rows.write_chunks(ebc, out, ["t"]))
exported = peak_added(lambda: torch.save(ebc.tables_state_dict(), out / "tables.pt"))
print(json.dumps({"streamed": streamed, "exported": exported,
                  "files": len(list(out.glob("rows.*.safetensors")))}))
"""


def test_a_save_of_an_untiered_table_adds_a_chunk_not_a_table() -> None:
    n, chunk_mb = 2_000_000, 2  # 152 MB of keys + rows (dim 16 + Adagrad's state)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(chunk_mb)],
                         capture_output=True, text=True, timeout=300, check=True, cwd=root)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    table = n * (8 + 17 * 4)
    per_chunk = (chunk_mb << 20) // (8 + 17 * 4)
    assert res["files"] == -(-n // per_chunk)
    assert res["exported"] > table * 0.9, res  # the copy every row goes through
    # a chunk's gathers (keys, rows, metadata), its serialised copy, the file's buffer
    assert res["streamed"] < 8 * (chunk_mb << 20) + (8 << 20), res


def test_chunks_hold_the_export_in_order(tmp_path: Path) -> None:
    """Concatenated, the chunk files are the table's export (keys and rows, same order),
    and ``load_states`` puts them back; an empty table still gets a (empty) file."""
    tables = [TableConfig(name="a", dim=4, features=["f"]),
              TableConfig(name="b", dim=4, features=["g"])]
    ebc = HierarchicalEmbeddingBagCollection(
        tables, ["f", "g"], SparseOptimConfig(kind="rowwise_adagrad"), seed=0)
    state = ebc.tables_state_dict()
    state["a"].update(keys=torch.arange(1000) * 3 - 500, rows=torch.randn(1000, 5))
    ebc.load_tables_state_dict(state)
    old = rows.CHUNK_BYTES
    rows.CHUNK_BYTES = 10 * (4 * 5 + 8)  # 10 rows a chunk
    try:
        bad, files = rows.write_chunks(ebc, tmp_path, ["a", "b"])
    finally:
        rows.CHUNK_BYTES = old
    assert bad is None and len(files) == 100 + 1
    torch.save({n: {} for n in ("a", "b")}, tmp_path / "tables.pt")
    manifest = {"files": {f: {} for f in files}}
    got = rows.load_states(tmp_path, "", manifest)
    keys, vals = ebc.tables[0].export()
    assert torch.equal(got["a"]["keys"], keys) and torch.equal(got["a"]["rows"], vals)
    assert got["b"]["keys"].numel() == 0 and got["b"]["rows"].shape == (0, 5)

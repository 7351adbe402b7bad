"""Regenerates docs/topology.md: terarec-topo's output on this machine, every named
fixture's plan and cost estimate, two plans with fewer ranks than GPUs, a summary over
the real captures in tests/topology/fixtures/captures.

    python scripts/topology_doc.py            # rewrites docs/topology.md

Text between ``<!-- keep:NAME -->`` and ``<!-- /keep:NAME -->`` markers (the GPU
machine's output and measurements, filled in by hand) is carried over from the old file.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from terarec.topology.cli import main as topo  # noqa: E402
from terarec.topology.cost import BANDWIDTH, StepLoad, estimate  # noqa: E402
from terarec.topology.facts import load_fixture  # noqa: E402
from terarec.topology.plan import make_plan  # noqa: E402

DOC = REPO / "docs" / "topology.md"
FIXTURES = REPO / "tests" / "topology" / "fixtures"
CAPTURES = FIXTURES / "captures"
ORDER = ["dgx-h200-nvswitch", "pcie-8gpu-2x4-switch", "pcie-4gpu-workstation", "h200-vm",
         "cpu-box"]
KEEP = re.compile(r"<!-- keep:(\w[\w-]*) -->\n(.*?)<!-- /keep:\1 -->", re.S)


def run(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        topo(argv)
    return buf.getvalue().rstrip()


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def fewer(prefix: str, nproc: int, nnodes: int) -> str:
    """The plan and the cost estimate (the machine tables left out) for fewer ranks."""
    path = next(CAPTURES.glob(f"{prefix}*.txt"))
    argv = ["--from", rel(path), "--nproc", str(nproc), "--nnodes", str(nnodes)]
    out = run(argv)
    return (f"`terarec-topo {' '.join(argv)}` (from the plan on):\n\n"
            f"```\n{out[out.index('plan for '):]}\n```")


def fixture_notes(path: Path) -> str:
    lines = [ln[2:] for ln in path.read_text().splitlines() if ln.startswith("# ")]
    return "\n".join(f"> {ln}" for ln in lines)


def captures_table() -> str:
    rows = ["| capture | GPUs | NICs | fast groups | relays | warnings | net naive/planned | "
            "host naive/planned |", "|---|---|---|---|---|---|---|---|"]
    for f in sorted(CAPTURES.glob("*.txt")):
        m = load_fixture(f)
        plan = make_plan(m)
        est = estimate(m, plan)
        relays = [f"GPU{r.gpu}->GPU{r.relay_gpu}" for r in plan.ranks if r.relay_gpu is not None]
        rows.append(f"| {f.name.split('__')[0]} | {len(m.gpus)} | {len(m.nics)} | "
                    f"{plan.fast_groups} | {', '.join(relays) or '-'} | "
                    f"{len(plan.warnings)} | {est.speedup('net'):.2f}x | "
                    f"{est.speedup('host'):.2f}x |")
    return "\n".join(rows)


def bandwidth_table() -> str:
    rows = ["| link | GB/s per direction | where the number comes from |", "|---|---|---|"]
    rows += [f"| `{k}` | {v:g} | {src} |" for k, (v, src) in BANDWIDTH.items()]
    return "\n".join(rows)


def main() -> None:
    old = DOC.read_text() if DOC.exists() else ""
    kept = {m.group(1): m.group(2) for m in KEEP.finditer(old)}

    def keep(name: str, default: str) -> str:
        return f"<!-- keep:{name} -->\n{kept.get(name, default)}<!-- /keep:{name} -->"

    os.chdir(REPO)  # outputs name files relative to the repository
    template = (REPO / "scripts" / "topology_doc.md.in").read_text()
    parts = {
        "LOCAL": run([]),
        "BANDWIDTH": bandwidth_table(),
        "LOAD": ", ".join(f"{k} = {v:g} MB" for k, v in vars(StepLoad()).items()),
        "CAPTURES": captures_table() if CAPTURES.is_dir() else "(the captures are missing)",
        "FEWER1": fewer("dgx-h200-12nic", 4, 2),
        "FEWER2": fewer("hgx-a100-4gpu-nv4-nps4", 2, 2),
    }
    fixtures = []
    for name in ORDER:
        path = FIXTURES / f"{name}.topo"
        fixtures.append(f"### {name}\n\n{fixture_notes(path)}\n\n"
                        f"`terarec-topo --from tests/topology/fixtures/{name}.topo`:\n\n"
                        f"```\n{run(['--from', rel(path)])}\n```\n")
    parts["FIXTURES"] = "\n".join(fixtures)
    text = template
    for k, v in parts.items():
        text = text.replace(f"@{k}@", v)
    text = KEEP.sub(lambda m: keep(m.group(1), m.group(2)), text)
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()

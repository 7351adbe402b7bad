"""``terarec-topo``: discover this machine (or read a saved one), print it and the plan.

    terarec-topo                       # this machine: tables, plan, cost estimate
    terarec-topo --nproc 4 --check     # plan 4 ranks; warn about bad placements (exit 1)
    terarec-topo --nproc 4 --nnodes 2  # 4 of the GPUs, for a 2-node job
    terarec-topo --nproc 16 --backend gloo   # more ranks than GPUs (gloo shares them)
    terarec-topo --json > box.json     # machine + plan + cost as JSON (reload with --from)
    terarec-topo --from box.json       # plan for a saved machine
    terarec-topo --from tests/topology/fixtures/dgx-h200-nvswitch.topo
    terarec-topo --fixture > box.topo  # the machine in the fixture text format

Exit status: 0; 1 with ``--check`` when it found a warning; 2 on bad input (a malformed
file or tool output, named in the message) or a plan that cannot be made (more ranks
than GPUs under NCCL), in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from terarec import __version__
from terarec.topology.cost import BANDWIDTH, StepLoad, estimate
from terarec.topology.facts import load_fixture, machine_to_fixture
from terarec.topology.model import Machine, TopologyError, load_machine, machine_to_dict
from terarec.topology.plan import BACKENDS, DEFAULT_SSD_SUBDIR, make_plan, plan_to_dict
from terarec.topology.report import format_cost, format_findings, format_machine, format_plan


def read_machine(path: str) -> Machine:
    """A saved machine: JSON (``terarec-topo --json``) or text (a fixture / a bare
    ``nvidia-smi topo -m`` capture), told apart by the first character."""
    try:
        head = Path(path).read_text(errors="replace").lstrip()[:1]
    except OSError as e:
        raise TopologyError(f"{path}: cannot read: {e.strerror or e}") from None
    return load_machine(path) if head in ("{", "[") else load_fixture(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="terarec-topo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--version", action="version", version=f"terarec-topo {__version__}")
    p.add_argument("--from", dest="source", metavar="FILE",
                   help="plan for a saved machine (JSON from --json, or a fixture text)")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks to plan (default: one per GPU, else 1)")
    p.add_argument("--backend", choices=BACKENDS, default="nccl",
                   help="the job's collective backend: nccl (at most one rank per GPU; "
                   "default) or gloo (more ranks than GPUs share them)")
    p.add_argument("--nnodes", type=int, default=1,
                   help="nodes in the job: with fewer ranks than GPUs, a multi-node job "
                   "takes GPUs next to distinct NICs first (default 1)")
    p.add_argument("--json", action="store_true",
                   help="print machine, plan and cost estimate as JSON")
    p.add_argument("--fixture", action="store_true",
                   help="print the machine in the fixture text format")
    p.add_argument("--check", action="store_true",
                   help="print only the placement findings; exit 1 if one is a warning")
    p.add_argument("--ssd-subdir", default=DEFAULT_SSD_SUBDIR,
                   help="directory made on the chosen disk for the SSD tier")
    for f, default in asdict(StepLoad()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=float, default=default,
                       help=f"cost model: {f.replace('_', ' ')} per rank per step")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.source:
            machine = read_machine(args.source)
        else:
            from terarec.topology.discover import discover

            machine = discover()
            for w in machine.warnings:
                print(f"terarec-topo: warning: {w}", file=sys.stderr)
        if args.fixture:
            print(machine_to_fixture(machine, [f"captured by terarec-topo --fixture on "
                                               f"{machine.hostname}"]), end="")
            return 0
        plan = make_plan(machine, args.nproc, args.ssd_subdir, backend=args.backend,
                         nnodes=args.nnodes)
    except TopologyError as e:
        print(f"terarec-topo: error: {e}", file=sys.stderr)
        return 2
    load = StepLoad(**{f: getattr(args, f) for f in asdict(StepLoad())})
    est = estimate(machine, plan, load)
    if args.json:
        print(json.dumps({
            "machine": machine_to_dict(machine),
            "plan": plan_to_dict(plan),
            "cost": {"load_mb": asdict(load), "naive": asdict(est)["naive"],
                     "planned": asdict(est)["planned"], "assumptions": est.assumptions,
                     "bandwidth_gb_s": {k: v[0] for k, v in BANDWIDTH.items()}},
        }, indent=1))
    elif args.check:
        print(format_findings(plan))
    else:
        print("\n\n".join([format_machine(machine), format_plan(plan), format_findings(plan),
                           format_cost(est, load)]))
    return 1 if args.check and plan.warnings else 0


if __name__ == "__main__":
    sys.exit(main())

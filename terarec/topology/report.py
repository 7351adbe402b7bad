"""Readable text for ``terarec-topo``: the machine as tables, the plan, the cost estimate."""

from __future__ import annotations

from collections.abc import Sequence

from terarec.topology.cost import CostEstimate, StepLoad
from terarec.topology.model import Machine, format_cpulist
from terarec.topology.plan import Plan, describe_rank


def table(header: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in cells)


def format_machine(m: Machine) -> str:
    smt = f", {m.threads_per_core} threads/core" if m.threads_per_core else ", SMT unknown"
    sockets = f"{m.sockets} socket(s)" if m.sockets else "sockets unknown"
    out = [f"machine {m.hostname} ({sockets}{smt}; from {', '.join(m.sources) or '?'})", "",
           "NUMA nodes:"]
    out.append(table(["node", "socket", "cpus", "count", "memory"],
                     [[n.id, n.socket, format_cpulist(n.cpus), len(n.cpus),
                       f"{n.memory_mb} MB" if n.memory_mb is not None else None]
                      for n in m.numa]))
    if m.gpus:
        out += ["", "GPUs:"]
        out.append(table(["gpu", "name", "bus id", "NUMA", "cpu affinity", "PCIe", "memory"],
                         [[f"GPU{g.index}", g.name or None, g.pci_bus_id, g.numa_node,
                           format_cpulist(g.cpus) or None,
                           f"gen{g.pcie_gen}" if g.pcie_gen else None,
                           f"{g.memory_mb} MB" if g.memory_mb else None] for g in m.gpus]))
        out += ["", "links (nvidia-smi words: NV# < PIX < PXB < PHB < NODE < SYS):"]
        cols = [f"GPU{g.index}" for g in m.gpus] + [n.name for n in m.nics]
        rows = [[f"GPU{i}", *m.gpu_links[i], *(m.gpu_nic_links[i] if m.gpu_nic_links else [])]
                for i in range(len(m.gpus))]
        out.append(table(["", *cols], rows))
    else:
        out += ["", "GPUs: none"]
    out += ["", "NICs:" if m.nics else "NICs: none"]
    if m.nics:
        out.append(table(["nic", "rdma", "netdev", "NUMA", "rate"],
                         [[n.name + ("" if n.named else " (name unknown)"),
                           "?" if n.rdma is None else "yes" if n.rdma else "no", n.netdev,
                           n.numa_node,
                           f"{n.rate_gbps:g} Gb/s" if n.rate_gbps else None] for n in m.nics]))
    out += ["", "disks:" if m.disks else "disks: none" if m.disks_known else
            "disks: not in the input"]
    if m.disks:
        out.append(table(["disk", "kind", "NUMA", "mount", "size", "members"],
                         [[d.name, "nvme" if d.nvme else "disk", d.numa_node, d.mount,
                           f"{d.size_gb:g} GB" if d.size_gb else None,
                           ",".join(d.members) or None] for d in m.disks]))
    return "\n".join(out)


def format_plan(plan: Plan) -> str:
    out = [f"plan for {len(plan.ranks)} local rank(s) on {plan.hostname}:"]
    rows = []
    for r in plan.ranks:
        nic = None
        if r.nic:
            via = f" via GPU{r.relay_gpu}" if r.relay_gpu is not None else ""
            nic = f"{r.nic} ({r.nic_link}{via})" if r.nic_link else r.nic
        rows.append([r.local_rank, f"GPU{r.gpu}" if r.gpu is not None else None, r.numa_node,
                     format_cpulist(r.cpus) or "unpinned", r.omp_threads, nic, r.ssd_dir])
    out.append(table(["rank", "gpu", "NUMA", "cpus", "cores", "nic (link)", "ssd dir"], rows))
    out.append(f"fast groups (local ranks): {plan.fast_groups}")
    if plan.cuda_visible_devices is not None:
        out.append(f"GPUs used: CUDA_VISIBLE_DEVICES={plan.cuda_visible_devices} for the job "
                   "(local rank i takes the i-th; terarec-launch sets it per rank)")
    out.append("environment per rank:")
    for r in plan.ranks:
        env = " ".join(f"{k}={v}" for k, v in sorted(r.env.items()))
        out.append(f"  rank {r.local_rank}: {env}")
    return "\n".join(out)


def format_findings(plan: Plan) -> str:
    """The findings, one a line; led by ``check: no bad placement found`` when none is a
    warning."""
    lines = [] if plan.warnings else ["check: no bad placement found"]
    return "\n".join(lines + [f"{f.level}: {f.text}" for f in plan.findings])


def format_cost(est: CostEstimate, load: StepLoad) -> str:
    out = [f"cost model, one step, all ranks at once (per rank: host->GPU "
           f"{load.host_to_gpu_mb:g} MB, GPU->host {load.gpu_to_host_mb:g} MB, SSD read "
           f"{load.ssd_read_mb:g} MB / write {load.ssd_write_mb:g} MB, cross-node "
           f"{load.net_mb:g} MB):"]
    rows = []
    for phase in ("host", "ssd", "net", "step"):
        n, p = est.naive[phase], est.planned[phase]
        rows.append([phase, f"{n.seconds * 1e3:.1f} ms", n.bottleneck,
                     f"{p.seconds * 1e3:.1f} ms", p.bottleneck, f"{est.speedup(phase):.2f}x"])
    out.append(table(["phase", "naive", "naive bottleneck", "planned", "planned bottleneck",
                      "naive/planned"], rows))
    if est.assumptions:
        out.append("assumed (facts the input does not give):")
        out += [f"  {a}" for a in est.assumptions]
    return "\n".join(out)


def summary_lines(plan: Plan) -> list[str]:
    """One line per rank (what terarec-launch prints before starting the ranks)."""
    return [describe_rank(r) for r in plan.ranks]

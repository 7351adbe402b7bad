"""Logical CPUs -> physical cores, and cores -> disjoint shares for the ranks of a node.

Pure functions over CPU lists; the plan (``plan.py``) calls them per NUMA node.
"""

from __future__ import annotations

from typing import Optional


def core_groups(cpus: list[int], threads_per_core: Optional[int]) -> list[list[int]]:
    """Logical CPUs -> physical cores (lists of hyperthread siblings), in CPU order.

    Linux numbers x86 siblings far apart (``0-55,112-167``: CPU ``c`` and ``c + 112``),
    POWER consecutively (SMT4: ``0-3``). Without sibling facts, a node whose CPU list is
    two equally long, gapped halves at a constant offset is taken as such pairs.
    """
    cpus = sorted(cpus)
    if threads_per_core == 1 or len(cpus) < 2:
        return [[c] for c in cpus]
    half = len(cpus) // 2
    a, b = cpus[:half], cpus[half:]
    if len(cpus) % 2 == 0 and threads_per_core in (None, 2) and b[0] > a[-1] + 1:
        d = b[0] - a[0]
        if all(y - x == d for x, y in zip(a, b)):
            return [[x, y] for x, y in zip(a, b)]
    if threads_per_core and threads_per_core > 1 and len(cpus) % threads_per_core == 0:
        k = threads_per_core
        return [cpus[i:i + k] for i in range(0, len(cpus), k)]
    return [[c] for c in cpus]


def split_cores(cores: list[list[int]], k: int) -> list[list[list[int]]]:
    """``cores`` into ``k`` contiguous shares (sizes differ by at most one); with fewer
    cores than shares, share ``j`` gets core ``j % len(cores)``."""
    if not cores:
        return [[] for _ in range(k)]
    if len(cores) < k:
        return [[cores[j % len(cores)]] for j in range(k)]
    n = len(cores)
    return [cores[j * n // k:(j + 1) * n // k] for j in range(k)]


def smt_note(nodes: dict[Optional[int], list[int]], threads_per_core: Optional[int]
             ) -> Optional[str]:
    """What the core split assumed when the SMT width is unknown (None when it is known
    or there is nothing to say): which nodes' CPU lists were taken as hyperthread pairs,
    and which as one CPU per core."""
    if threads_per_core is not None or not nodes:
        return None
    order = sorted(nodes, key=lambda n: (n is None, n or 0))
    paired = [n for n in order if any(len(c) > 1 for c in core_groups(nodes[n], None))]
    single = [n for n in order if n not in paired]
    parts = []
    if paired:
        parts.append(f"NUMA {', '.join(map(str, paired))}: CPU lists of two equal halves at a "
                     "constant offset taken as hyperthread pairs")
    if single:
        parts.append(f"NUMA {', '.join(map(str, single))}: each CPU taken as a core")
    return "SMT unknown: " + "; ".join(parts)

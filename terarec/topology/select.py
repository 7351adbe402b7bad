"""Which GPUs a node's ranks drive when there are fewer ranks than GPUs.

Rule (docs/topology.md):

* a **multi-node** job takes GPUs next to distinct NICs first (the nearest link to a NIC
  card no chosen GPU uses yet: PIX < PXB < PHB < NODE < SYS; ports ``PIX`` to each other
  count as one card), then the GPUs nearest to any NIC;
* a **single-node** job keeps its ranks inside one fast group first: an NVLink island
  (without NVLink: the GPUs PCIe joins within a NUMA node) that holds them all, the one
  spanning the most sockets; then the groups most NVLinked to the chosen GPUs;
* ties spread over sockets (over NUMA nodes where sockets are unknown), then go to more
  NVLinks to the GPUs already chosen, then to nearer PCIe links, then the lower index.

Ranks take the chosen GPUs in ascending index order. Pure: a :class:`Machine` in.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from terarec.topology.model import Machine, nvlinks, relation_rank

_FAR = relation_rank("SYS") + 1  # no NIC at all


def islands(m: Machine) -> list[list[int]]:
    """The fast groups over all the machine's GPUs (:func:`gpu_groups`)."""
    return gpu_groups(m, list(range(len(m.gpus))))


def gpu_groups(m: Machine, gpus: list[int]) -> list[list[int]]:
    """Fast groups of ``gpus``, each ascending, ordered by their first GPU: connected
    components of the ``NV#`` links among them (NVLink islands); where none of them has
    NVLink, of the PCIe links within a NUMA node (up to ``NODE``)."""
    any_nv = any(nvlinks(m.gpu_links[a][b]) for a in gpus for b in gpus if a != b)

    def joined(a: int, b: int) -> bool:
        rel = m.gpu_links[a][b]
        return nvlinks(rel) > 0 if any_nv else relation_rank(rel) <= relation_rank("NODE")

    seen: set[int] = set()
    out = []
    for start in gpus:
        if start in seen:
            continue
        comp, todo = [], [start]
        seen.add(start)
        while todo:
            g = todo.pop()
            comp.append(g)
            for h in gpus:
                if h not in seen and joined(g, h):
                    seen.add(h)
                    todo.append(h)
        out.append(sorted(comp))
    return sorted(out)


def _domain(m: Machine, g: int) -> Optional[int]:
    """A GPU's socket, else its NUMA node (a spreading key only, never taken for a
    socket elsewhere)."""
    node = m.gpus[g].numa_node
    s = m.socket_of(node)
    return s if s is not None else (None if node is None else -1 - node)


def choose_gpus(m: Machine, nproc: int, multi_node: bool) -> list[int]:
    """The ``nproc`` GPUs (``nproc <= len(m.gpus)``) a node's ranks drive, ascending;
    every GPU when ``nproc`` equals their number."""
    n = len(m.gpus)
    if nproc >= n:
        return list(range(n))
    cards = m.nic_cards()
    domains = {g: _domain(m, g) for g in range(n)}
    groups = islands(m)
    island_of = {g: i for i, isl in enumerate(groups) for g in isl}
    home = min(range(len(groups)), key=lambda i: (
        len(groups[i]) < nproc, -len({domains[g] for g in groups[i]}), groups[i][0]))
    chosen: list[int] = []
    used_cards: set[int] = set()
    load: Counter[Optional[int]] = Counter()

    usable = {k for k, nic in enumerate(m.nics) if nic.rdma is not False} or \
        set(range(len(m.nics)))  # the NICs the plan would pick from

    def nic_rank(g: int, free_only: bool) -> tuple[int, Optional[int]]:
        links = m.nic_links(g) if m.nics else []
        best = [(relation_rank(rel), cards[k]) for k, rel in enumerate(links)
                if k in usable and not (free_only and cards[k] in used_cards)]
        return min(best, default=(_FAR, None))

    def key(g: int) -> tuple:
        bonds = -sum(nvlinks(m.gpu_links[g][c]) for c in chosen)
        near = sum(relation_rank(m.gpu_links[g][c]) for c in chosen)
        spread = (load[domains[g]], bonds, near, g)
        if multi_node:
            return (nic_rank(g, True)[0], nic_rank(g, False)[0], *spread)
        return (island_of[g] != home, bonds if island_of[g] != home else 0, *spread)

    while len(chosen) < nproc:
        g = min((g for g in range(n) if g not in chosen), key=key)
        _, card = nic_rank(g, True)
        if card is not None:
            used_cards.add(card)
        chosen.append(g)
        load[domains[g]] += 1
    return sorted(chosen)

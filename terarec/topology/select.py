"""Which GPUs a node's ranks drive when there are fewer ranks than GPUs.

Rule (docs/topology.md):

* a **multi-node** job takes GPUs next to distinct NICs first (the nearest link to a NIC
  card no chosen GPU uses yet: PIX < PXB < PHB < NODE < SYS; ports ``PIX`` to each other
  count as one card), then the GPUs nearest to any NIC;
* a **single-node** job keeps its ranks inside one NVLink island first (an island that
  holds them all, the one spanning the most sockets; then the islands most NVLinked to
  the chosen GPUs);
* ties spread over sockets (over NUMA nodes where sockets are unknown), then more
  NVLinks to the GPUs already chosen, then the lower index.

Ranks take the chosen GPUs in ascending index order. Pure: a :class:`Machine` in.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from terarec.topology.model import Machine, nvlinks, relation_rank

_FAR = relation_rank("SYS") + 1  # no NIC at all


def nvlink_islands(m: Machine) -> list[list[int]]:
    """Connected components of the ``NV#`` links over all GPUs, each ascending."""
    n = len(m.gpus)
    seen: set[int] = set()
    out = []
    for start in range(n):
        if start in seen:
            continue
        comp, todo = [], [start]
        seen.add(start)
        while todo:
            g = todo.pop()
            comp.append(g)
            for h in range(n):
                if h not in seen and nvlinks(m.gpu_links[g][h]):
                    seen.add(h)
                    todo.append(h)
        out.append(sorted(comp))
    return out


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
    islands = nvlink_islands(m)
    island_of = {g: i for i, isl in enumerate(islands) for g in isl}
    home = min(range(len(islands)), key=lambda i: (
        len(islands[i]) < nproc, -len({domains[g] for g in islands[i]}), islands[i][0]))
    chosen: list[int] = []
    used_cards: set[int] = set()
    load: Counter[Optional[int]] = Counter()

    def nic_rank(g: int, free_only: bool) -> tuple[int, Optional[int]]:
        links = m.nic_links(g) if m.nics else []
        best = [(relation_rank(rel), cards[k]) for k, rel in enumerate(links)
                if not (free_only and cards[k] in used_cards)]
        return min(best, default=(_FAR, None))

    def key(g: int) -> tuple:
        bonds = -sum(nvlinks(m.gpu_links[g][c]) for c in chosen)
        spread = (load[domains[g]], bonds, g)
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

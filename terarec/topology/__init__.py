"""terarec.topology: discover the machine, plan each local rank's placement and routes.

``discover()`` -> :class:`Machine` (plain data, JSON round-trip) -> ``make_plan()`` ->
:class:`Plan` (CPU cores, memory node, NIC / relay GPU, SSD directory, fast groups,
environment per local rank) -> ``estimate()`` (naive vs planned transfer cost).
``terarec-topo`` prints all of it; ``terarec-launch`` applies the plan. Imports only the
standard library (and nvidia-ml-py when installed). See docs/topology.md.
"""

from terarec.topology.model import Machine, TopologyError, load_machine
from terarec.topology.plan import Plan, RankPlan, make_plan

__all__ = ["Machine", "Plan", "RankPlan", "TopologyError", "load_machine", "make_plan"]

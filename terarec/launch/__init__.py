"""terarec.launch: launch environments, process groups, failure detection, terarec-launch.

``init_distributed(cfg.dist)`` turns whichever launcher started this process (torchrun,
mpirun, Slurm, or none) into an initialised process group with per-node fast groups and
cross-node groups (:class:`DistContext`). ``env.py`` is the only module in terarec that
reads launcher variables. See docs/distributed.md.
"""

from terarec.launch.env import LaunchEnv, LaunchError, read_launch_env
from terarec.launch.groups import DistContext, init_distributed
from terarec.launch.health import PeerFailure

__all__ = [
    "DistContext",
    "LaunchEnv",
    "LaunchError",
    "PeerFailure",
    "init_distributed",
    "read_launch_env",
]

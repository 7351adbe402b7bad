"""``python -m terarec.topology``: the same as ``terarec-topo``."""

import sys

from terarec.topology.cli import main

sys.exit(main())

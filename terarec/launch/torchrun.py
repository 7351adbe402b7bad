"""torchrun, ending a failed job with one line instead of torch's traceback.

``terarec-launch`` runs ``python -m terarec.launch.torchrun <torchrun options> ...``:
torch's own ``torch.distributed.run`` (every option, signal, restart and exit as
torchrun's), except that when the ranks fail (after any ``--max-restarts``) it prints
one line naming the first rank that failed and its exit code, and exits with that code
(``128 + N`` for a rank killed by signal ``N``), instead of torch's ``ChildFailedError``
traceback and its per-rank report; the rank's own message stays above it. The elastic
agent's log lines are left out (the one line says what they would).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import Optional

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

SAID_DIR = "TERAREC_SAID_DIR"


def exit_code(code: int) -> int:
    """A rank's exit status as the shell reports it: ``128 + N`` when killed by signal
    ``N`` (torch reports ``-N``); at least 1."""
    return 128 - code if code < 0 else max(code, 1)


def main(argv: Optional[list[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    # torchrun prints a banner when it sets OMP_NUM_THREADS=1 itself: set it quietly
    # (ranks set their own thread counts from train.threads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # where this node's ranks mark an error one of them printed, so that an error every
    # rank meets (a config error) is printed once (terarec.cli)
    said = tempfile.mkdtemp(prefix="terarec-said-")
    os.environ[SAID_DIR] = said
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = exit_code(failure.exitcode)
        print(f"terarec-launch: rank {rank} (local rank {failure.local_rank}) exited with "
              f"code {code}; its error is above. The other ranks were stopped.",
              file=sys.stderr, flush=True)
        return code
    finally:
        shutil.rmtree(said, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CUDA graphs for the scorer's programs.

On a GPU a request is bound by host work: every operator of the user and candidate
programs is a Python call and a kernel launch, while the math itself takes microseconds.
:class:`GraphedProgram` records a program once as a CUDA graph and then replays the whole
program with one launch. A graph has fixed shapes, so the batch (candidates or users) is
padded to a bucket: the next power of two from ``min_bucket`` up, one graph per bucket
and per shape of the other arguments, recorded the first time a request needs it. Rows
are independent in every program (no batch statistics at inference), so the padding rows
(zeros, or an earlier request's values) change nothing in the real rows; the outputs are
the first ``n`` rows, copied out of the graph's buffers.

Weights stay where the program has them: a live delta's ``load_state_dict`` copies into
the same tensors, which the graphs read at their next replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

MAX_BUCKET = 1 << 16  # batches above it run the program as it is


def bucket(n: int, min_bucket: int) -> int:
    """The padded batch of ``n`` rows: the smallest ``min_bucket * 2**k >= n``."""
    b = max(1, min_bucket)
    while b < n:
        b *= 2
    return b


class GraphedProgram:
    """``program`` replayed as CUDA graphs (see the module docstring).

    Args:
        program: the program's module, in eval mode, its weights on a CUDA device.
        batch_args: positions of the tensor arguments whose first dimension is the
            batch; the others are passed whole (their shapes are part of the key).
        min_bucket: the smallest padded batch.

    Attributes:
        graphs: the recorded graphs by key ``(bucket, shapes and dtypes)``.
    """

    def __init__(self, program: Callable[..., Any], batch_args: Sequence[int],
                 min_bucket: int) -> None:
        self.program, self.batch_args = program, tuple(batch_args)
        self.min_bucket = min_bucket
        self.graphs: dict[tuple[Any, ...], tuple[list[torch.Tensor], Any, Any]] = {}

    def __call__(self, *args: torch.Tensor) -> Any:
        """The program's outputs for ``args`` (each output's first ``n`` rows when the
        program has a batch)."""
        n = args[self.batch_args[0]].shape[0] if self.batch_args else 0
        if n > MAX_BUCKET or not all(a.is_cuda for a in args):
            return self.program(*args)
        b = bucket(n, self.min_bucket) if self.batch_args else 0
        key = (b, *((tuple(a.shape[1:] if i in self.batch_args else a.shape), a.dtype)
                    for i, a in enumerate(args)))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._record(b, args)
        inputs, out, graph = entry
        for i, (buf, a) in enumerate(zip(inputs, args)):
            (buf[:n] if i in self.batch_args else buf).copy_(a)
        graph.replay()
        take = (lambda t: t[:n].clone()) if self.batch_args else (lambda t: t.clone())
        return tuple(map(take, out)) if isinstance(out, (tuple, list)) else take(out)

    def _record(self, b: int, args: Sequence[torch.Tensor]
                ) -> tuple[list[torch.Tensor], Any, torch.cuda.CUDAGraph]:
        """The graph of bucket ``b``: static input buffers (``args`` copied in, padding
        zeros), the output tensors it writes, the graph."""
        inputs = []
        for i, a in enumerate(args):
            if i in self.batch_args:
                buf = a.new_zeros((b, *a.shape[1:]))
                buf[: a.shape[0]].copy_(a)
            else:
                buf = a.clone()
            inputs.append(buf)
        side = torch.cuda.Stream(device=inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles, workspaces)
            for _ in range(2):
                self.program(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (a bundle being loaded) is no error
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.program(*inputs)
        return inputs, out, graph

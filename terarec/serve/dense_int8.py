"""Int8 dense layers for CPU serving: a loaded program's linear layers on FBGEMM's int8
GEMM (``Scorer(dense_dtype="int8")``, ``terarec serve --dense-dtype int8``).

Per request the candidate program's cost is its top MLP over ``N`` candidates; on a
CPU that is float32 GEMM time. This pass rewrites every ``aten.linear`` of an exported
program whose weight is a constant of the program into torch's dynamic-quantized
linear (``quantized::linear_dynamic``, FBGEMM on x86): weights int8, symmetric, one
scale per output row; activations quantized per call (per tensor, asymmetric, 7 bits:
``reduce_range``, which keeps AVX2's 16-bit accumulation from saturating); int32
accumulation; float32 out. Everything else in the program (dot products, adds,
ReLUs) stays float32.

Precision: the scores move by the rounding of the weights and activations (a few 1e-3
in logit for the shipped models); ``tests/serve/test_dense_int8.py`` holds the eval
AUC within 0.001 of the float32 bundle's. Uses torch's quantized CPU ops (present in
the pinned torch, which marks its eager quantization API deprecated); without them the
scorer says so.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch
from torch import fx


class DenseInt8Unavailable(RuntimeError):
    """This torch build has no quantized CPU linear (``quantized::linear_dynamic``)."""


def pack_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Any:
    """Float weight ``[out, in]`` (+ bias ``[out]``) → FBGEMM's packed int8 weight:
    symmetric per-row scales ``max|w_row| / 127`` (zero rows: scale 1)."""
    w = weight.detach().to(torch.float32).contiguous()
    scale = (w.abs().amax(1) / 127.0).to(torch.float64)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.zeros(w.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():  # torch marks quantized tensor creation deprecated
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        return torch.ops.quantized.linear_prepack(qw, b)


def _attr(gm: fx.GraphModule, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), gm)


MIN_WEIGHTS = 32_768  # smaller layers cost less in float32 than quantizing their input


def quantize_linears(gm: fx.GraphModule, min_weights: int = MIN_WEIGHTS) -> int:
    """Rewrites ``gm`` in place: each ``aten.linear(x, W[, b])`` with ``W`` (and ``b``)
    attributes of ``gm`` and at least ``min_weights`` weights becomes
    ``quantized.linear_dynamic(x, packed(W, b))``.

    The float weights stay parameters of ``gm`` (so ``load_state_dict`` still takes a
    delta's weights); :func:`repack_linears` re-quantizes them after a load.

    Returns:
        the number of linear layers rewritten.

    Raises:
        DenseInt8Unavailable: torch has no quantized CPU linear.
    """
    if not (hasattr(torch.ops.quantized, "linear_dynamic")
            and "fbgemm" in torch.backends.quantized.supported_engines):
        raise DenseInt8Unavailable(
            "dense int8 needs torch's quantized CPU linear (quantized::linear_dynamic on "
            "FBGEMM), which this torch build lacks; serve with dense float32")
    graph, done = gm.graph, 0
    sources: list[tuple[str, str, Optional[str]]] = []  # packed name, weight, bias
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        x, w_node, *rest = node.args
        b_node = rest[0] if rest else None
        consts = [a for a in (w_node, b_node) if a is not None]
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in consts):
            continue  # a weight computed in the graph stays float32
        weight = _attr(gm, w_node.target)
        if weight.dim() != 2 or weight.numel() < min_weights:
            continue
        bias = _attr(gm, b_node.target) if b_node is not None else None
        name = f"_int8_linear_{done}"
        setattr(gm, name, pack_linear(weight, bias))
        sources.append((name, w_node.target, b_node.target if b_node is not None else None))
        with graph.inserting_before(node), warnings.catch_warnings():
            # fx only knows modules, parameters and buffers; a packed weight is a
            # torchbind object, read as an attribute all the same
            warnings.filterwarnings("ignore", "Attempted to insert a get_attr Node")
            packed = graph.get_attr(name)
            new = graph.call_function(torch.ops.quantized.linear_dynamic.default,
                                      (x, packed, True))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for a in consts:  # the float weights, unless something else reads them
            if not a.users:
                graph.erase_node(a)
        done += 1
    graph.lint()
    gm.recompile()
    gm._int8_sources = sources  # type: ignore[assignment]
    return done


def repack_linears(gm: fx.GraphModule) -> None:
    """Re-quantizes the linear layers :func:`quantize_linears` rewrote from ``gm``'s
    current float weights (after ``load_state_dict``)."""
    for name, w, bias in getattr(gm, "_int8_sources", []):
        setattr(gm, name, pack_linear(_attr(gm, w), _attr(gm, bias) if bias else None))

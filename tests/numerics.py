"""Float tolerances for the tests, derived from the arithmetic instead of tuned to a CPU.

Why tolerances are needed at all: ATen's vectorised kernels (AVX-512, AVX2, the scalar
``default`` build), several ranks against one process, a fused kernel against separate
passes, all compute the same quantity with its sums (dot products, matmuls, reductions,
all-reduces) in a different *order*. Float addition is not associative, so the results
differ in the last bits, and the difference depends on the machine. A tolerance that was
measured on one CPU fails on the next one; these are derived instead:

* One float operation rounds its exact result to the nearest float: the error is at
  most ``eps / 2`` relative (``eps`` = 2**-23 for float32, 2**-52 for float64).
* A sum of ``terms`` numbers, in any order, is within ``(terms - 1) eps / 2 * sum|x_i|``
  of the exact sum (the worst case of recursive summation; blocked and pairwise
  summation do better). Two orders of the same sum therefore differ by at most
  ``eps * terms * sum|x_i|``: :func:`f32_tol` with ``magnitude = sum|x_i|`` (or the size
  of the compared value when the terms do not cancel) and ``terms``.
* Training repeats that: ``steps`` updates each add their own rounding error to the
  state (rows, weights, optimizer moments), and the errors add up, so a bound after
  ``steps`` steps is ``steps`` times the one-step bound (linear growth: the worst case;
  independent errors grow like ``sqrt(steps)``).
* Adam divides by ``sqrt(v)``: it normalises every update to about ``lr`` whatever the
  gradient's size, so a rounding difference *relative to the gradient* becomes an
  absolute difference of that size times ``lr`` in the weight (:func:`train_tol`). SGD
  scales it by ``lr * |g|`` instead.
* A training loss (:func:`loss_tol`) is its own float32 sum of per-sample terms,
  computed from weights that carry every earlier step's drift.
* Where the reference can run in float64 (a dense ``nn.EmbeddingBag`` + SGD or
  Adagrad, a hand re-enactment, numpy metrics), it does: its own error is ~2**-29 times
  smaller, so the bound only has to cover the float32 error of the code under test.
  Adam's reference stays float32 (``tests/ps/test_embedding_equivalence.reference_dtype``
  says why).

What is *not* a tolerance: results of the same process with the same kernels (tiers
against an unbounded table, a resumed run against the straight one, replicas after a
merge) are compared bit for bit; quantisation bounds (an int8 step ``s / 2``, a bfloat16
rounding) are bounds of the format, not of the CPU. Those stay exact.

The bounds are worst cases: far above the differences any CPU shows (rounding errors
rarely all point one way), and still far below the effect of a real bug: a missed or
doubled update moves a weight by ``lr * |g|`` (SGD) or ~``lr`` (Adam, Adagrad), e.g.
0.05, against bounds of 1e-6 to a few 1e-4. ``TERAREC_TOL_LOG=FILE`` appends every
:func:`assert_close` (test, what, worst difference, bound) to ``FILE``, to see the
headroom on a given CPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Union

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2**-23 ~ 1.19e-7
EPS64 = torch.finfo(torch.float64).eps  # 2**-52 ~ 2.22e-16
EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 2**-7: 8 significant bits

Number = Union[float, int]
Values = Union[torch.Tensor, Number, Sequence[Number]]


def rounding_tol(eps: float, magnitude: float = 1.0, steps: int = 1, terms: int = 1) -> float:
    """``eps * magnitude * steps * terms``: how far two computations of one quantity in
    a format with machine epsilon ``eps`` can drift apart.

    Args:
        eps: the format's machine epsilon (:data:`EPS32`, :data:`EPS64`, ...).
        magnitude: the size the rounding is relative to: ``sum|x_i|`` of the reduction
            that produces the value, or the value's size when its terms do not cancel.
        steps: sequential updates whose rounding errors add up (training steps).
        terms: rounding steps per update: the length of the longest sum whose order
            may differ (worst case: the error grows linearly with it), or the number of
            separately rounded operations.
    """
    if magnitude < 0 or steps < 1 or terms < 1:
        raise ValueError(f"magnitude {magnitude}, steps {steps}, terms {terms}")
    return eps * magnitude * steps * terms


def f32_tol(magnitude: float = 1.0, steps: int = 1, terms: int = 1) -> float:
    """:func:`rounding_tol` for float32 (``eps`` = 2**-23)."""
    return rounding_tol(EPS32, magnitude, steps, terms)


def f64_tol(magnitude: float = 1.0, steps: int = 1, terms: int = 1) -> float:
    """:func:`rounding_tol` for float64 (``eps`` = 2**-52): float64 references and
    metrics computed in float64."""
    return rounding_tol(EPS64, magnitude, steps, terms)


def train_tol(
    lr: float, steps: int, terms: int = 1, magnitude: float = 1.0, grad: float = 1.0
) -> float:
    """Weights after ``steps`` optimizer steps computed two ways whose gradients sum
    ``terms`` contributions in different orders: ``eps32 * steps * (magnitude + lr *
    grad * terms)``.

    Each step rounds the weight (``magnitude``: its size) and moves it by an update
    computed from a gradient that differs by up to ``eps32 * terms`` relative. Adam and
    Adagrad divide the gradient by the root of its accumulated squares, so the update
    is ~``lr`` whatever the gradient's size (``grad=1``) and a relative difference of
    the gradient becomes an absolute one of ``lr`` times it: the m / sqrt(v)
    amplification of tiny gradients. SGD's update is ``lr * g``: pass ``grad`` = the
    largest ``|g|`` (:func:`max_grad`). ``terms``: the number of values of the batch,
    the most contributions one gradient entry can sum.
    """
    return f32_tol(magnitude + lr * grad * terms, steps)


def loss_tol(loss: float, step: int, terms: int) -> float:
    """A training loss at (0-based) ``step`` computed two ways: a float32 sum of
    ``terms`` per-sample terms (its own rounding: ``terms`` roundings of its size), over
    weights that carry ``step`` steps of drift (about one rounding of the loss's size
    each). Relative to ``max(1, |loss|)``.
    """
    return f32_tol(max(1.0, abs(loss)), terms=terms + step)


def max_grad(params: Sequence[torch.Tensor]) -> float:
    """The largest ``|gradient entry|`` of ``params`` (sparse or dense ``.grad``)."""
    out = 0.0
    for p in params:
        g = p.grad
        if g is None:
            continue
        v = g.coalesce().values() if g.is_sparse else g
        if v.numel():
            out = max(out, float(v.abs().max()))
    return out


def assert_close(
    got: Values, want: Values, tol: Union[float, torch.Tensor], what: str = ""
) -> None:
    """``|got - want| <= tol`` elementwise (``tol``: a number, or a tensor of per-element
    bounds broadcast against the values); nan must meet nan.

    The message names the worst element, its difference and its bound. With
    ``TERAREC_TOL_LOG`` set, the worst ratio difference / bound is logged there.
    """
    a, b = _as_tensors(got, want)
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    bound = _float64(tol).expand_as(a) if a.dim() else _float64(tol)
    assert bool((bound >= 0).all()), f"{what}: a negative tolerance {tol}"
    if a.numel() == 0:
        return
    diff = (a - b).abs()
    both_nan = a.isnan() & b.isnan()
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    over = diff.isnan() | (diff > bound)
    ratio = torch.where(bound > 0, diff / bound, torch.where(diff > 0, math.inf, 0.0))
    ratio = torch.where(diff.isnan(), math.inf, ratio)
    worst = int(ratio.reshape(-1).argmax())
    d, t = float(diff.reshape(-1)[worst]), float(bound.reshape(-1)[worst])
    _log(what, d, t)
    if bool(over.any()):
        where = tuple(torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        at = f" at {tuple(int(i) for i in where)}" if where else ""
        raise AssertionError(
            f"{what}: |got - want| = {d:.3g}{at} exceeds the bound {t:.3g} "
            f"({int(over.sum())} of {a.numel()} elements over; got {float(a.reshape(-1)[worst])!r},"
            f" want {float(b.reshape(-1)[worst])!r})"
        )


def _as_tensors(got: Values, want: Values) -> tuple[torch.Tensor, torch.Tensor]:
    return _float64(got), _float64(want)


def _float64(x: Values) -> torch.Tensor:
    """``x`` as a float64 CPU tensor; Python numbers are read as float64 (not through
    torch's float32 default)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def _log(what: str, diff: float, tol: float) -> None:
    path = os.environ.get("TERAREC_TOL_LOG")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    ratio = diff / tol if tol > 0 else (math.inf if diff > 0 else 0.0)
    with open(path, "a") as f:
        f.write(f"{test}\t{what}\t{diff:.3e}\t{tol:.3e}\t{ratio:.3f}\n")

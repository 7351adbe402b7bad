"""One Triton kernel per sparse row optimizer: rows updated **in place by slot**.

The torch path of :mod:`terarec.optim.sparse` gathers the rows of a batch
(``rows = storage[slots]``, ``[U, dim + S]``), runs the optimizer as ~10 elementwise
passes over that copy and scatters it back: on a GPU that moves every row ~12 times.
These kernels read each row's weights + state and its gradient once and write the row
once, in the storage itself::

    storage [N, W] (W = dim + S), slots [U] unique (-1: skip), grad [U, dim]
    for u in parallel:  row = storage[slots[u]];  row = opt(row, grad[u]);  store

The arithmetic follows the torch reference operation by operation (IEEE ``sqrt_rn`` /
``div_rn``), so results agree to float32 rounding (fused multiply-adds aside); the tests
compare both paths, on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch

try:  # optional: present with CUDA torch builds, absent on CPU CI
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

# Optimizer codes of the kernel (constexpr: one compiled variant each).
SGD, ADAGRAD, ROWWISE_ADAGRAD, ADAM = 0, 1, 2, 3


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (CUDA, or CPU under the interpreter)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _row_update_kernel(
        storage_ptr,
        slots_ptr,
        grad_ptr,
        n,
        stride_row,
        stride_grad,
        lr,
        eps,
        beta1,
        beta2,
        step_size,
        DIM: tl.constexpr,
        OPT: tl.constexpr,
        BLOCK_U: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        u = pid * BLOCK_U + tl.arange(0, BLOCK_U)
        in_batch = u < n
        slot = tl.load(slots_ptr + u, mask=in_batch, other=-1)
        live = in_batch & (slot >= 0)
        cols = tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols[None, :] < DIM)
        row = storage_ptr + slot.to(tl.int64)[:, None] * stride_row + cols[None, :]
        g = tl.load(grad_ptr + u.to(tl.int64)[:, None] * stride_grad + cols[None, :],
                    mask=mask, other=0.0)
        w = tl.load(row, mask=mask, other=0.0)
        if OPT == 0:  # SGD: w -= lr * g
            w = w + (-lr) * g
        elif OPT == 1:  # Adagrad: s += g^2; w -= lr * g / (sqrt(s) + eps)
            s = tl.load(row + DIM, mask=mask, other=0.0)
            s = s + g * g
            tl.store(row + DIM, s, mask=mask)
            w = w + (-lr) * tl.div_rn(g, tl.sqrt_rn(s) + eps)
        elif OPT == 2:  # row-wise Adagrad: s += mean(g^2) (one accumulator per row)
            s_ptr = storage_ptr + slot.to(tl.int64) * stride_row + DIM
            s = tl.load(s_ptr, mask=live, other=0.0)
            s = s + tl.sum(g * g, axis=1) / DIM
            tl.store(s_ptr, s, mask=live)
            w = w + (-lr) * tl.div_rn(g, tl.sqrt_rn(s)[:, None] + eps)
        else:  # Adam (torch SparseAdam's order): m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2)
            m = tl.load(row + DIM, mask=mask, other=0.0)
            v = tl.load(row + 2 * DIM, mask=mask, other=0.0)
            m = m + (g - m) * (1.0 - beta1)
            v = v + (g * g - v) * (1.0 - beta2)
            tl.store(row + DIM, m, mask=mask)
            tl.store(row + 2 * DIM, v, mask=mask)
            w = w + (-step_size) * tl.div_rn(m, tl.sqrt_rn(v) + eps)
        tl.store(row, w, mask=mask)


def row_update_(
    storage: torch.Tensor,
    slots: torch.Tensor,
    grad: torch.Tensor,
    opt: int,
    *,
    lr: float,
    eps: float = 0.0,
    beta1: float = 0.0,
    beta2: float = 0.0,
    step_size: float = 0.0,
) -> None:
    """Applies optimizer ``opt`` to ``storage[slots]`` in place.

    Args:
        storage: float32 ``[N, W]``, rows contiguous (``W = dim + state width``).
        slots: int64 ``[U]``, unique; -1 entries are skipped.
        grad: float32 ``[U, dim]``, summed per key.
        opt: ``SGD``, ``ADAGRAD``, ``ROWWISE_ADAGRAD`` or ``ADAM``.
        step_size: Adam only: ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``.
    """
    if triton is None:
        raise RuntimeError("the fused row optimizer needs triton")
    n = slots.numel()
    if n == 0:
        return
    dim = grad.shape[1]
    if storage.dtype != torch.float32 or storage.stride(1) != 1:
        raise ValueError("fused row update: storage must be float32 with contiguous rows")
    grad = grad.to(torch.float32).contiguous()
    slots = slots.to(torch.int64).contiguous()
    block_d = triton.next_power_of_2(dim)
    block_u = max(1, min(64, 2048 // block_d))
    grid = (triton.cdiv(n, block_u),)
    _row_update_kernel[grid](
        storage, slots, grad, n, storage.stride(0), grad.stride(0),
        float(lr), float(eps), float(beta1), float(beta2), float(step_size),
        DIM=dim, OPT=opt, BLOCK_U=block_u, BLOCK_D=block_d,
        num_warps=4,
    )

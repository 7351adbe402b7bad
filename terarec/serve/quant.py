"""Row encodings of an export bundle: fp32, fp16, or int8 row-wise.

A stored row is raw little-endian bytes:

* ``fp32``: ``dim`` float32 (4 ``dim`` bytes; the trained weights as they are);
* ``fp16``: ``dim`` float16 (2 ``dim`` bytes);
* ``int8``: FBGEMM's fused 8-bit row-wise layout, ``dim`` uint8 codes then the row's
  float32 scale and float32 bias (``dim + 8`` bytes); ``w = code * scale + bias`` with
  ``scale = (max - min) / 255`` and ``bias = min`` of the row. FBGEMM's
  ``FloatToFused8BitRowwiseQuantized`` / ``Fused8BitRowwiseQuantizedToFloat`` ops do
  the work where they are loaded; the torch code here is the same arithmetic (tested
  against them: the same scales and biases, a code one apart at a rounding tie).
"""

from __future__ import annotations

import torch

DTYPES = ("fp32", "fp16", "int8")


def row_bytes(dtype: str, dim: int) -> int:
    """Bytes of one stored row."""
    return {"fp32": 4 * dim, "fp16": 2 * dim, "int8": dim + 8}[check_dtype(dtype)]


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"row dtype: {dtype!r} is not one of {list(DTYPES)}")
    return dtype


def _fbgemm(name: str) -> object | None:
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

        return getattr(torch.ops.fbgemm, name)
    except (ImportError, AttributeError, RuntimeError):
        return None


def quantize(rows: torch.Tensor, dtype: str, use_fbgemm: bool = True) -> torch.Tensor:
    """float32 ``[N, dim]`` rows → uint8 ``[N, row_bytes]`` stored rows (CPU)."""
    rows = rows.detach().to("cpu", torch.float32).contiguous()
    if check_dtype(dtype) == "fp32":
        return rows.view(torch.uint8).reshape(rows.shape[0], -1)
    if dtype == "fp16":
        return rows.to(torch.float16).view(torch.uint8).reshape(rows.shape[0], -1)
    op = _fbgemm("FloatToFused8BitRowwiseQuantized") if use_fbgemm else None
    if op is not None and rows.shape[0]:
        return op(rows)  # type: ignore[operator]
    lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    scale = (hi - lo) / 255.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.round((rows - lo) * inv).clamp_(0, 255).to(torch.uint8)
    tail = torch.cat([scale, lo], 1).contiguous().view(torch.uint8)
    return torch.cat([codes, tail], 1)


def dequantize(raw: torch.Tensor, dtype: str, dim: int, use_fbgemm: bool = True
               ) -> torch.Tensor:
    """uint8 ``[N, row_bytes]`` stored rows → float32 ``[N, dim]``."""
    n = raw.shape[0]
    if check_dtype(dtype) == "fp32":
        return raw.contiguous().view(torch.float32).reshape(n, dim)
    if dtype == "fp16":
        return raw.contiguous().view(torch.float16).reshape(n, dim).float()
    op = _fbgemm("Fused8BitRowwiseQuantizedToFloat") if use_fbgemm else None
    if op is not None and n:
        return op(raw.contiguous())  # type: ignore[operator]
    tail = raw[:, dim:].contiguous().view(torch.float32)
    return raw[:, :dim].float() * tail[:, :1] + tail[:, 1:2]

"""Plain-PyTorch implementations of every salr op: the ground truth the kernels are tested against.

They run on any device and are the ops' default implementations (used where no kernel is registered).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from salr.bitmap_format import QuantizedValues, decode_dense, dequantize_values, row_counts


def bitmap_linear_reference(
    x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """y = x @ W.T: x [..., cols] -> [..., rows] in x.dtype (the weight is cast to x's dtype)."""
    return F.linear(x, decode_dense(bitmask, values, rows, cols).to(x.dtype))


def bitmap_grad_input_reference(
    grad: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """grad_x = grad_y @ W: grad [..., rows] -> [..., cols] in grad.dtype."""
    return torch.matmul(grad, decode_dense(bitmask, values, rows, cols).to(grad.dtype))


def adapter_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """((x A.T) * scale) B.T in the adapters' dtype: x [..., in], A [r, in], B [out, r], scale [r] -> [..., out]."""
    return F.linear(F.linear(x.to(A.dtype), A) * scale, B)


def salr_linear_reference(
    x: torch.Tensor,
    bitmask: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """A whole SALR layer on a bitmap base: x W.T + bias + ((x A.T) * scale) B.T, in x.dtype."""
    y = bitmap_linear_reference(x, bitmask, values, row_offsets, rows, cols)
    if bias is not None:
        y = y + bias.to(y.dtype)
    if A.shape[0] > 0:
        y = y + adapter_reference(x, A, B, scale).to(y.dtype)
    return y


def qbitmap_dense(
    bitmask: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, rows: int, cols: int, blocksize: int
) -> torch.Tensor:
    """fp32 [rows, cols]: the dequantized quantized-bitmap weight. codes uint8 = NF4 (two per byte, high nibble
    first), int8 = int8; absmax fp32 [ceil(n / blocksize)] are the effective block scales (double quantization
    already undone)."""
    kind = "nf4" if codes.dtype == torch.uint8 else "int8"
    n = int(row_counts(bitmask).sum())
    q = QuantizedValues(kind, codes, n, blocksize, absmax=absmax)
    return decode_dense(bitmask, dequantize_values(q, torch.float32), rows, cols)


def qbitmap_linear_reference(
    x: torch.Tensor,
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
) -> torch.Tensor:
    """y = x @ W.T for a quantized bitmap W: x [..., cols] -> [..., rows] in x.dtype (W cast to x's dtype)."""
    return F.linear(x, qbitmap_dense(bitmask, codes, absmax, rows, cols, blocksize).to(x.dtype))


def qbitmap_grad_input_reference(
    grad: torch.Tensor,
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
) -> torch.Tensor:
    """grad_x = grad_y @ W: grad [..., rows] -> [..., cols] in grad.dtype."""
    return torch.matmul(grad, qbitmap_dense(bitmask, codes, absmax, rows, cols, blocksize).to(grad.dtype))

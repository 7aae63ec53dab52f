"""Plain-PyTorch implementations of every salr op: the ground truth the kernels are tested against.

They run on any device and are the ops' default implementations (used where no kernel is registered).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from salr.bitmap_format import decode_dense


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

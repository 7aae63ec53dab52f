"""Plain-PyTorch backend of `salr::bitmap_linear`: decode to dense, then F.linear. Any device; the ground truth."""

from __future__ import annotations

import torch

from salr.sparse.format import unpack_mask


def decode_dense(
    bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """Dense W [rows, cols] in the values' dtype. `row_offsets` is implied by the bitmap and not read."""
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense[unpack_mask(bitmask, cols)] = values
    return dense


def bitmap_linear_reference(
    x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """y = x @ W.T: x [..., cols] -> [..., rows] in x.dtype (the weight is cast to x's dtype)."""
    w = decode_dense(bitmask, values, row_offsets, rows, cols)
    return torch.nn.functional.linear(x, w.to(x.dtype))


def bitmap_grad_input_reference(
    grad: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """grad_x = grad_y @ W: grad [..., rows] -> [..., cols] in grad.dtype."""
    w = decode_dense(bitmask, values, row_offsets, rows, cols)
    return torch.matmul(grad, w.to(grad.dtype))

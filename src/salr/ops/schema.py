"""The salr ops, declared once with torch.library: schema, default (reference) implementation, fake, autograd.

  salr::bitmap_linear(x, bitmask, values, row_offsets, rows, cols) -> y = x @ W.T
  salr::bitmap_linear_grad_input(grad, bitmask, values, row_offsets, rows, cols) -> grad @ W
  salr::salr_linear(x, bitmask, values, row_offsets, rows, cols, A, B, residual_rank, lora_scale, bias)
      -> x @ W.T + bias + ((x @ A.T) * s) @ B.T, s = 1 on the first residual_rank ranks, lora_scale after
      (a whole SALR layer, inference only: no autograd)
  salr::qbitmap_linear(x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize) -> y = x @ W.T
  salr::qbitmap_linear_grad_input(grad, bitmask, codes, absmax, row_offsets, rows, cols, blocksize) -> grad @ W
      (W a quantized bitmap weight, QSALR: codes uint8 = NF4 two per byte, int8 = int8 blockwise; absmax fp32 are the
      effective block scales, double quantization undone)

W [rows, cols] is a frozen bitmap weight (salr.bitmap_format). The default implementations are the plain-PyTorch
references (salr.ops.reference). Device kernels register themselves when their module is imported: salr.ops.cpu
(native CPU kernel) at import of salr.ops, and the CUDA entry below, which loads the Triton kernels
(salr.ops.triton) on its first call, so a direct call of the op on CUDA tensors reaches Triton without importing
triton when salr is imported. The base is frozen, so autograd gives only the input gradient.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

from salr.ops.reference import (
    bitmap_grad_input_reference,
    bitmap_linear_reference,
    qbitmap_grad_input_reference,
    qbitmap_linear_reference,
    salr_linear_reference,
)

logger = logging.getLogger(__name__)

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.library.custom_op("salr::bitmap_linear", mutates_args=())
def bitmap_linear(
    x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """y = x @ W.T. x [..., cols] any float dtype -> [..., rows] in x.dtype; W [rows, cols] given by bitmask uint8
    [rows, ceil(cols/8)], values (bf16/fp16/fp32, 1-D) and row_offsets int64 [rows] (salr.bitmap_format)."""
    return bitmap_linear_reference(x, bitmask, values, row_offsets, rows, cols)


@torch.library.custom_op("salr::bitmap_linear_grad_input", mutates_args=())
def bitmap_linear_grad_input(
    grad: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """grad_x = grad_y @ W: grad [..., rows] -> [..., cols] in grad.dtype."""
    return bitmap_grad_input_reference(grad, bitmask, values, row_offsets, rows, cols)


@torch.library.custom_op("salr::salr_linear", mutates_args=())
def salr_linear(
    x: torch.Tensor,
    bitmask: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    A: torch.Tensor,
    B: torch.Tensor,
    residual_rank: int,
    lora_scale: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """A whole SALR layer on a bitmap base (inference): x [..., cols] -> [..., rows] in x.dtype."""
    return salr_linear_reference(
        x, bitmask, values, row_offsets, rows, cols, A, B, rank_scale(A.shape[0], residual_rank, lora_scale, A), bias
    )


def rank_scale(rank: int, residual_rank: int, lora_scale: float, like: torch.Tensor) -> torch.Tensor:
    """[rank]: 1 on the residual block, lora_scale on the LoRA block, in like's dtype and device."""
    scale = torch.full((rank,), float(lora_scale), dtype=like.dtype, device=like.device)
    scale[:residual_rank] = 1.0
    return scale


@bitmap_linear.register_fake
def _bitmap_linear_fake(x, bitmask, values, row_offsets, rows, cols):
    torch._check(x.shape[-1] == cols, lambda: f"x has {x.shape[-1]} features, the bitmap weight {cols}")
    return x.new_empty(*x.shape[:-1], rows)


@bitmap_linear_grad_input.register_fake
def _bitmap_grad_input_fake(grad, bitmask, values, row_offsets, rows, cols):
    return grad.new_empty(*grad.shape[:-1], cols)


@salr_linear.register_fake
def _salr_linear_fake(x, bitmask, values, row_offsets, rows, cols, A, B, residual_rank, lora_scale, bias):
    torch._check(x.shape[-1] == cols, lambda: f"x has {x.shape[-1]} features, the bitmap weight {cols}")
    return x.new_empty(*x.shape[:-1], rows)


def _setup_context(ctx, inputs, output):
    _, bitmask, values, row_offsets, rows, cols = inputs
    ctx.save_for_backward(bitmask, values, row_offsets)
    ctx.rows, ctx.cols = rows, cols


def _backward(ctx, grad):
    bitmask, values, row_offsets = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = bitmap_linear_grad_input(grad, bitmask, values, row_offsets, ctx.rows, ctx.cols)
    return grad_x, None, None, None, None, None


bitmap_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("salr::qbitmap_linear", mutates_args=())
def qbitmap_linear(
    x: torch.Tensor,
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
) -> torch.Tensor:
    """y = x @ W.T for a quantized bitmap W [rows, cols]: x [..., cols] any float dtype -> [..., rows] in x.dtype.
    codes uint8 [ceil(n/2)] (NF4) or int8 [n], absmax fp32 [ceil(n/blocksize)] (salr.bitmap_format)."""
    return qbitmap_linear_reference(x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)


@torch.library.custom_op("salr::qbitmap_linear_grad_input", mutates_args=())
def qbitmap_linear_grad_input(
    grad: torch.Tensor,
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
) -> torch.Tensor:
    """grad_x = grad_y @ W for a quantized bitmap W: grad [..., rows] -> [..., cols] in grad.dtype."""
    return qbitmap_grad_input_reference(grad, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)


@qbitmap_linear.register_fake
def _qbitmap_linear_fake(x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize):
    torch._check(x.shape[-1] == cols, lambda: f"x has {x.shape[-1]} features, the bitmap weight {cols}")
    return x.new_empty(*x.shape[:-1], rows)


@qbitmap_linear_grad_input.register_fake
def _qbitmap_grad_input_fake(grad, bitmask, codes, absmax, row_offsets, rows, cols, blocksize):
    return grad.new_empty(*grad.shape[:-1], cols)


def _q_setup_context(ctx, inputs, output):
    _, bitmask, codes, absmax, row_offsets, rows, cols, blocksize = inputs
    ctx.save_for_backward(bitmask, codes, absmax, row_offsets)
    ctx.rows, ctx.cols, ctx.blocksize = rows, cols, blocksize


def _q_backward(ctx, grad):
    bitmask, codes, absmax, row_offsets = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        dims = (ctx.rows, ctx.cols, ctx.blocksize)
        grad_x = qbitmap_linear_grad_input(grad, bitmask, codes, absmax, row_offsets, *dims)
    return grad_x, None, None, None, None, None, None, None


qbitmap_linear.register_autograd(_q_backward, setup_context=_q_setup_context)


# ----------------------------------------------------------------------------- CUDA: Triton, loaded on first use


@functools.cache
def triton_kernels() -> ModuleType | None:
    """salr.ops.triton, or None (logged once) when triton cannot be imported."""
    try:
        from salr.ops import triton as kernels
    except ImportError as exc:  # pragma: no cover - depends on the environment
        logger.info("Triton kernels unavailable (%s): salr ops run the reference on CUDA", exc)
        return None
    return kernels if kernels.HAS_TRITON else None


@bitmap_linear.register_kernel("cuda")
def _bitmap_linear_cuda(x, bitmask, values, row_offsets, rows, cols):
    kernels = triton_kernels()
    if kernels is None or x.dtype not in TRITON_DTYPES:
        return bitmap_linear_reference(x, bitmask, values, row_offsets, rows, cols)
    return kernels.triton_bitmap_linear(x, bitmask, values, row_offsets, rows, cols)


@bitmap_linear_grad_input.register_kernel("cuda")
def _bitmap_grad_input_cuda(grad, bitmask, values, row_offsets, rows, cols):
    kernels = triton_kernels()
    if kernels is None or grad.dtype not in TRITON_DTYPES:
        return bitmap_grad_input_reference(grad, bitmask, values, row_offsets, rows, cols)
    return kernels.triton_bitmap_grad_input(grad, bitmask, values, row_offsets, rows, cols)


@salr_linear.register_kernel("cuda")
def _salr_linear_cuda(x, bitmask, values, row_offsets, rows, cols, A, B, residual_rank, lora_scale, bias):
    kernels = triton_kernels()
    scale = rank_scale(A.shape[0], residual_rank, lora_scale, A)
    if kernels is None or x.dtype not in TRITON_DTYPES:
        return salr_linear_reference(x, bitmask, values, row_offsets, rows, cols, A, B, scale, bias)
    y = kernels.triton_bitmap_linear(
        x, bitmask, values, row_offsets, rows, cols, a_cat=A if A.shape[0] else None,
        b_cat=B if A.shape[0] else None, scale=scale,
    )  # fmt: skip
    return y if bias is None else y + bias.to(y.dtype)


@qbitmap_linear.register_kernel("cuda")
def _qbitmap_linear_cuda(x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize):
    kernels = triton_kernels()
    if kernels is None or x.dtype not in TRITON_DTYPES:
        return qbitmap_linear_reference(x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    from salr.ops import triton_qbitmap

    return triton_qbitmap.triton_qbitmap_linear(x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)


@qbitmap_linear_grad_input.register_kernel("cuda")
def _qbitmap_grad_input_cuda(grad, bitmask, codes, absmax, row_offsets, rows, cols, blocksize):
    kernels = triton_kernels()
    if kernels is None or grad.dtype not in TRITON_DTYPES:
        return qbitmap_grad_input_reference(grad, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    from salr.ops import triton_qbitmap

    return triton_qbitmap.triton_qbitmap_grad_input(grad, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)

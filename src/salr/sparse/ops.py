"""`salr::bitmap_linear`: y = x @ W.T with W a frozen bitmap weight; one op, several backends (torch.library).

  - default (any device): the plain-PyTorch reference (decode to dense, F.linear);
  - "cpu": the native kernel (salr.kernels.cpu) when it is built, else the reference;
  - "cuda": whatever `register_cuda_backend` installed (the Triton kernel registers itself when triton is present),
    else the reference.
A fake implementation lets torch.compile trace it, and autograd gives the input gradient through the companion op
`salr::bitmap_linear_grad_input` (grad_x = grad_y @ W); the base is frozen, so there is no weight gradient.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from salr.errors import SALRError
from salr.kernels import cpu as cpu_kernel
from salr.kernels.reference import bitmap_grad_input_reference, bitmap_linear_reference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cpu", "triton")
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@torch.library.custom_op("salr::bitmap_linear", mutates_args=())
def bitmap_linear(
    x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """y = x @ W.T. x [..., cols] any float dtype -> [..., rows] in x.dtype; W [rows, cols] given by bitmask uint8
    [rows, ceil(cols/8)], values (bf16/fp16/fp32, 1-D) and row_offsets int64 [rows] (salr.sparse.format)."""
    return bitmap_linear_reference(x, bitmask, values, row_offsets, rows, cols)


@torch.library.custom_op("salr::bitmap_linear_grad_input", mutates_args=())
def bitmap_linear_grad_input(
    grad: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """grad_x = grad_y @ W: grad [..., rows] -> [..., cols] in grad.dtype."""
    return bitmap_grad_input_reference(grad, bitmask, values, row_offsets, rows, cols)


@bitmap_linear.register_kernel("cpu")
def _bitmap_linear_cpu(x, bitmask, values, row_offsets, rows, cols):
    if cpu_kernel.available():
        return cpu_kernel.bitmap_linear_cpu(x, bitmask, values, row_offsets, rows, cols)
    return bitmap_linear_reference(x, bitmask, values, row_offsets, rows, cols)


@bitmap_linear_grad_input.register_kernel("cpu")
def _bitmap_grad_input_cpu(grad, bitmask, values, row_offsets, rows, cols):
    if cpu_kernel.available():
        return cpu_kernel.bitmap_grad_input_cpu(grad, bitmask, values, row_offsets, rows, cols)
    return bitmap_grad_input_reference(grad, bitmask, values, row_offsets, rows, cols)


@bitmap_linear.register_fake
def _bitmap_linear_fake(x, bitmask, values, row_offsets, rows, cols):
    torch._check(x.shape[-1] == cols, lambda: f"x has {x.shape[-1]} features, the bitmap weight {cols}")
    return x.new_empty(*x.shape[:-1], rows)


@bitmap_linear_grad_input.register_fake
def _bitmap_grad_input_fake(grad, bitmask, values, row_offsets, rows, cols):
    return grad.new_empty(*grad.shape[:-1], cols)


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


def register_cuda_backend(fn: Kernel, grad_input_fn: Kernel | None = None) -> None:
    """Install `fn(x, bitmask, values, row_offsets, rows, cols) -> y` as the CUDA kernel of salr::bitmap_linear
    (and optionally a CUDA kernel of the input gradient; otherwise the reference runs on the GPU)."""
    torch.library.register_kernel("salr::bitmap_linear", "cuda", fn)
    if grad_input_fn is not None:
        torch.library.register_kernel("salr::bitmap_linear_grad_input", "cuda", grad_input_fn)


def _check_inputs(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> None:
    if not x.is_floating_point():
        raise SALRError(f"bitmap_linear needs a floating-point input, got {x.dtype}")
    if x.shape[-1] != cols:
        raise SALRError(f"input has {x.shape[-1]} features but the bitmap weight has {cols} columns")
    if tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise SALRError(f"bitmask shape {list(bitmask.shape)} does not match a [{rows}, {cols}] weight")


def bitmap_linear_with(
    backend: str,
    x: torch.Tensor,
    bitmask: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
) -> torch.Tensor:
    """y = x @ W.T on a chosen backend (for benchmarks and tests): "auto" dispatches the op on the tensors'
    device; "reference" and "cpu" call that implementation directly; "triton" runs the op's CUDA kernel."""
    _check_inputs(x, bitmask, values, rows, cols)
    if backend == "auto":
        return bitmap_linear(x, bitmask, values, row_offsets, rows, cols)
    if backend == "reference":
        return bitmap_linear_reference(x, bitmask, values, row_offsets, rows, cols)
    if backend == "cpu":
        if not cpu_kernel.available():
            raise SALRError("backend 'cpu' needs the native kernel: build it with `pip install -e .`")
        return cpu_kernel.bitmap_linear_cpu(x, bitmask, values, row_offsets, rows, cols)
    if backend == "triton":
        if x.device.type != "cuda":
            raise SALRError("backend 'triton' runs on CUDA tensors: use --device cuda")
        if not register_triton_backend():
            raise SALRError("backend 'triton' is not available (is triton installed?)")
        return bitmap_linear(x, bitmask, values, row_offsets, rows, cols)
    raise SALRError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


@functools.cache
def register_triton_backend() -> bool:
    """Register the Triton kernel (salr.kernels.triton_bitmap) as the CUDA backend; False if it is unavailable."""
    try:
        from salr.kernels import triton_bitmap
    except ImportError as exc:
        logger.info("Triton backend unavailable: %s", exc)
        return False
    return bool(triton_bitmap.register())


def backend_name(device: torch.device | str) -> str:
    """Which kernel `salr::bitmap_linear` runs on `device` in this process ("cpu-avx2", "cpu-scalar", ...)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return f"cpu-{cpu_kernel.isa()}" if cpu_kernel.available() else "reference"
    if kind == "cuda":
        return "triton" if register_triton_backend() else "reference"
    return "reference"

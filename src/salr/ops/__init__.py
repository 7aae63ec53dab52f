"""The salr ops and their kernels, one home: `schema` declares the ops (reference default, fakes, autograd, the
CUDA entry), `reference` is the plain-PyTorch ground truth, `cpu` the native kernels, `triton` the GPU kernels.

Importing this package registers every backend, so `torch.ops.salr.bitmap_linear` runs the fastest kernel for
its tensors' device from the first call.
"""

from __future__ import annotations

import torch

from salr import bitmap_format
from salr.errors import SALRError
from salr.ops import cpu
from salr.ops.reference import bitmap_linear_reference, qbitmap_linear_reference
from salr.ops.schema import (
    bitmap_linear,
    bitmap_linear_grad_input,
    qbitmap_linear,
    qbitmap_linear_grad_input,
    salr_linear,
    triton_kernels,
)

BACKENDS = ("auto", "reference", "cpu", "triton")

__all__ = [
    "BACKENDS",
    "backend_name",
    "bitmap_linear",
    "bitmap_linear_grad_input",
    "bitmap_linear_with",
    "qbitmap_linear",
    "qbitmap_linear_grad_input",
    "qbitmap_linear_with",
    "salr_linear",
]


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
    if not x.is_floating_point():
        raise SALRError(f"bitmap_linear needs a floating-point input, got {x.dtype}")
    if x.shape[-1] != cols:
        raise SALRError(f"input has {x.shape[-1]} features but the bitmap weight has {cols} columns")
    bitmap_format.check_operands(bitmask, values, row_offsets, rows, cols)
    if backend == "auto":
        return bitmap_linear(x, bitmask, values, row_offsets, rows, cols)
    if backend == "reference":
        return bitmap_linear_reference(x, bitmask, values, row_offsets, rows, cols)
    if backend == "cpu":
        if not cpu.available():
            raise SALRError("backend 'cpu' needs the native kernel: build it with `pip install -e .`")
        return cpu.bitmap_linear_cpu(x, bitmask, values, row_offsets, rows, cols)
    if backend == "triton":
        if x.device.type != "cuda":
            raise SALRError("backend 'triton' runs on CUDA tensors: use --device cuda")
        if triton_kernels() is None:
            raise SALRError("backend 'triton' is not available (is triton installed?)")
        return bitmap_linear(x, bitmask, values, row_offsets, rows, cols)
    raise SALRError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def qbitmap_linear_with(
    backend: str,
    x: torch.Tensor,
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
) -> torch.Tensor:
    """y = x @ W.T for a quantized bitmap W on a chosen backend (see `bitmap_linear_with`)."""
    if not x.is_floating_point():
        raise SALRError(f"qbitmap_linear needs a floating-point input, got {x.dtype}")
    if x.shape[-1] != cols:
        raise SALRError(f"input has {x.shape[-1]} features but the bitmap weight has {cols} columns")
    bitmap_format.check_quantized_operands(bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    args = (x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    if backend in ("auto", "triton"):
        if backend == "triton" and x.device.type != "cuda":
            raise SALRError("backend 'triton' runs on CUDA tensors: use --device cuda")
        if backend == "triton" and triton_kernels() is None:
            raise SALRError("backend 'triton' is not available (is triton installed?)")
        return qbitmap_linear(*args)
    if backend == "reference":
        return qbitmap_linear_reference(*args)
    if backend == "cpu":
        if not cpu.available():
            raise SALRError("backend 'cpu' needs the native kernel: build it with `pip install -e .`")
        return cpu.qbitmap_linear_cpu(*args)
    raise SALRError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def backend_name(device: torch.device | str) -> str:
    """Which kernel `salr::bitmap_linear` runs on `device` in this process ("cpu-avx2", "cpu-scalar", ...)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return f"cpu-{cpu.isa()}" if cpu.available() else "reference"
    if kind == "cuda":
        return "triton" if triton_kernels() is not None else "reference"
    return "reference"

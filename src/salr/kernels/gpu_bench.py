"""GPU kernel benchmarks for `salr bench --device cuda`, and the interpreter correctness check for CPU-only CI.

`bench_gpu_kernel` times y = x @ W.T for one weight shape three ways on the current CUDA device:
dense cuBLAS (the unpruned weight), the Triton bitmap kernel (unstructured magnitude pruning at `sparsity`),
and PyTorch 2:4 semi-structured sparsity (2:4 magnitude pruning, always 50 %). Every number is measured on the
call; nothing is cached or estimated.

`check_triton_on_cpu` runs the Triton kernel in its CPU interpreter (TRITON_INTERPRET=1) and reports its error
against a float64 reference: correctness only, interpreter timings mean nothing.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from salr.bitmap_format import encode
from salr.errors import SALRError
from salr.pruning import nm_mask, unstructured_mask

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SALRError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def snr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-noise ratio of `y` against `ref` in dB (inf when identical)."""
    noise = (y.double() - ref.double()).pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def _problem(shape: tuple[int, int], tokens: int, sparsity: float, dtype: torch.dtype, device: str, seed: int = 0):
    out_f, in_f = shape
    if out_f <= 0 or in_f <= 0 or tokens <= 0:
        raise SALRError(f"shape and tokens must be positive, got shape {shape} and tokens {tokens}")
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(device)
    x = torch.randn(tokens, in_f, generator=g).to(device=device, dtype=dtype)
    return w, x, (w * unstructured_mask(w, sparsity)).to(dtype)


def check_triton_on_cpu(
    shape: tuple[int, int], tokens: int, sparsity: float, dtype: str | torch.dtype = "bf16"
) -> dict:
    """Run the Triton bitmap kernel in the CPU interpreter; return its error against a float64 reference.

    shape is (out_features, in_features). Needs TRITON_INTERPRET=1 set before triton is imported.
    """
    from salr.ops import triton as tb

    if not tb.HAS_TRITON:
        raise SALRError("the Triton check needs the `triton` package: pip install --no-deps triton")
    if not tb.interpreting():
        raise SALRError("run with TRITON_INTERPRET=1 in the environment to check the Triton kernel on the CPU")
    dt = _dtype(dtype)
    _, x, w = _problem(shape, tokens, sparsity, dt, "cpu")
    bw = encode(w)
    y = tb.triton_bitmap_linear(x, bw.bitmask, bw.values, bw.row_offsets, *bw.shape)
    ref = x.double() @ w.double().T
    return {
        "backend": "triton-interpreter",
        "shape": list(shape),
        "tokens": tokens,
        "sparsity": sparsity,
        "measured_sparsity": 1.0 - bw.nnz / w.numel(),
        "dtype": str(dt).removeprefix("torch."),
        "snr_db": snr_db(y, ref),
        "max_abs_err": (y.double() - ref).abs().max().item(),
        "max_abs_ref": ref.abs().max().item(),
    }


def _time_ms(fn, warmup: int, rep: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def bench_gpu_kernel(
    shape: tuple[int, int],
    tokens: int,
    sparsity: float = 0.5,
    dtype: str | torch.dtype = "bf16",
    warmup_ms: int = 25,
    rep_ms: int = 100,
) -> dict:
    """Median time (ms) of y = x @ W.T for x [tokens, in], W [out, in] = `shape`: dense vs bitmap vs 2:4.

    Each sparse result is also checked against a float64 reference (snr_db). Times come from
    triton.testing.do_bench (CUDA events, L2 flushed between runs). Needs a CUDA GPU and triton.
    """
    if not torch.cuda.is_available():
        raise SALRError("bench_gpu_kernel needs a CUDA GPU; on CPU use check_triton_on_cpu with TRITON_INTERPRET=1")
    from salr.bases import semi_structured as ss
    from salr.ops import triton as tb

    if not tb.HAS_TRITON:
        raise SALRError("the GPU benchmark needs the `triton` package: pip install triton")
    if tb.interpreting():
        raise SALRError("unset TRITON_INTERPRET to benchmark the compiled Triton kernel on the GPU")
    dt = _dtype(dtype)
    w_dense, x, w = _problem(shape, tokens, sparsity, dt, "cuda")
    w_dense = w_dense.to(dt)
    flops = 2.0 * tokens * shape[0] * shape[1]
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "shape": list(shape),
        "tokens": tokens,
        "sparsity": sparsity,
        "dtype": str(dt).removeprefix("torch."),
        "timing": "triton.testing.do_bench median, ms",
    }

    dense_ms = _time_ms(lambda: F.linear(x, w_dense), warmup_ms, rep_ms)
    result["dense_ms"] = dense_ms
    result["dense_tflops"] = flops / dense_ms / 1e9
    result["dense_bytes"] = w_dense.numel() * w_dense.element_size()

    bw = encode(w)
    bitmask, values, row_offsets = bw.bitmask, bw.values, bw.row_offsets
    prefix = tb.bitmap_block_prefix(bitmask, shape[1])
    y = tb.triton_bitmap_linear(x, bitmask, values, row_offsets, *shape, block_prefix=prefix)  # also autotunes
    result["bitmap_snr_db"] = snr_db(y, x.double() @ w.double().T)
    bitmap_ms = _time_ms(
        lambda: tb.triton_bitmap_linear(x, bitmask, values, row_offsets, *shape, block_prefix=prefix),
        warmup_ms,
        rep_ms,
    )
    result["bitmap_triton_ms"] = bitmap_ms
    result["bitmap_bytes"] = bw.nbytes + prefix.numel() * prefix.element_size()
    result["bitmap_speedup_vs_dense"] = dense_ms / bitmap_ms

    w24 = (w_dense.float() * nm_mask(w_dense, 2, 4)).to(dt)
    mod = ss.SemiStructuredBase(w24)
    result["semi_structured_backend"] = mod.backend
    if mod.backend == "dense":
        result["semi_structured_ms"] = None
        result["semi_structured_reason"] = mod.reason
    else:
        result["semi_structured_snr_db"] = snr_db(mod(x), x.double() @ w24.double().T)
        ss_ms = _time_ms(lambda: mod(x), warmup_ms, rep_ms)
        result["semi_structured_ms"] = ss_ms
        result["semi_structured_speedup_vs_dense"] = dense_ms / ss_ms
    log.info("bench %s tokens=%d: %s", shape, tokens, result)
    return result

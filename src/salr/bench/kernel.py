"""Layer-level kernel benchmarks: y = x @ W.T for one weight shape W [out, in] and M tokens x [M, in].

On the CPU (`kernel_case`, `kernel_grid`) dense bf16, dense fp32 and the bitmap op (bf16 values) are timed
interleaved in one process. The Triton bitmap kernel (`triton_kernel_grid`) is timed on a GPU against cuBLAS dense
and PyTorch 2:4 (`bench_gpu_kernel`), or, on the CPU under TRITON_INTERPRET=1, checked for correctness only
(`check_triton_on_cpu`: interpreter timings mean nothing). Every sparse output is checked against a reference.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from salr import bitmap_format, ops
from salr.bench.timing import cold_caches, environment, onednn_contexts, onednn_paths, time_interleaved
from salr.errors import SALRError
from salr.hugepages import huge_page_copies
from salr.ops import cpu as cpu_kernel
from salr.pruning import nm_mask, unstructured_mask

logger = logging.getLogger(__name__)

SHAPES: list[tuple[int, int]] = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (14336, 4096), (4096, 14336)]
TOKENS: list[int] = [1, 4, 16, 128, 512]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

TABLE_HEADER = (
    f"{'shape':>11} {'M':>5} {'bf16 ms':>10} {'via':>7} {'fp32 ms':>10} {'bitmap ms':>10} {'vs bf16':>9} "
    f"{'vs fp32':>9}  backend"
)
CACHE_CHOICES = ("cold", "warm")  # --cache: weights out of the CPU caches before each call (as decoding), or not


def dense_bf16_paths(onednn_choice: str, device: torch.device) -> dict[str, bool]:
    """The dense bf16 timings to take, by name, each with the oneDNN setting it runs under (`timing.onednn`): on
    the CPU with "auto" both torch paths, and the faster one is the baseline; "on" / "off" one of them; on a GPU
    torch's default only."""
    paths = onednn_paths(onednn_choice)
    if device.type != "cpu":
        return {"dense_bf16": True}
    return {f"dense_bf16_{name}": enabled for name, enabled in paths.items()}


def parse_shape(text: str) -> tuple[int, int]:
    """ "4096x4096" -> (4096, 4096), as (out, in) = (rows, cols) of the weight."""
    try:
        rows, cols = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise SALRError(f"shape must look like OUTxIN, e.g. 4096x4096; got {text!r}") from None
    if rows <= 0 or cols <= 0:
        raise SALRError(f"shape dimensions must be positive, got {text!r}")
    return rows, cols


def pruned_weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """fp32 Gaussian weight [rows, cols] with the `sparsity` fraction of smallest magnitudes set to zero
    (`salr.pruning.unstructured_mask`: round((1 - sparsity) * rows * cols) entries kept)."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return w.masked_fill_(~unstructured_mask(w, sparsity), 0.0)


def weight_bytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Checkpoint-bytes accounting of one weight: dense vs the bitmap format's ideal payload (1 bit/weight + kept
    values) and the row offsets it also stores."""
    dense = bitmap_format.dense_nbytes(shape, dtype)
    ideal = bitmap_format.ideal_bitmap_nbytes(shape, nnz, dtype)
    return {
        "dense_bytes": dense,
        "bitmap_ideal_bytes": ideal,
        "row_offsets_bytes": 8 * shape[0],
        "compression": dense / ideal,
        "bits_per_weight": 8 * ideal / (shape[0] * shape[1]),
    }


def _backend_label(
    backend: str, device: torch.device, tokens: int, bf16_tiles: bool = False, gemv_max_tokens: int | None = None
) -> str:
    """The backend that ran, with the native kernel's ISA and path on the CPU: GEMV (up to `gemv_max_tokens`, by
    default cpu.GEMV_MAX_TOKENS), or decode + SGEMM (fp32 tiles) or decode + bf16 matmul (bf16 tiles,
    cpu.bf16_tiles)."""
    name = ops.backend_name(device) if backend == "auto" else backend
    if name == "cpu":
        name = f"cpu-{cpu_kernel.isa()}"
    if name.startswith("cpu-"):
        if tokens <= (cpu_kernel.GEMV_MAX_TOKENS if gemv_max_tokens is None else gemv_max_tokens):
            name += "-gemv"
        else:
            name += "-decode+bf16mm" if bf16_tiles else "-decode+sgemm"
    return name


def _on_huge_pages(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    """CPU weights as copies on transparent huge pages (salr.hugepages), as a loaded model's are, else as they are;
    and whether they were placed."""
    if any(t.device.type != "cpu" or t.numel() == 0 for t in tensors):
        return list(tensors), False
    copies = huge_page_copies(tensors)
    return (list(tensors), False) if copies is None else (copies, True)


def _case_weights(
    shape: tuple[int, int], sparsity: float, seed: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, bitmap_format.BitmapWeight, bool]:
    """The case's pruned weight in fp32 and bf16 and its bitmap, all on huge pages where the system offers them (the
    last item: whether they are)."""
    w32 = pruned_weight(*shape, sparsity, seed).to(dev)
    w16 = w32.to(torch.bfloat16)
    bw = bitmap_format.encode(w16)
    (w32, w16, *stored), placed = _on_huge_pages(w32, w16, bw.bitmask, bw.values, bw.row_offsets)
    return w32, w16, dataclasses.replace(bw, bitmask=stored[0], values=stored[1], row_offsets=stored[2]), placed


def kernel_case(
    shape: tuple[int, int],
    tokens: int,
    sparsity: float = 0.5,
    backend: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    budget_s: float = 1.0,
    quant: str = "none",
    quant_double: bool = False,
    onednn_choice: str = "auto",
    cache: str = "cold",
) -> dict[str, Any]:
    """Time y = x @ W.T for one weight shape (out, in) and token count: dense bf16, dense fp32, bitmap (bf16
    values); median ms of each (dense fp32 timed after the others, in a pass of its own), speedups, the bitmap
    output's max relative error and the weight's bytes.

    On the CPU dense bf16 is timed through oneDNN and through torch's own kernels (`dense_bf16_paths`); its
    `dense_bf16_ms` is the faster, `dense_bf16_path` says which, and the speedups are against it. With `cache`
    "cold" (the CPU default) every call is timed alone after its own weights were flushed from the caches
    (`timing.cold_caches`), as when decoding; "warm" times calls back to back.

    With `quant` ("nf4", "int8") `bitmap` is the quantized bitmap op (QSALR: the bf16 kept values quantized) and the
    bf16 bitmap op is timed beside it as `bitmap_bf16`; bytes are then the quantized format's."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SALRError("--device cuda but no CUDA device is available")
    if cache not in CACHE_CHOICES:
        raise SALRError(f"--cache must be one of {', '.join(CACHE_CHOICES)}; got {cache!r}")
    cold = cache == "cold" and dev.type == "cpu"
    rows, cols = shape
    w32, w16, bw, on_huge_pages = _case_weights(shape, sparsity, seed, dev)
    x32 = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    x16 = x32.to(torch.bfloat16)
    args = (bw.bitmask, bw.values, bw.row_offsets, rows, cols)

    def bitmap_bf16() -> torch.Tensor:
        return ops.bitmap_linear_with(backend, x16, *args)

    paths = dense_bf16_paths(onednn_choice, dev)
    fns = {**{name: lambda: F.linear(x16, w16) for name in paths}, "bitmap": bitmap_bf16}
    w_ref, nbytes = w16.float(), weight_bytes(shape, bw.nnz, torch.bfloat16)
    gemv_max_tokens = cpu_kernel.GEMV_MAX_TOKENS
    if quant != "none":
        qw = bitmap_format.encode_quantized(w16, w16 != 0, quant, double_quant=quant_double)
        qstored, q_placed = _on_huge_pages(qw.bitmask, qw.q.codes, qw.q.scales(), qw.row_offsets)
        on_huge_pages = on_huge_pages and q_placed
        qargs = (*qstored, rows, cols, qw.q.blocksize)
        fns = {**fns, "bitmap_bf16": bitmap_bf16, "bitmap": lambda: ops.qbitmap_linear_with(backend, x16, *qargs)}
        w_ref = bitmap_format.decode_quantized(qw, torch.float32)
        if cpu_kernel.available():
            gemv_max_tokens = cpu_kernel.qgemv_max_tokens(qw.q.codes, qw.q.blocksize, x16.dtype)
        nbytes = quantized_weight_bytes(shape, qw.nnz, quant, quant_double)
    weights = {name: [w16] for name in paths}  # each function's weight, flushed from the caches before its calls
    weights |= {"dense_fp32": [w32], "bitmap": [bw.bitmask, bw.values, bw.row_offsets]}
    if quant != "none":
        weights |= {"bitmap_bf16": weights["bitmap"], "bitmap": list(qstored)}
    with torch.inference_mode():
        y = fns["bitmap"]().double()
        ref = F.linear(x16.float(), w_ref).double()
        err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        contexts = onednn_contexts({name: on for name, on in paths.items() if name != "dense_bf16"})
        before = cold_caches({name: ts + [x16, x32] for name, ts in weights.items()}) if cold else None
        ms = time_interleaved(fns, dev, budget_s=budget_s, contexts=contexts, before_call=before)
        # Dense fp32 in a pass of its own: interleaved, its 2x larger stream disturbed the calls after it by 6-12 %
        # (dense bf16 and bitmap alike, 4096x4096 on 1 thread, weights flushed; docs/benchmarks.md, section 18).
        fp32 = {"dense_fp32": lambda: F.linear(x32, w32)}
        ms |= time_interleaved(fp32, dev, budget_s=budget_s / 4, before_call=before)
    dense_path = min(paths, key=lambda name: ms[name])
    ms["dense_bf16"] = ms[dense_path]
    case = {
        "shape": [rows, cols],
        "tokens": tokens,
        "sparsity": sparsity,
        "density": bw.nnz / (rows * cols),
        "quant": quant,
        "device": str(dev),
        "cache": "cold" if cold else "warm",
        "weights_on_huge_pages": on_huge_pages,  # every compared weight placed (salr.hugepages), else none or some
        "backend": _backend_label(
            backend,
            dev,
            tokens,
            cpu_kernel.available() and cpu_kernel.bf16_tiles(x16.dtype, w16.dtype),
            gemv_max_tokens,
        ),
        "dense_bf16_ms": ms["dense_bf16"],
        "dense_bf16_path": dense_path.removeprefix("dense_bf16_") if dense_path != "dense_bf16" else "default",
        **{f"{name}_ms": ms[name] for name in paths if name != "dense_bf16"},
        "dense_fp32_ms": ms["dense_fp32"],
        "bitmap_ms": ms["bitmap"],
        "speedup_vs_dense_bf16": ms["dense_bf16"] / ms["bitmap"],
        "speedup_vs_dense_fp32": ms["dense_fp32"] / ms["bitmap"],
        "max_rel_err": err,
        **nbytes,
    }
    if quant != "none":
        case.update(quant_double=quant_double, bitmap_bf16_ms=ms["bitmap_bf16"])
        case["speedup_vs_bitmap_bf16"] = ms["bitmap_bf16"] / ms["bitmap"]
    return case


def quantized_weight_bytes(shape: tuple[int, int], nnz: int, quant: str, double_quant: bool) -> dict[str, float]:
    """`weight_bytes` for the quantized bitmap format (bitmap + codes + block scales)."""
    dense = bitmap_format.dense_nbytes(shape, torch.bfloat16)
    ideal = bitmap_format.ideal_quantized_nbytes(shape, nnz, quant, double_quant=double_quant)
    return {
        "dense_bytes": dense,
        "bitmap_ideal_bytes": ideal,
        "row_offsets_bytes": 8 * shape[0],
        "compression": dense / ideal,
        "bits_per_weight": 8 * ideal / (shape[0] * shape[1]),
    }


def kernel_grid(
    shapes: Iterable[tuple[int, int]] = SHAPES,
    tokens: Iterable[int] = TOKENS,
    sparsity: float = 0.5,
    backend: str = "auto",
    device: str = "cpu",
    budget_s: float = 1.0,
    progress: Callable[[dict], None] | None = None,
    quant: str = "none",
    quant_double: bool = False,
    onednn_choice: str = "auto",
    cache: str = "cold",
) -> dict[str, Any]:
    """`kernel_case` for every (shape, tokens); `progress(case)` is called after each one."""
    results = []
    for shape in shapes:
        for m in tokens:
            case = kernel_case(shape, m, sparsity, backend, device, budget_s=budget_s, quant=quant,
                               quant_double=quant_double, onednn_choice=onednn_choice, cache=cache)  # fmt: skip
            results.append(case)
            if progress:
                progress(case)
    return {"environment": environment(), "results": results}


def format_row(case: dict[str, Any]) -> str:
    """One `kernel_case` as a line of the table under TABLE_HEADER."""
    shape = "x".join(str(s) for s in case["shape"])
    return (
        f"{shape:>11} {case['tokens']:>5} {case['dense_bf16_ms']:>10.3f} {case['dense_bf16_path']:>7} "
        f"{case['dense_fp32_ms']:>10.3f} "
        f"{case['bitmap_ms']:>10.3f} {case['speedup_vs_dense_bf16']:>8.2f}x {case['speedup_vs_dense_fp32']:>8.2f}x  "
        f"{case['backend']}"
    )


# -------------------- Triton kernel


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


def _problem(
    shape: tuple[int, int], tokens: int, sparsity: float, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense fp32 weight [out, in], x [tokens, in] in `dtype`, the magnitude-pruned weight in `dtype`)."""
    out_f, in_f = shape
    if out_f <= 0 or in_f <= 0 or tokens <= 0:
        raise SALRError(f"shape and tokens must be positive, got shape {shape} and tokens {tokens}")
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(device)
    x = torch.randn(tokens, in_f, generator=g).to(device=device, dtype=dtype)
    return w, x, (w * unstructured_mask(w, sparsity)).to(dtype)


def check_triton_on_cpu(
    shape: tuple[int, int], tokens: int, sparsity: float, dtype: str | torch.dtype = "bf16", quant: str = "none"
) -> dict[str, Any]:
    """Run the Triton bitmap kernel (with `quant`: the quantized one) in the CPU interpreter; return its error
    against a float64 reference.

    shape is (out_features, in_features). Needs TRITON_INTERPRET=1 set before triton is imported.
    """
    from salr.ops import triton as tb

    if not tb.HAS_TRITON:
        raise SALRError("the Triton check needs the `triton` package: pip install --no-deps triton")
    if not tb.interpreting():
        raise SALRError("run with TRITON_INTERPRET=1 in the environment to check the Triton kernel on the CPU")
    dt = _dtype(dtype)
    _, x, w = _problem(shape, tokens, sparsity, dt, "cpu")
    bw = bitmap_format.encode(w)
    if quant == "none":
        y = tb.triton_bitmap_linear(x, bw.bitmask, bw.values, bw.row_offsets, *bw.shape)
    else:
        from salr.ops import triton_qbitmap

        qw = bitmap_format.encode_quantized(w, w != 0, quant)
        qargs = (qw.bitmask, qw.q.codes, qw.q.scales(), qw.row_offsets, *qw.shape, qw.q.blocksize)
        y = triton_qbitmap.triton_qbitmap_linear(x, *qargs)
        w = bitmap_format.decode_quantized(qw, torch.float32)
    ref = x.double() @ w.double().T
    return {
        "backend": "triton-interpreter",
        "quant": quant,
        "shape": list(shape),
        "tokens": tokens,
        "sparsity": sparsity,
        "measured_sparsity": 1.0 - bw.nnz / w.numel(),
        "dtype": str(dt).removeprefix("torch."),
        "snr_db": snr_db(y, ref),
        "max_abs_err": (y.double() - ref).abs().max().item(),
        "max_abs_ref": ref.abs().max().item(),
    }


def _time_ms(fn: Callable[[], object], warmup: int, rep: int) -> float:
    """Median ms of `fn` by triton.testing.do_bench (CUDA events, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _bench_semi_structured(w_dense: torch.Tensor, x: torch.Tensor, dense_ms: float, warmup: int, rep: int) -> dict:
    """2:4 magnitude pruning of `w_dense` on sparse tensor cores (or why not): SNR, median ms, speedup vs dense."""
    from salr.bases import semi_structured as ss

    w24 = (w_dense.float() * nm_mask(w_dense, 2, 4)).to(w_dense.dtype)
    mod = ss.SemiStructuredBase(w24)
    if mod.backend == "dense":
        return {
            "semi_structured_backend": mod.backend,
            "semi_structured_ms": None,
            "semi_structured_reason": mod.reason,
        }
    snr = snr_db(mod(x), x.double() @ w24.double().T)
    ss_ms = _time_ms(lambda: mod(x), warmup, rep)
    return {
        "semi_structured_backend": mod.backend,
        "semi_structured_snr_db": snr,
        "semi_structured_ms": ss_ms,
        "semi_structured_speedup_vs_dense": dense_ms / ss_ms,
    }


def bench_gpu_kernel(
    shape: tuple[int, int],
    tokens: int,
    sparsity: float = 0.5,
    dtype: str | torch.dtype = "bf16",
    warmup_ms: int = 25,
    rep_ms: int = 100,
) -> dict[str, Any]:
    """Median time (ms) of y = x @ W.T for x [tokens, in], W [out, in] = `shape` on the current CUDA device: dense
    cuBLAS (the unpruned weight) vs the Triton bitmap kernel (unstructured pruning at `sparsity`) vs PyTorch 2:4.

    Each sparse result is also checked against a float64 reference (snr_db). Times come from
    triton.testing.do_bench (CUDA events, L2 flushed between runs). Needs a CUDA GPU and triton.
    """
    if not torch.cuda.is_available():
        raise SALRError("bench_gpu_kernel needs a CUDA GPU; on CPU use check_triton_on_cpu with TRITON_INTERPRET=1")
    from salr.ops import triton as tb

    if not tb.HAS_TRITON:
        raise SALRError("the GPU benchmark needs the `triton` package: pip install triton")
    if tb.interpreting():
        raise SALRError("unset TRITON_INTERPRET to benchmark the compiled Triton kernel on the GPU")
    dt = _dtype(dtype)
    w_dense, x, w = _problem(shape, tokens, sparsity, dt, "cuda")
    w_dense = w_dense.to(dt)
    dense_ms = _time_ms(lambda: F.linear(x, w_dense), warmup_ms, rep_ms)

    bw = bitmap_format.encode(w)
    prefix = tb.bitmap_block_prefix(bw.bitmask, shape[1])

    def bitmap() -> torch.Tensor:
        return tb.triton_bitmap_linear(x, bw.bitmask, bw.values, bw.row_offsets, *shape, block_prefix=prefix)

    bitmap_snr = snr_db(bitmap(), x.double() @ w.double().T)  # the first call also autotunes
    bitmap_ms = _time_ms(bitmap, warmup_ms, rep_ms)
    result = {
        "device": torch.cuda.get_device_name(),
        "shape": list(shape),
        "tokens": tokens,
        "sparsity": sparsity,
        "dtype": str(dt).removeprefix("torch."),
        "timing": "triton.testing.do_bench median, ms",
        "dense_ms": dense_ms,
        "dense_tflops": 2.0 * tokens * shape[0] * shape[1] / dense_ms / 1e9,
        "dense_bytes": w_dense.numel() * w_dense.element_size(),
        "bitmap_snr_db": bitmap_snr,
        "bitmap_triton_ms": bitmap_ms,
        # which path triton_bitmap_linear took at this M: the fused decode + GEMM kernel, or W decoded once + cuBLAS
        "bitmap_path": "decode+cublas" if tb.uses_dense_decode(tokens) else "fused",
        "bitmap_bytes": bw.nbytes + prefix.numel() * prefix.element_size(),
        "bitmap_speedup_vs_dense": dense_ms / bitmap_ms,
        **_bench_semi_structured(w_dense, x, dense_ms, warmup_ms, rep_ms),
    }
    logger.info("bench %s tokens=%d: %s", shape, tokens, result)
    return result


def bench_gpu_qkernel(
    shape: tuple[int, int],
    tokens: int,
    sparsity: float = 0.5,
    quant: str = "nf4",
    warmup_ms: int = 25,
    rep_ms: int = 100,
) -> dict[str, Any]:
    """On a CUDA GPU: the Triton quantized-bitmap kernel (QSALR) vs cuBLAS dense bf16 and the Triton bf16 bitmap
    kernel, median ms by triton.testing.do_bench, with the quantized kernel's SNR against float64."""
    from salr.ops import triton as tb
    from salr.ops import triton_qbitmap

    if not torch.cuda.is_available() or not tb.HAS_TRITON or tb.interpreting():
        raise SALRError("bench_gpu_qkernel needs a CUDA GPU, triton, and TRITON_INTERPRET unset")
    w_dense, x, w = _problem(shape, tokens, sparsity, torch.bfloat16, "cuda")
    w_dense = w_dense.to(torch.bfloat16)
    bw = bitmap_format.encode(w)
    qw = bitmap_format.encode_quantized(w, w != 0, quant)
    qargs = (qw.bitmask, qw.q.codes, qw.q.scales(), qw.row_offsets, *shape, qw.q.blocksize)
    ref = x.double() @ bitmap_format.decode_quantized(qw, torch.float32).double().T
    ms = {
        "dense_ms": _time_ms(lambda: F.linear(x, w_dense), warmup_ms, rep_ms),
        "bitmap_bf16_triton_ms": _time_ms(
            lambda: tb.triton_bitmap_linear(x, bw.bitmask, bw.values, bw.row_offsets, *shape), warmup_ms, rep_ms
        ),
        "qbitmap_triton_ms": _time_ms(lambda: triton_qbitmap.triton_qbitmap_linear(x, *qargs), warmup_ms, rep_ms),
    }
    return {
        "device": torch.cuda.get_device_name(),
        "shape": list(shape),
        "tokens": tokens,
        "sparsity": sparsity,
        "quant": quant,
        "timing": "triton.testing.do_bench median, ms",
        **ms,
        "qbitmap_snr_db": snr_db(triton_qbitmap.triton_qbitmap_linear(x, *qargs), ref),
        "qbitmap_speedup_vs_dense": ms["dense_ms"] / ms["qbitmap_triton_ms"],
        **quantized_weight_bytes(shape, qw.nnz, quant, False),
    }


def triton_kernel_grid(
    shapes: Iterable[tuple[int, int]],
    tokens: Iterable[int],
    sparsity: float = 0.5,
    device: str = "cpu",
    quant: str = "none",
) -> dict[str, Any]:
    """The Triton bitmap kernel for every (shape, tokens): on a GPU, timings (`bench_gpu_kernel`, or
    `bench_gpu_qkernel` with `quant`); on the CPU under TRITON_INTERPRET=1, correctness only (`check_triton_on_cpu`:
    snr_db, max_abs_err against float64)."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SALRError("--device cuda but no CUDA device is available")
        if quant != "none":
            results = [bench_gpu_qkernel(shape, m, sparsity, quant) for shape in shapes for m in tokens]
            return {"environment": environment(), "results": results}
        case: Callable[..., dict] = bench_gpu_kernel
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise SALRError(
            "backend 'triton' needs CUDA (--device cuda) or, for a CPU correctness check only, "
            "TRITON_INTERPRET=1 in the environment"
        )
    else:
        results = [check_triton_on_cpu(shape, m, sparsity, quant=quant) for shape in shapes for m in tokens]
        return {"environment": environment(), "results": results}
    results = [case(shape, m, sparsity) for shape in shapes for m in tokens]
    return {"environment": environment(), "results": results}

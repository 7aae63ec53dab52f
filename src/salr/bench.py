"""Kernel benchmark for the bitmap base: torch dense bf16, torch dense fp32 and `salr::bitmap_linear` side by side.

The three are timed in one run with interleaved repetitions (A B C A B C ...), each sample long enough for the
timer, and the median is reported, so drifting machine load affects them alike. The bitmap output is checked
against the dense fp32 output (`max_rel_err`) so a fast wrong kernel cannot pass unnoticed.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from salr.errors import SALRError
from salr.kernels import cpu as cpu_kernel
from salr.sparse import format as bitmap_format
from salr.sparse import ops

logger = logging.getLogger(__name__)

SHAPES: list[tuple[int, int]] = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (14336, 4096), (4096, 14336)]
TOKENS: list[int] = [1, 4, 16, 128, 512]
MIN_SAMPLE_S = 2e-3  # each timed sample runs the function enough times to last at least this long


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
    """fp32 Gaussian weight with the `sparsity` fraction of smallest magnitudes set to zero (unstructured)."""
    if not 0.0 <= sparsity < 1.0:
        raise SALRError(f"sparsity must be in [0, 1), got {sparsity}")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    k = int(round(sparsity * w.numel()))
    if k:
        thresh = w.abs().flatten().kthvalue(k).values
        w[w.abs() <= thresh] = 0
    return w


def weight_bytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Checkpoint-bytes accounting of one weight: dense vs the bitmap format's ideal payload (1 bit/weight +
    kept values) and the row offsets it also stores."""
    dense = bitmap_format.dense_nbytes(shape, dtype)
    ideal = bitmap_format.ideal_bitmap_nbytes(shape, nnz, dtype)
    return {
        "dense_bytes": dense,
        "bitmap_ideal_bytes": ideal,
        "row_offsets_bytes": 8 * shape[0],
        "compression": dense / ideal,
        "bits_per_weight": 8 * ideal / (shape[0] * shape[1]),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, min_rounds: int = 5, budget_s: float = 1.0
) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds (order alternates) until
    `min_rounds` are done and `budget_s` has passed (at most 100 rounds)."""
    inner = {}
    for name, fn in fns.items():  # warm up, then pick the calls per sample
        fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        inner[name] = max(1, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < 100):
        for name in list(fns) if rounds % 2 == 0 else list(reversed(fns)):
            fn, n = fns[name], inner[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / n)
        rounds += 1
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def kernel_case(
    shape: tuple[int, int],
    tokens: int,
    sparsity: float = 0.5,
    backend: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    budget_s: float = 1.0,
) -> dict:
    """Time y = x @ W.T for one layer shape and token count: dense bf16, dense fp32, bitmap (bf16 values)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SALRError("--device cuda but no CUDA device is available")
    if backend in ("auto", "triton") and dev.type == "cuda":
        ops.register_triton_backend()
    rows, cols = shape
    w32 = pruned_weight(rows, cols, sparsity, seed).to(dev)
    w16 = w32.to(torch.bfloat16)
    bw = bitmap_format.encode(w16)
    g = torch.Generator().manual_seed(seed + 1)
    x32 = torch.randn(tokens, cols, generator=g).to(dev)
    x16 = x32.to(torch.bfloat16)
    args = (bw.bitmask, bw.values, bw.row_offsets, rows, cols)

    def bitmap() -> torch.Tensor:
        return ops.bitmap_linear_with(backend, x16, *args)

    with torch.inference_mode():
        y = bitmap().double()
        ref = F.linear(x16.float(), w16.float()).double()
        err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        ms = time_interleaved(
            {
                "dense_bf16": lambda: F.linear(x16, w16),
                "dense_fp32": lambda: F.linear(x32, w32),
                "bitmap": bitmap,
            },
            dev,
            budget_s=budget_s,
        )
    ran = _backend_label(backend, dev, tokens)
    return {
        "shape": [rows, cols],
        "tokens": tokens,
        "sparsity": sparsity,
        "density": bw.nnz / (rows * cols),
        "device": str(dev),
        "backend": ran,
        "dense_bf16_ms": ms["dense_bf16"],
        "dense_fp32_ms": ms["dense_fp32"],
        "bitmap_ms": ms["bitmap"],
        "speedup_vs_dense_bf16": ms["dense_bf16"] / ms["bitmap"],
        "speedup_vs_dense_fp32": ms["dense_fp32"] / ms["bitmap"],
        "max_rel_err": err,
        **weight_bytes(shape, bw.nnz, torch.bfloat16),
    }


def _backend_label(backend: str, device: torch.device, tokens: int) -> str:
    name = ops.backend_name(device) if backend == "auto" else backend
    if name == "cpu":
        name = f"cpu-{cpu_kernel.isa()}"
    if name.startswith("cpu-"):
        name += "-gemv" if tokens <= cpu_kernel.GEMV_MAX_TOKENS else "-decode+sgemm"
    return name


def environment() -> dict:
    """What the numbers were measured on (threads and load matter on a shared 2-core machine)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": cpu_kernel.isa() if cpu_kernel.available() else "none (native kernel not built)",
        "loadavg_1m": load[0],
    }


def kernel_grid(
    shapes: Iterable[tuple[int, int]] = SHAPES,
    tokens: Iterable[int] = TOKENS,
    sparsity: float = 0.5,
    backend: str = "auto",
    device: str = "cpu",
    budget_s: float = 1.0,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Every (shape, tokens) case; `progress(case)` is called after each one."""
    results = []
    for shape in shapes:
        for m in tokens:
            case = kernel_case(shape, m, sparsity, backend, device, budget_s=budget_s)
            results.append(case)
            if progress:
                progress(case)
    return {"environment": environment(), "results": results}


def format_row(case: dict) -> str:
    shape = "x".join(str(s) for s in case["shape"])
    return (
        f"{shape:>11} {case['tokens']:>5} {case['dense_bf16_ms']:>10.3f} {case['dense_fp32_ms']:>10.3f} "
        f"{case['bitmap_ms']:>10.3f} {case['speedup_vs_dense_bf16']:>8.2f}x {case['speedup_vs_dense_fp32']:>8.2f}x  "
        f"{case['backend']}"
    )


TABLE_HEADER = (
    f"{'shape':>11} {'M':>5} {'bf16 ms':>10} {'fp32 ms':>10} {'bitmap ms':>10} {'vs bf16':>9} {'vs fp32':>9}  backend"
)


def generation_bench(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32) -> dict:
    """End-to-end greedy generation timing of an already-built model (dense or with BitmapBase layers):
    prefill milliseconds and decode tokens/second. The caller loads/converts the model (salr.models, checkpoint)."""
    model.eval()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(max_new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
    return {
        "prompt_tokens": int(input_ids.shape[-1]),
        "new_tokens": max_new_tokens,
        "prefill_ms": 1e3 * prefill_s,
        "decode_tokens_per_s": max_new_tokens / decode_s if decode_s > 0 else float("inf"),
    }

"""Triton kernels: y = x @ W.T with W stored as a bitmap + packed nonzeros (the CUDA kernels of the salr ops,
loaded by salr.ops.schema on the first call on a CUDA tensor).

Layout (shared with the CPU kernel, the compressed-tensors "sparse-bitmask" format), for W [rows=N, cols=K]:
  bitmask     uint8 [N, ceil(K/8)], bit (c % 8) of byte [r, c // 8] set iff W[r, c] != 0 (LSB first)
  values      1-D bf16/fp16/fp32, the nonzeros in row-major order
  row_offsets int64 [N], start of each row in `values`
plus metadata computed once per weight and cached (see `bitmap_block_prefix`):
  block_prefix int32 [N, ceil(K/PREFIX_BLOCK)], nonzeros of the row before each PREFIX_BLOCK-column block.

Each program owns a BLOCK_M x BLOCK_N output tile and walks K in BLOCK_K steps. Per step it loads the
[BLOCK_N, BLOCK_K/8] bitmap bytes, popcounts them, takes an exclusive prefix sum over the bytes and a popcount of
the bits below each column, so every nonzero knows its index in `values` without a sequential scan:
  index(r, c) = row_offsets[r] + block_prefix[r, k0 / PREFIX_BLOCK] + byte_prefix + popcount(byte & ((1 << bit) - 1))
The decoded tile (zeros where the bit is clear) goes to `tl.dot`. The K loop is a `tl.range` with `num_stages`,
so the loads and decode of tile k+1 overlap the tensor-core multiply of tile k (the two-stage decode + GEMM).
Small M (decode, M <= 16) uses split-K with fp32 atomics to fill the GPU; large M (prefill) one K pass per tile.
An optional low-rank branch `((x @ A_cat.T) * scale) @ B_cat.T` is added in the epilogue.
The input gradient `grad_x = grad_y @ W` (`triton_bitmap_grad_input`) decodes the same tiles, walking W's rows.

Under TRITON_INTERPRET=1 the kernel runs on CPU tensors (for tests and the bench's interpreter mode).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable

import torch

from salr.bitmap_format import byte_popcounts, check_operands
from salr.errors import SALRError

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    # @triton.jit picks the interpreter when it decorates, so this is fixed at import time of this module
    _knobs = getattr(triton, "knobs", None)
    _INTERPRETED = bool(_knobs.runtime.interpret) if _knobs else os.environ.get("TRITON_INTERPRET", "0") == "1"
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False
    _INTERPRETED = False

PREFIX_BLOCK = 128  # columns per block_prefix entry; every BLOCK_K is a multiple of it (0.25 bit/weight of metadata)
DECODE_MAX_M = 16  # M up to this uses the split-K decode configs
# From this many rows of x up (and for input gradients of as many rows), the fused kernel would decode every W tile
# once per BLOCK_M rows of x: decode W once into a dense scratch matrix (`triton_bitmap_decode`) and let cuBLAS
# multiply. On an H200 the fused kernel was 6-7x slower than cuBLAS at M = 2048 (docs/benchmarks.md, GPU suite).
DENSE_DECODE_MIN_M = 64
DECODE_BLOCK = dict(BLOCK_N=32, BLOCK_K=128)  # the dense decode kernel's tile (BLOCK_K a multiple of PREFIX_BLOCK)
# SALR_TRITON_AUTOTUNE=0 (read at import): one fixed config per kernel instead of an autotuned list. The GPU suite's
# test stage sets it: autotuning compiles every config for every dtype and shape class the tests touch, which took
# over 3 minutes on an H200 machine. Timings (salr bench, the suite's kernel stages) keep autotuning.
AUTOTUNE = os.environ.get("SALR_TRITON_AUTOTUNE", "1") != "0"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def require_kernel_device(t: torch.Tensor) -> None:
    """Refuse a tensor the compiled kernels cannot take: they run on CUDA, or on the CPU under the interpreter.
    (The ahead-of-time compile check, benchmarks/triton_compile_check.py, lifts this to compile from CPU tensors.)"""
    if not HAS_TRITON:
        raise SALRError("the Triton kernels need the `triton` package: pip install triton")
    if t.device.type != "cuda" and not interpreting():
        raise SALRError(
            f"the Triton kernels run on CUDA tensors (got {t.device}); "
            "set TRITON_INTERPRET=1 before importing triton to run them on the CPU interpreter"
        )


def uses_dense_decode(m: int) -> bool:
    """Whether the ops decode W once and multiply with cuBLAS for `m` rows of x (else the fused kernel runs)."""
    return m >= DENSE_DECODE_MIN_M


def interpreting() -> bool:
    """True when this module's kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


# ----------------------------------------------------------------------------------------------------------------
# metadata


def bitmap_block_prefix(bitmask: torch.Tensor, cols: int, block: int = PREFIX_BLOCK) -> torch.Tensor:
    """int32 [rows, ceil(cols/block)]: number of nonzeros of each row before each `block`-column block.

    `bitmask` is uint8 [rows, ceil(cols/8)]; `block` must be a multiple of 8. Runs on the bitmask's device.
    """
    if block % 8:
        raise SALRError(f"prefix block must be a multiple of 8 columns, got {block}")
    rows, nbytes = bitmask.shape
    nblocks = -(-cols // block)
    counts = byte_popcounts(bitmask)  # [rows, nbytes]
    per_block = block // 8
    pad = nblocks * per_block - nbytes
    if pad > 0:
        counts = torch.nn.functional.pad(counts, (0, pad))
    block_counts = counts[:, : nblocks * per_block].reshape(rows, nblocks, per_block).sum(-1)
    # int32, not int16: an int16 prefix would halve this metadata, but it more than doubled the shared memory Triton
    # 3.9 gives the fused kernels for sm_90 (the NF4 prefill config no longer fitted), so it was left as is.
    return (torch.cumsum(block_counts, dim=1) - block_counts).to(torch.int32).contiguous()


# id(bitmask) -> (weakref to it, its version counter, prefix); entries leave when the bitmask is freed.
_PREFIX_CACHE: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def cached_block_prefix(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """`bitmap_block_prefix` computed once per bitmask tensor (recomputed if the tensor is modified in place)."""
    key = id(bitmask)
    hit = _PREFIX_CACHE.get(key)
    if hit is not None and hit[0]() is bitmask and hit[1] == bitmask._version and hit[2].device == bitmask.device:
        return hit[2]
    prefix = bitmap_block_prefix(bitmask, cols)
    ref = weakref.ref(bitmask, lambda _r, key=key: _PREFIX_CACHE.pop(key, None))
    _PREFIX_CACHE[key] = (ref, bitmask._version, prefix)
    return prefix


# ----------------------------------------------------------------------------------------------------------------
# kernel

if HAS_TRITON:
    # Only our own @triton.jit helpers are called from the kernel (no tl.cumsum, tl.cdiv or tl.zeros: jit functions
    # of triton's standard library): under TRITON_INTERPRET=1 those would be compiled-mode objects whenever triton
    # was imported before the variable was set (e.g. by transformers), and the interpreter refuses to call them.
    @triton.jit
    def _popcount8(b):
        # popcount of values in [0, 255], SWAR bit tricks on int32 lanes
        b = b - ((b >> 1) & 0x55)
        b = (b & 0x33) + ((b >> 2) & 0x33)
        return (b + (b >> 4)) & 0x0F

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _decode_tile(
        bitmask_ptr,
        values_ptr,
        prefix_ptr,
        rn,  # [BLOCK_N] rows of W
        n_ok,
        row_start,  # [BLOCK_N] row_offsets[rn], int64
        k0,  # first column, a multiple of PREFIX_BLOCK
        NBYTES,
        NPREFIX,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PREFIX_BLOCK: tl.constexpr,
    ):
        """The dense [BLOCK_N, BLOCK_K] tile W[rn, k0:k0+BLOCK_K] (zeros where the bit is clear or out of range)."""
        rbyte = tl.arange(0, BLOCK_K // 8)
        bitpos = tl.arange(0, 8)
        byte_col = k0 // 8 + rbyte
        bytes_ = tl.load(
            bitmask_ptr + rn[:, None].to(tl.int64) * NBYTES + byte_col[None, :],
            mask=n_ok[:, None] & (byte_col < NBYTES)[None, :],
            other=0,
        ).to(tl.int32)  # [BN, BK/8]
        base = tl.load(prefix_ptr + rn.to(tl.int64) * NPREFIX + k0 // PREFIX_BLOCK, mask=n_ok, other=0)
        cnt = _popcount8(bytes_)
        # nonzeros of the row before each byte: exclusive prefix sum over the bytes + the block prefix
        byte_prefix = tl.associative_scan(cnt, 1, _add) - cnt + base[:, None]
        b3 = tl.reshape(bytes_, (BLOCK_N, BLOCK_K // 8, 1))
        present = ((b3 >> bitpos[None, None, :]) & 1) != 0  # [BN, BK/8, 8]
        below = _popcount8(b3 & ((1 << bitpos[None, None, :]) - 1))
        rank = tl.reshape(byte_prefix, (BLOCK_N, BLOCK_K // 8, 1)) + below
        rank = tl.reshape(rank, (BLOCK_N, BLOCK_K))
        present = tl.reshape(present, (BLOCK_N, BLOCK_K))
        return tl.load(values_ptr + row_start[:, None] + rank.to(tl.int64), mask=present, other=0.0)

    @triton.jit
    def _bitmap_linear_kernel(
        x_ptr,
        bitmask_ptr,
        values_ptr,
        row_offsets_ptr,
        prefix_ptr,
        out_ptr,
        t_ptr,  # adapter: t = (x @ A_cat.T) * scale, [M, R] (unused unless HAS_LORA)
        b_ptr,  # adapter: B_cat [N, R]
        M,
        N,
        K,
        R,
        M_BUCKET,  # autotune key only: next power of two of M
        stride_xm,
        stride_xk,
        stride_om,
        stride_on,
        stride_tm,
        stride_bn,
        NBYTES,  # bitmask row stride, ceil(K / 8)
        NPREFIX,  # block_prefix row stride, ceil(K / PREFIX_BLOCK)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
        SPLIT_K: tl.constexpr,
        NUM_STAGES: tl.constexpr,
        PREFIX_BLOCK: tl.constexpr,
        HAS_LORA: tl.constexpr,
        DOT_FP32: tl.constexpr,  # upcast dot operands (the interpreter's bf16 dot is wrong)
        INPUT_PRECISION: tl.constexpr,
    ):
        # grouped ordering of output tiles so neighbouring programs share x rows / W rows in L2
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
        num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
        group_size = GROUP_M * num_pid_n
        first_m = (pid // group_size) * GROUP_M
        group_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % group_m
        pid_n = (pid % group_size) // group_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        row_start = tl.load(row_offsets_ptr + rn, mask=n_ok, other=0).to(tl.int64)  # [BN]

        num_kb = (K + BLOCK_K - 1) // BLOCK_K
        kb_per_split = (num_kb + SPLIT_K - 1) // SPLIT_K
        kb_begin = pid_k * kb_per_split
        kb_end = min(kb_begin + kb_per_split, num_kb)

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for kb in tl.range(kb_begin, kb_end, num_stages=NUM_STAGES):
            k0 = kb * BLOCK_K
            # stage 1: decode the [BN, BK] tile of W from its bitmap bytes and packed values
            w = _decode_tile(
                bitmask_ptr, values_ptr, prefix_ptr, rn, n_ok, row_start, k0, NBYTES, NPREFIX,
                BLOCK_N, BLOCK_K, PREFIX_BLOCK,
            )  # fmt: skip
            # stage 2: multiply
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk,
                mask=m_ok[:, None] & (rk < K)[None, :],
                other=0.0,
            )
            if DOT_FP32:
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=INPUT_PRECISION)

        if HAS_LORA:
            if pid_k == 0:
                rr = tl.arange(0, BLOCK_R)
                r_ok = rr < R
                t = tl.load(
                    t_ptr + rm[:, None] * stride_tm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0
                )
                bb = tl.load(
                    b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0
                )
                if DOT_FP32:
                    acc = tl.dot(t.to(tl.float32), tl.trans(bb.to(tl.float32)), acc, input_precision=INPUT_PRECISION)
                else:
                    acc = tl.dot(t, tl.trans(bb.to(t.dtype)), acc, input_precision=INPUT_PRECISION)

        out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
        out_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)

    @triton.jit
    def _bitmap_decode_kernel(
        bitmask_ptr,
        values_ptr,
        row_offsets_ptr,
        prefix_ptr,
        out_ptr,  # dense W [N, K]
        N,
        K,
        stride_on,
        NBYTES,
        NPREFIX,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PREFIX_BLOCK: tl.constexpr,
    ):
        # one [BLOCK_N, BLOCK_K] tile of W per program, decoded exactly as the GEMM kernels do, stored dense
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        n_ok = rn < N
        row_start = tl.load(row_offsets_ptr + rn, mask=n_ok, other=0).to(tl.int64)
        w = _decode_tile(
            bitmask_ptr, values_ptr, prefix_ptr, rn, n_ok, row_start, k0, NBYTES, NPREFIX,
            BLOCK_N, BLOCK_K, PREFIX_BLOCK,
        )  # fmt: skip
        rk = k0 + tl.arange(0, BLOCK_K)
        out_ptrs = out_ptr + rn[:, None].to(tl.int64) * stride_on + rk[None, :]
        tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & (rk < K)[None, :])

    @triton.jit
    def _bitmap_grad_input_kernel(
        g_ptr,  # grad_y [M, N]
        bitmask_ptr,
        values_ptr,
        row_offsets_ptr,
        prefix_ptr,
        out_ptr,  # grad_x [M, K]
        M,
        N,
        K,
        M_BUCKET,  # autotune key only
        stride_gm,
        stride_gn,
        stride_om,
        stride_ok,
        NBYTES,
        NPREFIX,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        NUM_STAGES: tl.constexpr,
        PREFIX_BLOCK: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        # grad_x = grad_y @ W: each program owns a [BLOCK_M, BLOCK_K] tile of grad_x and walks the rows of W
        # (the reduction dim) in BLOCK_N steps, decoding W[n0:n0+BN, k0:k0+BK] exactly as the forward kernel does.
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        k0 = pid_k * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        m_ok = rm < M
        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
        for nb in tl.range(0, (N + BLOCK_N - 1) // BLOCK_N, num_stages=NUM_STAGES):
            rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            row_start = tl.load(row_offsets_ptr + rn, mask=n_ok, other=0).to(tl.int64)
            w = _decode_tile(
                bitmask_ptr, values_ptr, prefix_ptr, rn, n_ok, row_start, k0, NBYTES, NPREFIX,
                BLOCK_N, BLOCK_K, PREFIX_BLOCK,
            )  # fmt: skip
            g = tl.load(
                g_ptr + rm[:, None].to(tl.int64) * stride_gm + rn[None, :] * stride_gn,
                mask=m_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            if DOT_FP32:
                acc = tl.dot(g.to(tl.float32), w.to(tl.float32), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(g, w.to(g.dtype), acc, input_precision=INPUT_PRECISION)
        out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rk[None, :] * stride_ok
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (rk < K)[None, :])

    def _cfg(bm: int, bn: int, bk: int, split_k: int, warps: int, stages: int) -> triton.Config:
        kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, NUM_STAGES=stages, GROUP_M=8)
        return triton.Config(kw, num_warps=warps, num_stages=stages)

    # GPU configs (small on purpose: autotuning time is paid on first use of each shape bucket)
    _DECODE_CONFIGS = [_cfg(16, bn, 128, sk, 4, 3) for bn in (32, 64, 128) for sk in (1, 4, 8)]
    _DECODE_CONFIGS += [_cfg(16, 64, 256, sk, 4, 3) for sk in (1, 4)]
    _PREFILL_CONFIGS = [
        _cfg(128, 128, 128, 1, 8, 3),
        _cfg(128, 64, 128, 1, 4, 3),
        _cfg(64, 128, 128, 1, 4, 3),
        _cfg(64, 64, 128, 1, 4, 4),
        _cfg(32, 64, 128, 1, 4, 4),
    ]
    if not AUTOTUNE:  # split-K decode (the atomic path), a plain prefill tile
        _DECODE_CONFIGS, _PREFILL_CONFIGS = [_cfg(16, 64, 128, 4, 4, 3)], [_cfg(64, 64, 128, 1, 4, 4)]
    _KEY = ["M_BUCKET", "N", "K", "HAS_LORA"]
    _decode_tuned = triton.autotune(_DECODE_CONFIGS, key=_KEY, reset_to_zero=["out_ptr"])(_bitmap_linear_kernel)
    _prefill_tuned = triton.autotune(_PREFILL_CONFIGS, key=_KEY)(_bitmap_linear_kernel)
    _GRAD_CONFIGS = [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, NUM_STAGES=3), num_warps=4, num_stages=3)
        for bm, bn in ((16, 64), (32, 64), (64, 64), (128, 64), (64, 32))
    ][: None if AUTOTUNE else 1]
    _grad_tuned = triton.autotune(_GRAD_CONFIGS, key=["M_BUCKET", "N", "K"])(_bitmap_grad_input_kernel)

# fixed small configs for the interpreter; the decode one uses split-K so the atomic path is exercised too
_INTERPRET_DECODE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, NUM_STAGES=2, GROUP_M=8)
_INTERPRET_PREFILL = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, NUM_STAGES=2, GROUP_M=8)
_INTERPRET_GRAD = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, NUM_STAGES=2)


# ----------------------------------------------------------------------------------------------------------------
# host wrapper


def _check(
    x: torch.Tensor,
    bitmask: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    block_prefix: torch.Tensor | None,
    grad: bool = False,
) -> None:
    require_kernel_device(x)
    check_operands(bitmask, values, row_offsets, rows, cols)
    if values.device != x.device:
        raise SALRError(f"the bitmap weight is on {values.device} but x is on {x.device}: move them to one device")
    if x.dtype not in _DTYPES:
        raise SALRError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if grad and x.shape[-1] != rows:
        raise SALRError(f"grad_y has {x.shape[-1]} features but the bitmap weight has {rows} rows (outputs)")
    if not grad and x.shape[-1] != cols:
        raise SALRError(f"x has {x.shape[-1]} input features but the bitmap weight has {cols} columns")
    if block_prefix is not None:
        want = (rows, -(-cols // PREFIX_BLOCK))
        if block_prefix.dtype != torch.int32 or tuple(block_prefix.shape) != want:
            raise SALRError(
                f"block_prefix must be int32 {list(want)} (see bitmap_block_prefix), "
                f"got {block_prefix.dtype} {list(block_prefix.shape)}"
            )


def _kernel_operands(
    bitmask: torch.Tensor, values: torch.Tensor, cols: int, block_prefix: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous bitmask and block prefix (computed and cached if not given), and values with a valid pointer."""
    if block_prefix is None:
        block_prefix = cached_block_prefix(bitmask, cols)
    if values.numel() == 0:  # all-zero weight: keep a valid pointer, nothing is ever loaded from it
        values = values.new_zeros(1)
    return bitmask.contiguous(), values, block_prefix.contiguous()


def triton_bitmap_decode(
    bitmask: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    block_prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense W [rows, cols] (values' dtype) of a bitmap weight, decoded by one Triton kernel on its device."""
    require_kernel_device(values)
    check_operands(bitmask, values, row_offsets, rows, cols)
    return _decode_dense(*_kernel_operands(bitmask, values, cols, block_prefix), row_offsets, rows, cols)


def _decode_dense(bitmask, values, block_prefix, row_offsets, rows: int, cols: int) -> torch.Tensor:
    """triton_bitmap_decode on operands already checked and prepared (`_kernel_operands`)."""
    out = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    if rows == 0 or cols == 0:
        return out
    grid = (triton.cdiv(rows, DECODE_BLOCK["BLOCK_N"]), triton.cdiv(cols, DECODE_BLOCK["BLOCK_K"]))
    _bitmap_decode_kernel[grid](
        bitmask, values, row_offsets, block_prefix, out, rows, cols, out.stride(0), bitmask.shape[1],
        block_prefix.shape[1], PREFIX_BLOCK=PREFIX_BLOCK, num_warps=4, **DECODE_BLOCK,
    )  # fmt: skip
    return out


def triton_bitmap_linear(
    x: torch.Tensor,
    bitmask: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    block_prefix: torch.Tensor | None = None,
    *,
    a_cat: torch.Tensor | None = None,
    b_cat: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W.T (+ ((x @ a_cat.T) * scale) @ b_cat.T) with W [rows, cols] in bitmap form.

    x: [..., cols] bf16/fp16/fp32 (any strides); returns [..., rows] in x.dtype. `block_prefix` is the
    `bitmap_block_prefix` metadata; when omitted it is computed once per bitmask tensor and cached.
    Optional adapter: a_cat [r, cols], b_cat [rows, r], scale [r] (per-rank factor, default 1).
    Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1.
    """
    _check(x, bitmask, values, row_offsets, rows, cols, block_prefix)
    if (a_cat is None) != (b_cat is None):
        raise SALRError("pass both a_cat and b_cat for the adapter branch, or neither")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)
    m = x2.shape[0]
    if m == 0 or rows == 0:
        return x.new_zeros(*lead, rows)
    bitmask, values, block_prefix = _kernel_operands(bitmask, values, cols, block_prefix)

    has_lora = a_cat is not None
    if has_lora:
        r = a_cat.shape[0]
        if tuple(a_cat.shape) != (r, cols) or tuple(b_cat.shape) != (rows, r):
            raise SALRError(
                f"adapter shapes must be a_cat [r, {cols}] and b_cat [{rows}, r], "
                f"got {list(a_cat.shape)} and {list(b_cat.shape)}"
            )
        t = torch.nn.functional.linear(x2, a_cat.to(x.dtype))  # [M, r]: a small cuBLAS GEMM
        if scale is not None:
            t = t * scale.to(t.dtype)
        t = t.contiguous()
        b_cat = b_cat.to(x.dtype).contiguous()
        block_r = max(16, triton.next_power_of_2(r))
    else:
        r, block_r = 0, 16
        t = b_cat = x2  # placeholders, never read

    if uses_dense_decode(m):
        w = _decode_dense(bitmask, values, block_prefix, row_offsets, rows, cols).to(x.dtype)
        y = torch.nn.functional.linear(x2, w)
        if has_lora:
            y = y.addmm_(t, b_cat.T)
        return y.reshape(*lead, rows)
    decode = m <= DECODE_MAX_M
    out_dtype = torch.float32 if decode else x.dtype  # split-K accumulates with fp32 atomics
    out = torch.zeros(m, rows, dtype=out_dtype, device=x.device)
    interp = interpreting()
    args = (x2, bitmask, values, row_offsets, block_prefix, out, t, b_cat, m, rows, cols, r)
    args += (triton.next_power_of_2(m), x2.stride(0), x2.stride(1), out.stride(0), out.stride(1))
    args += (t.stride(0), b_cat.stride(0), bitmask.shape[1], block_prefix.shape[1])
    common = dict(
        BLOCK_R=block_r,
        PREFIX_BLOCK=PREFIX_BLOCK,
        HAS_LORA=has_lora,
        DOT_FP32=interp,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else None,
    )

    def grid(meta: dict) -> tuple[int, int]:
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(rows, meta["BLOCK_N"])
        return (tiles, meta["SPLIT_K"])

    if interp:
        cfg = _INTERPRET_DECODE if decode else _INTERPRET_PREFILL
        _bitmap_linear_kernel[grid(cfg)](*args, **common, **cfg)
    elif decode:
        _decode_tuned[grid](*args, **common)
    else:
        _prefill_tuned[grid](*args, **common)
    return out.to(x.dtype).reshape(*lead, rows)


GRAD_DECODE_BYTES = 32 * 2**20  # the most dense W the input gradient decodes at a time


def grad_input_by_row_blocks(
    g2: torch.Tensor, rows: int, cols: int, decode_rows: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """grad_y @ W for g2 [m, rows] as a sum over blocks of W's rows, each decoded densely by `decode_rows(r0, r1)`
    (at most GRAD_DECODE_BYTES of W) and multiplied by cuBLAS: the backward runs while the step's activations are all
    alive, so its transient stays small. Serves the bitmap and the quantized bitmap ops alike."""
    step = max(1, GRAD_DECODE_BYTES // (cols * g2.element_size()))
    out = None
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = decode_rows(r0, r1).to(g2.dtype)
        out = g2[:, r0:r1] @ w if out is None else out.addmm_(g2[:, r0:r1], w)
    return out


def triton_bitmap_grad_input(
    grad: torch.Tensor,
    bitmask: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    block_prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad_x = grad_y @ W with W [rows, cols] in bitmap form: grad [..., rows] -> [..., cols] in grad.dtype.

    The input gradient of `triton_bitmap_linear` (the base is frozen: no weight gradient), so fine-tuning on a
    compressed base never materialises a dense W. Same inputs, devices and metadata as `triton_bitmap_linear`.
    """
    _check(grad, bitmask, values, row_offsets, rows, cols, block_prefix, grad=True)
    lead = grad.shape[:-1]
    g2 = grad.reshape(-1, rows)
    m = g2.shape[0]
    if m == 0 or rows == 0 or cols == 0:
        return grad.new_zeros(*lead, cols)
    bitmask, values, block_prefix = _kernel_operands(bitmask, values, cols, block_prefix)
    if uses_dense_decode(m):

        def decode_rows(r0: int, r1: int) -> torch.Tensor:
            return _decode_dense(bitmask[r0:r1], values, block_prefix[r0:r1], row_offsets[r0:r1], r1 - r0, cols)

        return grad_input_by_row_blocks(g2, rows, cols, decode_rows).reshape(*lead, cols)
    out = torch.empty(m, cols, dtype=grad.dtype, device=grad.device)
    args = (g2, bitmask, values, row_offsets, block_prefix, out, m, rows, cols, triton.next_power_of_2(m))
    args += (g2.stride(0), g2.stride(1), out.stride(0), out.stride(1), bitmask.shape[1], block_prefix.shape[1])
    common = dict(
        PREFIX_BLOCK=PREFIX_BLOCK,
        DOT_FP32=interpreting(),
        INPUT_PRECISION="ieee" if grad.dtype == torch.float32 else None,
    )

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_K"]))

    if interpreting():
        _bitmap_grad_input_kernel[grid(_INTERPRET_GRAD)](*args, **common, **_INTERPRET_GRAD)
    else:
        _grad_tuned[grid](*args, **common)
    return out.reshape(*lead, cols)

"""Triton kernels for quantized bitmap bases (QSALR): y = x @ W.T and grad_x = grad_y @ W, with W's kept values stored
as NF4 codes (two per byte, high nibble first) or int8 codes plus one fp32 scale per block of `blocksize` consecutive
kept values (salr.bitmap_format). The CUDA kernels of salr::qbitmap_linear(_grad_input), loaded on first use.

Same tiling as salr.ops.triton (read its docstring): every program decodes [BLOCK_N, BLOCK_K] tiles of W from the
bitmap bytes, finding each kept value's index in the stream with popcounts and the cached per-block prefix, and feeds
them to `tl.dot`, the K loop pipelined with `num_stages`. The decode differs only in where a value comes from:
  index i = row_offsets[r] + rank  ->  code = nibble i of `codes` (NF4) or codes[i] (int8)
  value   = NF4[code] * absmax[i // blocksize]   (int8: (code * absmax[i // blocksize]) * fp32(1/127))
in fp32, the same arithmetic as the reference. Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import weakref

import torch

from salr.bitmap_format import NF4_CODE, check_quantized_operands
from salr.errors import SALRError
from salr.ops import triton as _bitmap_triton
from salr.ops.triton import (
    AUTOTUNE,
    DECODE_BLOCK,
    DECODE_MAX_M,
    HAS_TRITON,
    PREFIX_BLOCK,
    cached_block_prefix,
    interpreting,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from salr.ops.triton import _add, _popcount8

    @triton.jit
    def _qdecode_tile(
        bitmask_ptr,
        codes_ptr,
        absmax_ptr,
        lut_ptr,
        prefix_ptr,
        rn,
        n_ok,
        row_start,
        k0,
        NBYTES,
        NPREFIX,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PREFIX_BLOCK: tl.constexpr,
        IS_NF4: tl.constexpr,
        QBLOCK: tl.constexpr,  # values per scale block: a compile-time power of two, so idx // QBLOCK is a shift
    ):
        """The dense fp32 [BLOCK_N, BLOCK_K] tile W[rn, k0:k0+BLOCK_K] (zeros where the bit is clear)."""
        rbyte = tl.arange(0, BLOCK_K // 8)
        bitpos = tl.arange(0, 8)
        byte_col = k0 // 8 + rbyte
        bytes_ = tl.load(
            bitmask_ptr + rn[:, None].to(tl.int64) * NBYTES + byte_col[None, :],
            mask=n_ok[:, None] & (byte_col < NBYTES)[None, :],
            other=0,
        ).to(tl.int32)
        base = tl.load(prefix_ptr + rn.to(tl.int64) * NPREFIX + k0 // PREFIX_BLOCK, mask=n_ok, other=0)
        cnt = _popcount8(bytes_)
        byte_prefix = tl.associative_scan(cnt, 1, _add) - cnt + base[:, None]
        b3 = tl.reshape(bytes_, (BLOCK_N, BLOCK_K // 8, 1))
        present = ((b3 >> bitpos[None, None, :]) & 1) != 0
        below = _popcount8(b3 & ((1 << bitpos[None, None, :]) - 1))
        rank = tl.reshape(tl.reshape(byte_prefix, (BLOCK_N, BLOCK_K // 8, 1)) + below, (BLOCK_N, BLOCK_K))
        present = tl.reshape(present, (BLOCK_N, BLOCK_K))
        idx = row_start[:, None] + rank.to(tl.int64)  # index of each kept value in the stream
        scale = tl.load(absmax_ptr + idx // QBLOCK, mask=present, other=0.0)
        if IS_NF4:
            byte = tl.load(codes_ptr + (idx >> 1), mask=present, other=0).to(tl.int32)
            code = tl.where((idx & 1) == 0, byte >> 4, byte & 15)
            w = tl.load(lut_ptr + code, mask=present, other=0.0) * scale
        else:
            code = tl.load(codes_ptr + idx, mask=present, other=0).to(tl.float32)
            w = (code * scale) * 0.007874015718698502  # bitmap_format.INT8_INV127
        return tl.where(present, w, 0.0)

    @triton.jit
    def _qbitmap_linear_kernel(
        x_ptr,
        bitmask_ptr,
        codes_ptr,
        absmax_ptr,
        lut_ptr,
        row_offsets_ptr,
        prefix_ptr,
        out_ptr,
        M,
        N,
        K,
        M_BUCKET,  # autotune key only
        stride_xm,
        stride_xk,
        stride_om,
        stride_on,
        NBYTES,
        NPREFIX,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        NUM_STAGES: tl.constexpr,
        PREFIX_BLOCK: tl.constexpr,
        IS_NF4: tl.constexpr,
        QBLOCK: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        row_start = tl.load(row_offsets_ptr + rn, mask=n_ok, other=0).to(tl.int64)
        num_kb = (K + BLOCK_K - 1) // BLOCK_K
        kb_per_split = (num_kb + SPLIT_K - 1) // SPLIT_K
        kb_begin = pid_k * kb_per_split
        kb_end = min(kb_begin + kb_per_split, num_kb)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for kb in tl.range(kb_begin, kb_end, num_stages=NUM_STAGES):
            k0 = kb * BLOCK_K
            w = _qdecode_tile(
                bitmask_ptr, codes_ptr, absmax_ptr, lut_ptr, prefix_ptr, rn, n_ok, row_start, k0, NBYTES, NPREFIX,
                BLOCK_N, BLOCK_K, PREFIX_BLOCK, IS_NF4, QBLOCK,
            )  # fmt: skip
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk,
                mask=m_ok[:, None] & (rk < K)[None, :],
                other=0.0,
            )
            if DOT_FP32:
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=INPUT_PRECISION)
        out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
        out_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)

    @triton.jit
    def _qbitmap_grad_input_kernel(
        g_ptr,
        bitmask_ptr,
        codes_ptr,
        absmax_ptr,
        lut_ptr,
        row_offsets_ptr,
        prefix_ptr,
        out_ptr,
        M,
        N,
        K,
        M_BUCKET,
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
        IS_NF4: tl.constexpr,
        QBLOCK: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        # grad_x = grad_y @ W: a [BLOCK_M, BLOCK_K] tile of grad_x per program, walking W's rows in BLOCK_N steps
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
            w = _qdecode_tile(
                bitmask_ptr, codes_ptr, absmax_ptr, lut_ptr, prefix_ptr, rn, n_ok, row_start, k0, NBYTES, NPREFIX,
                BLOCK_N, BLOCK_K, PREFIX_BLOCK, IS_NF4, QBLOCK,
            )  # fmt: skip
            g = tl.load(
                g_ptr + rm[:, None].to(tl.int64) * stride_gm + rn[None, :] * stride_gn,
                mask=m_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            if DOT_FP32:
                acc = tl.dot(g.to(tl.float32), w, acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(g, w.to(g.dtype), acc, input_precision=INPUT_PRECISION)
        out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rk[None, :] * stride_ok
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (rk < K)[None, :])

    @triton.jit
    def _qbitmap_decode_kernel(
        bitmask_ptr,
        codes_ptr,
        absmax_ptr,
        lut_ptr,
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
        IS_NF4: tl.constexpr,
        QBLOCK: tl.constexpr,
    ):
        # one [BLOCK_N, BLOCK_K] tile of W per program, dequantized exactly as the GEMM kernels do, stored dense
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        n_ok = rn < N
        row_start = tl.load(row_offsets_ptr + rn, mask=n_ok, other=0).to(tl.int64)
        w = _qdecode_tile(
            bitmask_ptr, codes_ptr, absmax_ptr, lut_ptr, prefix_ptr, rn, n_ok, row_start, k0, NBYTES, NPREFIX,
            BLOCK_N, BLOCK_K, PREFIX_BLOCK, IS_NF4, QBLOCK,
        )  # fmt: skip
        rk = k0 + tl.arange(0, BLOCK_K)
        out_ptrs = out_ptr + rn[:, None].to(tl.int64) * stride_on + rk[None, :]
        tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & (rk < K)[None, :])

    def _cfg(bm: int, bn: int, bk: int, split_k: int, warps: int, stages: int) -> triton.Config:
        kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, NUM_STAGES=stages)
        return triton.Config(kw, num_warps=warps, num_stages=stages)

    _DECODE_CONFIGS = [_cfg(16, bn, 128, sk, 4, 3) for bn in (32, 64, 128) for sk in (1, 4, 8)]
    _PREFILL_CONFIGS = [_cfg(128, 128, 128, 1, 8, 3), _cfg(128, 64, 128, 1, 4, 3), _cfg(64, 64, 128, 1, 4, 4)]
    if not AUTOTUNE:  # SALR_TRITON_AUTOTUNE=0, as in salr.ops.triton
        _DECODE_CONFIGS, _PREFILL_CONFIGS = [_cfg(16, 64, 128, 4, 4, 3)], [_cfg(64, 64, 128, 1, 4, 4)]
    _KEY = ["M_BUCKET", "N", "K", "IS_NF4", "QBLOCK"]
    _decode_tuned = triton.autotune(_DECODE_CONFIGS, key=_KEY, reset_to_zero=["out_ptr"])(_qbitmap_linear_kernel)
    _prefill_tuned = triton.autotune(_PREFILL_CONFIGS, key=_KEY)(_qbitmap_linear_kernel)
    _GRAD_CONFIGS = [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=128, NUM_STAGES=3), num_warps=4, num_stages=3)
        for bm in (16, 64, 128)
    ][: None if AUTOTUNE else 1]
    _grad_tuned = triton.autotune(_GRAD_CONFIGS, key=["M_BUCKET", "N", "K", "IS_NF4", "QBLOCK"])(
        _qbitmap_grad_input_kernel
    )

_INTERPRET_DECODE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, NUM_STAGES=2)
_INTERPRET_PREFILL = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, NUM_STAGES=2)
_INTERPRET_GRAD = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, NUM_STAGES=2)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _nf4_lut(device: torch.device) -> torch.Tensor:
    return NF4_CODE.to(device)


# id(codes) -> (weakref to codes, the state that was checked): see _check_once
_CHECKED: dict[int, tuple[weakref.ref, tuple]] = {}


def _check_once(bitmask, codes, absmax, row_offsets, rows, cols, blocksize) -> None:
    """check_quantized_operands once per weight: its count of kept values reads a value back from the GPU (a sync
    that stalls every call). Checked again when any of the four tensors is another object or modified in place."""
    state = (id(bitmask), id(absmax), id(row_offsets), rows, cols, blocksize)
    state += tuple(t._version for t in (bitmask, codes, absmax, row_offsets))
    key = id(codes)
    hit = _CHECKED.get(key)
    if hit is not None and hit[0]() is codes and hit[1] == state:
        return
    check_quantized_operands(bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    _CHECKED[key] = (weakref.ref(codes, lambda _r, key=key: _CHECKED.pop(key, None)), state)


def _operands(x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize, features):
    _bitmap_triton.require_kernel_device(x)
    _check_once(bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    if codes.device != x.device:
        raise SALRError(f"the bitmap weight is on {codes.device} but the input on {x.device}: move them to one device")
    if x.dtype not in _DTYPES:
        raise SALRError(f"inputs must be bf16, fp16 or fp32, got {x.dtype}")
    if x.shape[-1] != features:
        raise SALRError(f"input has {x.shape[-1]} features, the quantized bitmap weight needs {features}")
    if codes.numel() == 0:  # nothing kept: valid pointers, never read
        codes, absmax = codes.new_zeros(1), absmax.new_zeros(1)
    prefix = cached_block_prefix(bitmask, cols)
    return bitmask.contiguous(), codes.contiguous(), absmax.contiguous(), prefix, _nf4_lut(x.device)


def triton_qbitmap_decode(
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense W [rows, cols] of a quantized bitmap weight in `dtype`: the fp32 dequantization (as the reference
    computes it) rounded once to `dtype`, by one Triton kernel on the weight's device."""
    probe = torch.empty(0, cols, dtype=dtype, device=codes.device)  # _operands checks a [.., cols] input
    operands = _operands(probe, bitmask, codes, absmax, row_offsets, rows, cols, blocksize, cols)
    return _decode(*operands, row_offsets, rows, cols, blocksize, dtype)


def _decode(bitmask, codes, absmax, prefix, lut, row_offsets, rows, cols, blocksize, dtype) -> torch.Tensor:
    """triton_qbitmap_decode on operands `_operands` has checked and prepared."""
    out = torch.empty(rows, cols, dtype=dtype, device=codes.device)
    if rows == 0 or cols == 0:
        return out
    grid = (triton.cdiv(rows, DECODE_BLOCK["BLOCK_N"]), triton.cdiv(cols, DECODE_BLOCK["BLOCK_K"]))
    _qbitmap_decode_kernel[grid](
        bitmask, codes, absmax, lut, row_offsets, prefix, out, rows, cols, out.stride(0), bitmask.shape[1],
        prefix.shape[1], PREFIX_BLOCK=PREFIX_BLOCK, IS_NF4=codes.dtype == torch.uint8, QBLOCK=blocksize,
        num_warps=4, **DECODE_BLOCK,
    )  # fmt: skip
    return out


def triton_qbitmap_linear(
    x: torch.Tensor,
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
) -> torch.Tensor:
    """y = x @ W.T for a quantized bitmap W [rows, cols]: x [..., cols] bf16/fp16/fp32 -> [..., rows] in x.dtype."""
    bitmask, codes, absmax, prefix, lut = _operands(
        x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize, cols
    )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)
    m = x2.shape[0]
    if m == 0 or rows == 0:
        return x.new_zeros(*lead, rows)
    if _bitmap_triton.uses_dense_decode(m):  # decode W once, then cuBLAS (as salr.ops.triton does)
        w = _decode(bitmask, codes, absmax, prefix, lut, row_offsets, rows, cols, blocksize, x.dtype)
        return torch.nn.functional.linear(x2, w).reshape(*lead, rows)
    decode = m <= DECODE_MAX_M
    out = torch.zeros(m, rows, dtype=torch.float32 if decode else x.dtype, device=x.device)
    args = (x2, bitmask, codes, absmax, lut, row_offsets, prefix, out, m, rows, cols, triton.next_power_of_2(m))
    args += (x2.stride(0), x2.stride(1), out.stride(0), out.stride(1), bitmask.shape[1], prefix.shape[1])
    common = dict(
        PREFIX_BLOCK=PREFIX_BLOCK,
        IS_NF4=codes.dtype == torch.uint8,
        QBLOCK=blocksize,
        DOT_FP32=interpreting(),
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else None,
    )

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(rows, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_K"])

    if interpreting():
        cfg = _INTERPRET_DECODE if decode else _INTERPRET_PREFILL
        _qbitmap_linear_kernel[grid(cfg)](*args, **common, **cfg)
    elif decode:
        _decode_tuned[grid](*args, **common)
    else:
        _prefill_tuned[grid](*args, **common)
    return out.to(x.dtype).reshape(*lead, rows)


def triton_qbitmap_grad_input(
    grad: torch.Tensor,
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
) -> torch.Tensor:
    """grad_x = grad_y @ W for a quantized bitmap W: grad [..., rows] -> [..., cols] in grad.dtype (no dense W)."""
    bitmask, codes, absmax, prefix, lut = _operands(
        grad, bitmask, codes, absmax, row_offsets, rows, cols, blocksize, rows
    )
    lead = grad.shape[:-1]
    g2 = grad.reshape(-1, rows)
    m = g2.shape[0]
    if m == 0 or rows == 0 or cols == 0:
        return grad.new_zeros(*lead, cols)
    if _bitmap_triton.uses_dense_decode(m):  # W a block of rows at a time, as the bitmap op's gradient

        def decode_rows(r0: int, r1: int) -> torch.Tensor:
            sliced = (bitmask[r0:r1], codes, absmax, prefix[r0:r1], lut, row_offsets[r0:r1])
            return _decode(*sliced, r1 - r0, cols, blocksize, grad.dtype)

        return _bitmap_triton.grad_input_by_row_blocks(g2, rows, cols, decode_rows).reshape(*lead, cols)
    out = torch.empty(m, cols, dtype=grad.dtype, device=grad.device)
    args = (g2, bitmask, codes, absmax, lut, row_offsets, prefix, out, m, rows, cols, triton.next_power_of_2(m))
    args += (g2.stride(0), g2.stride(1), out.stride(0), out.stride(1), bitmask.shape[1], prefix.shape[1])
    common = dict(
        PREFIX_BLOCK=PREFIX_BLOCK,
        IS_NF4=codes.dtype == torch.uint8,
        QBLOCK=blocksize,
        DOT_FP32=interpreting(),
        INPUT_PRECISION="ieee" if grad.dtype == torch.float32 else None,
    )

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_K"]))

    if interpreting():
        _qbitmap_grad_input_kernel[grid(_INTERPRET_GRAD)](*args, **common, **_INTERPRET_GRAD)
    else:
        _grad_tuned[grid](*args, **common)
    return out.reshape(*lead, cols)

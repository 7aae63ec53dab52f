"""The native CPU kernels of the salr ops (`salr._bitmap_cpu`, built from csrc/bitmap_cpu.c); registered as the ops'
"cpu" kernels when this module is imported (the reference runs where the extension was not built).

The extension is a plain C shared library called through ctypes with tensor data pointers (no torch headers, so
it builds in pip's isolated environment). Two paths:
  - few tokens (M <= GEMV_MAX_TOKENS): the C kernel streams the bitmap once and FMAs each expanded byte against
    every token (memory bound: reads ~9 bits/weight at 50 % sparsity instead of 16);
  - many tokens: the C kernel decodes row tiles of W to fp32 and torch.mm (MKL sgemm) multiplies them. With bf16
    values, a bf16 input and a CPU with native bf16 matmul (AVX512-BF16 or AMX), the tiles are the bf16 values
    themselves and torch's bf16 matmul (fp32 accumulation) multiplies them: the same products, in 2-7x less time on
    an AMX CPU (docs/benchmarks.md, section 9). Quantized (NF4/int8) bases with a bf16 input then take bf16 tiles
    too: the fp32 dequantization rounded to bf16, the one rounding step outside fp32 in these kernels.
Accumulation is fp32 everywhere; the result is cast to x.dtype. SALR_CPU_ISA=scalar forces the portable path;
SALR_CPU_TILES=fp32 keeps fp32 tiles where bf16 ones would be used (to compare the two). With AVX512-BF16 the
few-token path of bf16 values may multiply a bf16 input with vdpbf16ps (the same exact products, summed in fp32):
by default on AMD CPUs, where it measured faster; SALR_CPU_BF16_DOT=on|off chooses.

`salr_linear_decode` runs a whole SALR layer (bitmap base + both adapter GEMVs + bias) for a few tokens in one
call: in eager decoding the per-op dispatch of six small torch ops costs more than the arithmetic.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from salr import bitmap_format
from salr.errors import SALRError
from salr.ops import reference
from salr.ops.schema import (
    bitmap_linear,
    bitmap_linear_grad_input,
    qbitmap_linear,
    qbitmap_linear_grad_input,
    rank_scale,
    salr_linear,
)

logger = logging.getLogger(__name__)

GEMV_MAX_TOKENS = 8  # at or below: the fused GEMV kernel; above: decode tiles + matmul (measured crossover)
# NF4 (blocks >= 64) with a bf16 input on the vdpbf16ps path (bf16_dot()): its GEMV beats the tiles further
# (docs/benchmarks.md, section 16)
QGEMV_BF16_MAX_TOKENS = 16
PARALLEL_MIN_WEIGHTS = 1 << 20  # below: one thread (1536x576 takes ~90 us on one; a thread hand-off costs 10+ us)
TILE_BYTES = 16 << 20  # fp32 bytes per decoded tile: few tiles = few thread hand-offs (measured, loaded 2 cores)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ISA_CODES = {"scalar": 0, "avx2": 1, "avx512": 2}  # avx512: bf16 values take vpexpandw (csrc)
_BF16_DOT_FLAG = 16  # csrc ISA_BF16_DOT: on the isa code of the few-token entry points (gemv, layer decode)
_X_CODES = {torch.float32: 0, torch.bfloat16: 2}  # activation dtypes of the fused decode path

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


@functools.cache
def load() -> ctypes.CDLL | None:
    """The native library, or None (logged once) when the extension was not built."""
    spec = importlib.util.find_spec("salr._bitmap_cpu")
    if spec is None or not spec.origin:
        logger.info("native CPU kernel salr._bitmap_cpu is not built: using the reference backend")
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as exc:
        logger.warning("could not load the native CPU kernel %s: %s", spec.origin, exc)
        return None
    lib.salr_cpu_has_avx2.restype = _INT
    lib.salr_cpu_has_avx512.restype = _INT
    lib.salr_cpu_max_threads.restype = _INT
    lib.salr_cpu_has_bf16_matmul.restype = _INT
    lib.salr_cpu_has_avx512_bf16_dot.restype = _INT
    lib.salr_cpu_flush.argtypes = [_P, _I64]
    lib.salr_cpu_flush.restype = _INT
    common = [_INT, _INT, _P, _P, _P, _I64, _I64, _I64]
    lib.salr_bitmap_gemv.argtypes = common + [_P, _I64, _I64, _P, _I64, _INT]
    lib.salr_bitmap_gemv.restype = _I64
    lib.salr_bitmap_decode.argtypes = common + [_I64, _I64, _P, _I64, _INT]
    lib.salr_bitmap_decode.restype = _I64
    lib.salr_bitmap_decode16.argtypes = [_INT, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P, _I64, _INT]
    lib.salr_bitmap_decode16.restype = _I64
    lib.salr_linear_decode.argtypes = common + [_INT, _P, _I64, _I64, _INT, _I64, _I64, ctypes.c_float, _P, _P, _P]
    lib.salr_linear_decode.argtypes += [_P, _I64, _INT]
    lib.salr_linear_decode.restype = _I64
    qcommon = [_INT, _INT, _P, _P, _P, _I64, _P, _I64, _I64, _I64]  # isa, kind, bitmask, codes, absmax, bs, offs, ...
    lib.salr_qbitmap_gemv.argtypes = qcommon + [_P, _I64, _I64, _P, _I64, _INT]
    lib.salr_qbitmap_gemv.restype = _I64
    lib.salr_qbitmap_decode.argtypes = qcommon + [_I64, _I64, _P, _I64, _INT]
    lib.salr_qbitmap_decode.restype = _I64
    lib.salr_qbitmap_decode_bf16.argtypes = qcommon + [_I64, _I64, _P, _I64, _INT]
    lib.salr_qbitmap_decode_bf16.restype = _I64
    lib.salr_qlinear_decode.argtypes = qcommon + [_INT, _P, _I64, _I64, _INT, _I64, _I64, ctypes.c_float, _P, _P]
    lib.salr_qlinear_decode.argtypes += [_P, _P, _I64, _INT]
    lib.salr_qlinear_decode.restype = _I64
    return lib


class DecodeCalls(NamedTuple):
    """The fused decode entry points of the native library, as the hot path calls them."""

    linear: Callable[..., int]  # salr_linear_decode's arguments -> its int64 result
    qlinear: Callable[..., int]  # salr_qlinear_decode's
    binding: str  # "fastcall" (salr._fastcall) or "ctypes" (~2.3 us more a call: 22 arguments converted)


@functools.cache
def decode_calls() -> DecodeCalls | None:
    """How to call the fused decode kernels: through salr._fastcall's CPython bindings of the very same functions
    where that optional extension was built, else through ctypes. None without the native library."""
    lib = load()
    if lib is None:
        return None
    try:
        _fastcall = importlib.import_module("salr._fastcall")
    except ImportError:
        logger.info("salr._fastcall is not built: the fused decode calls go through ctypes (~2 us more per layer)")
        return DecodeCalls(lib.salr_linear_decode, lib.salr_qlinear_decode, "ctypes")
    address = functools.partial(ctypes.cast, typ=ctypes.c_void_p)
    _fastcall.bind(address(lib.salr_linear_decode).value, address(lib.salr_qlinear_decode).value)
    return DecodeCalls(_fastcall.linear_decode, _fastcall.qlinear_decode, "fastcall")


def flush_from_caches(tensors: Iterable[torch.Tensor]) -> bool:
    """Evict these CPU tensors' memory from every cache level (for cold-cache timing); False where the native
    kernel is not built or cannot (not x86), in which case nothing was done."""
    lib = load()
    tensors = list(tensors)
    if lib is None or not all(t.device.type == "cpu" for t in tensors):
        return False
    ok = True
    for t in tensors:
        nbytes = t.untyped_storage().nbytes()
        if nbytes:
            ok = bool(lib.salr_cpu_flush(t.untyped_storage().data_ptr(), nbytes)) and ok
    return ok


def available() -> bool:
    """True when the native kernel is built and loadable."""
    return load() is not None


@functools.cache
def _cpu_isa() -> str:
    lib = load()
    if lib is None or not lib.salr_cpu_has_avx2():
        return "scalar"
    return "avx512" if lib.salr_cpu_has_avx512() else "avx2"


def supported_isas() -> list[str]:
    """The instruction sets this CPU can run, lowest first ("scalar", then "avx2", then "avx512")."""
    names = list(_ISA_CODES)
    return names[: names.index(_cpu_isa()) + 1]


def isa() -> str:
    """The instruction set the kernel uses: the best this CPU has ("avx512": AVX-512 with VBMI2, "avx2" or
    "scalar", detected at run time), or a lower one named by SALR_CPU_ISA (to compare paths or rule one out)."""
    forced = os.environ.get("SALR_CPU_ISA", "").lower()
    if not forced:
        return _cpu_isa()
    if forced not in _ISA_CODES:
        raise SALRError(f"SALR_CPU_ISA={forced!r} is not one of {', '.join(_ISA_CODES)}")
    if forced not in supported_isas():
        raise SALRError(f"SALR_CPU_ISA={forced} but this CPU supports only {', '.join(supported_isas())}")
    return forced


@functools.cache
def _bf16_dot_support() -> int:
    lib = load()
    return 0 if lib is None else int(lib.salr_cpu_has_avx512_bf16_dot())


def bf16_dot_supported() -> bool:
    """Whether this CPU and the chosen instruction set (SALR_CPU_ISA) have the vdpbf16ps GEMV (AVX512-BF16)."""
    return isa() == "avx512" and _bf16_dot_support() > 0


def bf16_dot() -> bool:
    """Whether the few-token GEMV of bf16 values, and of NF4 codes with blocks of >= 64 values, multiplies an
    exactly-bf16 input with vdpbf16ps (AVX512-BF16 on the AVX-512 path; NF4 weights then enter as their fp32
    dequantization rounded to bf16): SALR_CPU_BF16_DOT=on|off, or by default where it measured faster (AMD Zen 4:
    docs/benchmarks.md, sections 15 and 16; on an Intel Xeon it measured no faster for bf16 values, section 13)."""
    return _bf16_dot(isa())


def _bf16_dot(level: str) -> bool:
    """bf16_dot() for the instruction set `level` (the caller's isa(), read once per kernel call)."""
    forced = os.environ.get("SALR_CPU_BF16_DOT", "auto").lower()
    if forced not in ("auto", "on", "off"):
        raise SALRError(f"SALR_CPU_BF16_DOT={forced!r} is not one of auto, on, off")
    support = _bf16_dot_support() if level == "avx512" else 0
    if forced == "on" and not support:
        raise SALRError("SALR_CPU_BF16_DOT=on needs AVX512-BF16 and the avx512 kernels (SALR_CPU_ISA); this CPU or "
                        "setting has no vdpbf16ps path: unset the variable")  # fmt: skip
    return support > 0 and (forced == "on" or (forced == "auto" and support == 2))


# os.environ.get encodes its key on every call (~0.9 us, measured); the encoded mapping behind it (kept in step by
# os.environ, so monkeypatch.setenv and os.environ[...] = ... are seen at once) answers in ~0.05 us.
_ENVIRON_BYTES: dict[bytes, bytes] | None = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _gemv_isa_code() -> int:
    # Read on every layer call when decoding (~200 per token): the settings' strings key a cache of the code.
    if _ENVIRON_BYTES is None:
        return _isa_code(os.environ.get("SALR_CPU_ISA"), os.environ.get("SALR_CPU_BF16_DOT"))
    return _isa_code(_ENVIRON_BYTES.get(b"SALR_CPU_ISA"), _ENVIRON_BYTES.get(b"SALR_CPU_BF16_DOT"))


@functools.lru_cache(maxsize=16)
def _isa_code(isa_setting: str | bytes | None, bf16_dot_setting: str | bytes | None) -> int:
    """The isa argument of the few-token kernels for these SALR_CPU_ISA / SALR_CPU_BF16_DOT values (read by isa()
    and _bf16_dot, which raise on bad ones; an error is not cached)."""
    level = isa()
    return _ISA_CODES[level] | (_BF16_DOT_FLAG if _bf16_dot(level) else 0)


@functools.cache
def _native_bf16_matmul() -> bool:
    lib = load()
    return lib is not None and bool(lib.salr_cpu_has_bf16_matmul())


def bf16_tiles(x_dtype: torch.dtype, values_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the many-token path multiplies bf16 tiles of W rather than fp32 ones: for a bf16 input and bf16
    values (exact tiles) or quantized ones (values_dtype left at bf16: the fp32 dequantization rounded to bf16), on
    a CPU whose bf16 matmul is native, unless SALR_CPU_TILES=fp32."""
    forced = os.environ.get("SALR_CPU_TILES", "auto").lower()
    if forced not in ("auto", "fp32"):
        raise SALRError(f"SALR_CPU_TILES={forced!r} is not one of auto, fp32")
    return forced == "auto" and x_dtype == values_dtype == torch.bfloat16 and _native_bf16_matmul()


def _check_bad_row(bad: int) -> None:
    if bad == -2:
        raise SALRError("the native kernel refused its arguments (unsupported quantization or out of memory)")
    if bad >= 0:
        raise SALRError(
            f"bitmap row {bad}: row_offsets disagree with the bitmask popcount (corrupt or mismatched tensors); "
            "validate with salr.bitmap_format.validate"
        )


def _threads(work: int) -> int:
    # Small layers are not worth waking a second thread for.
    return 1 if work < PARALLEL_MIN_WEIGHTS else torch.get_num_threads()


def _check_args(bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int) -> None:
    bitmap_format.check_operands(bitmask, values, row_offsets, rows, cols)
    if values.device.type != "cpu":
        raise SALRError(f"the native CPU kernel needs CPU tensors, got {values.device}")


def _padded_x(x2: torch.Tensor, kp: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x as contiguous `dtype` [M, kp], zero columns past cols (the kernel reads whole bitmap bytes)."""
    cols = x2.shape[1]
    if kp == cols:
        return x2.to(dtype).contiguous()
    xp = x2.new_zeros(x2.shape[0], kp, dtype=dtype)
    xp[:, :cols] = x2
    return xp


def decode_rows(
    bitmask: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    r0: int,
    r1: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write rows [r0, r1) of W into out [>= r1 - r0, >= 8 * ceil(cols/8)] (contiguous rows); returns out. Columns
    past `cols` come out as zeros. fp32 `out`: W in fp32; `out` of the values' own 16-bit dtype (bf16 or fp16): the
    values bit for bit (the bf16 tiles of the many-token path)."""
    lib = load()
    kp = 8 * -(-cols // 8)
    as16 = out.dtype == values.dtype and values.element_size() == 2
    fits = out.stride(1) == 1 and out.shape[1] >= kp and out.shape[0] >= r1 - r0
    if not (out.dtype == torch.float32 or as16) or not fits:
        raise SALRError(
            f"decode buffer must be fp32 or {values.dtype} [>= {r1 - r0}, >= {kp}] with unit column stride, got "
            f"{out.dtype} {list(out.shape)}"
        )
    if as16:
        bad = lib.salr_bitmap_decode16(
            _ISA_CODES[isa()], bitmask.data_ptr(), values.data_ptr(), row_offsets.data_ptr(), values.numel(), rows,
            cols, r0, r1, out.data_ptr(), out.stride(0), _threads((r1 - r0) * kp),
        )  # fmt: skip
    else:
        bad = lib.salr_bitmap_decode(
            _ISA_CODES[isa()], _DTYPE_CODES[values.dtype], bitmask.data_ptr(), values.data_ptr(),
            row_offsets.data_ptr(), values.numel(), rows, cols, r0, r1, out.data_ptr(), out.stride(0),
            _threads((r1 - r0) * kp),
        )  # fmt: skip
    _check_bad_row(bad)
    return out


def _tile_rows(kp: int) -> int:
    return max(16, min(4096, (TILE_BYTES // (4 * kp)) // 16 * 16))


_workspace = threading.local()


def _tile_buffer(rows: int, kp: int, dtype: torch.dtype = torch.float32) -> tuple[int, torch.Tensor]:
    """(rows per tile, a `dtype` [min(tile, rows), kp] view of this thread's decode buffer). The buffer (TILE_BYTES)
    is kept between calls: a fresh one per layer call is page-faulted in again each time wherever the allocator
    returns freed blocks to the OS (docs/benchmarks.md, section 8). A 16-bit tile has the fp32 tile's rows."""
    tile = _tile_rows(kp)
    n = min(tile, rows)
    buf = getattr(_workspace, "tile", None)
    if buf is None or buf.numel() < n * kp:
        buf = _workspace.tile = torch.empty(n * kp, dtype=torch.float32)
    buf = buf[: n * kp] if dtype == torch.float32 else buf.view(dtype)[: n * kp]
    return tile, buf.view(n, kp)


TileDecode = Callable[[int, int, torch.Tensor], Any]  # decode(r0, r1, buf): rows [r0, r1) of W into buf


def _tiled_linear(xp: torch.Tensor, rows: int, kp: int, out_dtype: torch.dtype, decode: TileDecode) -> torch.Tensor:
    """Many tokens: y = xp @ W.T [m, rows] in out_dtype, from row tiles of W in xp's dtype (fp32, or bf16 when
    bf16_tiles) that `decode(r0, r1, buf)` writes. The output is written tile by tile (row-major, as nn.Linear
    returns it): no fp32 copy of the whole output is held (training calls this with m = batch * seq), only one
    tile's [m, tile] product when out_dtype is not the tiles' dtype."""
    tile, buf = _tile_buffer(rows, kp, xp.dtype)
    y = torch.empty(xp.shape[0], rows, dtype=out_dtype)
    for r0 in range(0, rows, tile):
        r1 = min(rows, r0 + tile)
        decode(r0, r1, buf)
        if r0 == 0 and r1 == rows and out_dtype == xp.dtype:
            torch.mm(xp, buf[:rows].T, out=y)
        else:
            y[:, r0:r1] = torch.mm(xp, buf[: r1 - r0].T)
    return y


def _tiled_grad_input(g2: torch.Tensor, rows: int, cols: int, decode: TileDecode) -> torch.Tensor:
    """grad_x = g2 @ W [m, cols] in g2.dtype, accumulating g2[:, tile] @ W[tile] in fp32 over the row tiles that
    `decode(r0, r1, buf)` writes (no dense copy of W; g2 is converted to fp32 a tile of columns at a time)."""
    kp = 8 * -(-cols // 8)
    gx = torch.zeros(g2.shape[0], kp, dtype=torch.float32)
    if g2.shape[0] and rows and cols:
        tile, buf = _tile_buffer(rows, kp)
        for r0 in range(0, rows, tile):
            r1 = min(rows, r0 + tile)
            decode(r0, r1, buf)
            gx.addmm_(g2[:, r0:r1].to(torch.float32), buf[: r1 - r0])
    gx = gx if kp == cols else gx[:, :cols]
    return gx if g2.dtype == torch.float32 else gx.to(g2.dtype)


def bitmap_linear_cpu(
    x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """y = x @ W.T with the native kernel: x [..., cols] (any float dtype and strides) -> [..., rows] in x.dtype."""
    lib = load()
    if lib is None:
        raise SALRError("the native CPU kernel is not built: reinstall salr (pip install -e .) or use the reference")
    _check_args(bitmask, values, row_offsets, rows, cols)
    if x.device.type != "cpu" or x.shape[-1] != cols:
        raise SALRError(f"x must be a CPU tensor [..., {cols}], got {list(x.shape)} on {x.device}")
    bitmask, values, row_offsets = bitmask.contiguous(), values.contiguous(), row_offsets.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)
    m = x2.shape[0]
    kp = 8 * -(-cols // 8)
    if m == 0 or rows == 0 or cols == 0:
        return x.new_zeros(*lead, rows)
    if m <= GEMV_MAX_TOKENS:
        xp = _padded_x(x2, kp)
        y = torch.empty(m, rows, dtype=torch.float32)
        bad = lib.salr_bitmap_gemv(
            _gemv_isa_code(), _DTYPE_CODES[values.dtype], bitmask.data_ptr(), values.data_ptr(),
            row_offsets.data_ptr(), values.numel(), rows, cols, xp.data_ptr(), m, kp, y.data_ptr(), rows,
            _threads(rows * kp),
        )  # fmt: skip
        _check_bad_row(bad)
        return y.to(x.dtype).reshape(*lead, rows)
    # Many tokens: decode row tiles of W (bf16 where bf16_tiles allows, else fp32) and let the matmul do the work.
    tiles = torch.bfloat16 if bf16_tiles(x.dtype, values.dtype) else torch.float32
    decode = functools.partial(decode_rows, bitmask, values, row_offsets, rows, cols)
    return _tiled_linear(_padded_x(x2, kp, tiles), rows, kp, x.dtype, decode).reshape(*lead, rows)


def bitmap_grad_input_cpu(
    grad: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """grad_x = grad_y @ W for a frozen bitmap W: grad [..., rows] -> [..., cols] in grad.dtype.
    Decodes row tiles of W to fp32 and accumulates grad[:, tile] @ W[tile] (no dense copy of W)."""
    if load() is None:
        raise SALRError("the native CPU kernel is not built: reinstall salr (pip install -e .) or use the reference")
    _check_args(bitmask, values, row_offsets, rows, cols)
    if grad.device.type != "cpu" or grad.shape[-1] != rows:
        raise SALRError(f"grad must be a CPU tensor [..., {rows}], got {list(grad.shape)} on {grad.device}")
    bitmask, values, row_offsets = bitmask.contiguous(), values.contiguous(), row_offsets.contiguous()
    lead = grad.shape[:-1]
    decode = functools.partial(decode_rows, bitmask, values, row_offsets, rows, cols)
    return _tiled_grad_input(grad.reshape(-1, rows), rows, cols, decode).reshape(*lead, cols)


def _decode_call(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, rows: int, cols: int
) -> tuple[DecodeCalls, tuple, torch.Tensor] | None:
    """What the one-call layer kernels share: (decode_calls(), the arguments after the base's (x dtype code, x, m, ldx,
    adapter dtype code, rank), y to fill) when the fused decode path applies, else None (see salr_linear_decode)."""
    calls = decode_calls()
    xdt = _X_CODES.get(x.dtype)
    adt = _DTYPE_CODES.get(A.dtype)
    if calls is None or xdt is None or adt is None or not (x.is_cpu and A.is_cpu):  # (4x cheaper than .device)
        return None
    shape = x.shape
    m = x.numel() // cols if shape[-1] == cols else 0
    if not 0 < m <= GEMV_MAX_TOKENS or not (x.is_contiguous() and A.is_contiguous() and B.is_contiguous()):
        return None
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return None
    rank, a_cols = A.shape
    if a_cols != cols or B.shape != (rows, rank) or B.dtype != A.dtype:
        raise SALRError(f"adapter shapes A {list(A.shape)}, B {list(B.shape)} do not fit a [{rows}, {cols}] layer")
    y = x.new_empty((*shape[:-1], rows))
    return calls, (xdt, x.data_ptr(), m, cols, adt, rank), y


def _decode_result(bad: int, y: torch.Tensor) -> torch.Tensor | None:
    """y, or None when the kernel declined the arguments (-2); a bad row raises."""
    if bad == -2:
        return None
    if bad != -1:
        _check_bad_row(bad)
    return y


def salr_linear_decode(
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
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """y = x W.T + ((x A.T) * s) B.T + bias for a few tokens (decode) in one native call, or None when this path
    does not apply (kernel not built, more than GEMV_MAX_TOKENS tokens, x not fp32/bf16, non-CPU or strided
    tensors): the caller then runs the ops one by one. s is 1 on the first residual_rank rows of A, lora_scale after.
    Hot path: only cheap checks, the bitmap was validated when it was built or loaded (the kernel still refuses
    rows whose popcount disagrees with the offsets)."""
    call = _decode_call(x, A, B, bias, rows, cols)
    if call is None:
        return None
    calls, x_args, y = call
    bad = calls.linear(
        _gemv_isa_code(), _DTYPE_CODES[values.dtype], bitmask.data_ptr(), values.data_ptr(), row_offsets.data_ptr(),
        values.numel(), rows, cols, *x_args, residual_rank, lora_scale, A.data_ptr(), B.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), rows, torch.get_num_threads(),
    )  # fmt: skip
    return _decode_result(bad, y)


# ----------------------------------------------------------------------------- registration as the ops' CPU kernels


@bitmap_linear.register_kernel("cpu")
def _bitmap_linear_kernel(x, bitmask, values, row_offsets, rows, cols):
    if available():
        return bitmap_linear_cpu(x, bitmask, values, row_offsets, rows, cols)
    return reference.bitmap_linear_reference(x, bitmask, values, row_offsets, rows, cols)


@bitmap_linear_grad_input.register_kernel("cpu")
def _bitmap_grad_input_kernel(grad, bitmask, values, row_offsets, rows, cols):
    if available():
        return bitmap_grad_input_cpu(grad, bitmask, values, row_offsets, rows, cols)
    return reference.bitmap_grad_input_reference(grad, bitmask, values, row_offsets, rows, cols)


@salr_linear.register_kernel("cpu")
def salr_linear_kernel(x, bitmask, values, row_offsets, rows, cols, A, B, residual_rank, lora_scale, bias):
    """The CPU kernel of `salr::salr_linear`: one native call for a few tokens, else the base kernel + adapters.

    SALRLinear calls this function directly on its eager decode path: a call through the torch dispatcher costs
    30-45 us (measured), more than a whole small layer's arithmetic."""
    y = salr_linear_decode(x, bitmask, values, row_offsets, rows, cols, A, B, residual_rank, lora_scale, bias)
    if y is not None:
        return y
    scale = rank_scale(A.shape[0], residual_rank, lora_scale, A)
    y = _bitmap_linear_kernel(x, bitmask, values, row_offsets, rows, cols)
    if bias is not None:
        y = y + bias.to(y.dtype)
    if A.shape[0] > 0:
        y = y + reference.adapter_reference(x, A, B, scale).to(y.dtype)
    return y


# ----------------------------------------------------------------------------- quantized bitmap bases (QSALR)

_KIND_CODES = {torch.uint8: 0, torch.int8: 1}  # codes dtype -> Q_NF4 / Q_INT8 of the C kernel


def _q_args(
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
) -> tuple:
    """The kernel's leading arguments after the ISA (kind, pointers, blocksize, n), checked; CPU tensors only."""
    n = bitmap_format.check_quantized_operands(bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    if codes.device.type != "cpu":
        raise SALRError(f"the native CPU kernel needs CPU tensors, got {codes.device}")
    if not (bitmask.is_contiguous() and codes.is_contiguous() and absmax.is_contiguous()):
        raise SALRError("the quantized bitmap tensors must be contiguous")
    return (_KIND_CODES[codes.dtype], bitmask.data_ptr(), codes.data_ptr(), absmax.data_ptr(), blocksize,
            row_offsets.contiguous().data_ptr(), n)  # fmt: skip


def qdecode_rows(
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
    r0: int,
    r1: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Rows [r0, r1) of a quantized bitmap W into out [>= r1 - r0, >= 8 * ceil(cols/8)]; returns out. fp32 `out`:
    the exact dequantization; bf16 `out`: that, rounded to nearest even (the bf16 tiles of the many-token path)."""
    kp = 8 * -(-cols // 8)
    fits = out.stride(1) == 1 and out.shape[1] >= kp and out.shape[0] >= r1 - r0
    if out.dtype not in (torch.float32, torch.bfloat16) or not fits:
        raise SALRError(f"decode buffer must be fp32 or bf16 [>= {r1 - r0}, >= {kp}] with unit column stride")
    args = _q_args(bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    decode = load().salr_qbitmap_decode if out.dtype == torch.float32 else load().salr_qbitmap_decode_bf16
    bad = decode(_ISA_CODES[isa()], *args, rows, cols, r0, r1, out.data_ptr(), out.stride(0), _threads((r1 - r0) * kp))
    _check_bad_row(bad)
    return out


def qgemv_max_tokens(codes: torch.Tensor, blocksize: int, x_dtype: torch.dtype, isa_code: int | None = None) -> int:
    """The most tokens the quantized GEMV takes before decode tiles + matmul do: QGEMV_BF16_MAX_TOKENS where the NF4
    kernel multiplies a bf16 input with vdpbf16ps, GEMV_MAX_TOKENS elsewhere. `isa_code`: the caller's
    _gemv_isa_code(), so one kernel call reads the settings once."""
    dot_flag = ((_gemv_isa_code() if isa_code is None else isa_code) & _BF16_DOT_FLAG) != 0
    dot = codes.dtype == torch.uint8 and blocksize >= 64 and x_dtype == torch.bfloat16 and dot_flag
    return QGEMV_BF16_MAX_TOKENS if dot else GEMV_MAX_TOKENS


def qbitmap_linear_cpu(
    x: torch.Tensor,
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
) -> torch.Tensor:
    """y = x @ W.T for a quantized bitmap W with the native kernel: x [..., cols] (any float dtype and strides) ->
    [..., rows] in x.dtype. M <= GEMV_MAX_TOKENS (QGEMV_BF16_MAX_TOKENS on the vdpbf16ps path): the
    decode-in-registers GEMV (with vdpbf16ps where bf16_dot() allows it and x is bf16: NF4 weights rounded to bf16, as
    bitsandbytes gives them to a bf16 compute dtype); more: fp32 row tiles + sgemm, or
    for a bf16 input where bf16_tiles allows it, the dequantized values rounded to bf16 tiles + torch's bf16 matmul
    (the rounding is the output's own: relative 2^-9 per weight, far below NF4's quantization step)."""
    lib = load()
    if lib is None:
        raise SALRError("the native CPU kernel is not built: reinstall salr (pip install -e .) or use the reference")
    args = _q_args(bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    if x.device.type != "cpu" or x.shape[-1] != cols:
        raise SALRError(f"x must be a CPU tensor [..., {cols}], got {list(x.shape)} on {x.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)
    m = x2.shape[0]
    kp = 8 * -(-cols // 8)
    if m == 0 or rows == 0 or cols == 0:
        return x.new_zeros(*lead, rows)
    isa_code = _gemv_isa_code()
    if m <= qgemv_max_tokens(codes, blocksize, x.dtype, isa_code):
        xp = _padded_x(x2, kp)
        y = torch.empty(m, rows, dtype=torch.float32)
        bad = lib.salr_qbitmap_gemv(
            isa_code, *args, rows, cols, xp.data_ptr(), m, kp, y.data_ptr(), rows, _threads(rows * kp)
        )
        _check_bad_row(bad)
        return y.to(x.dtype).reshape(*lead, rows)
    tiles = torch.bfloat16 if bf16_tiles(x.dtype) else torch.float32
    decode = functools.partial(qdecode_rows, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    return _tiled_linear(_padded_x(x2, kp, tiles), rows, kp, x.dtype, decode).reshape(*lead, rows)


def qbitmap_grad_input_cpu(
    grad: torch.Tensor,
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
) -> torch.Tensor:
    """grad_x = grad_y @ W for a frozen quantized bitmap W: grad [..., rows] -> [..., cols] in grad.dtype, from fp32
    row tiles of W (no dense copy of W)."""
    if load() is None:
        raise SALRError("the native CPU kernel is not built: reinstall salr (pip install -e .) or use the reference")
    _q_args(bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    if grad.device.type != "cpu" or grad.shape[-1] != rows:
        raise SALRError(f"grad must be a CPU tensor [..., {rows}], got {list(grad.shape)} on {grad.device}")
    lead = grad.shape[:-1]
    decode = functools.partial(qdecode_rows, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    return _tiled_grad_input(grad.reshape(-1, rows), rows, cols, decode).reshape(*lead, cols)


def qsalr_linear_decode(
    x: torch.Tensor,
    bitmask: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    row_offsets: torch.Tensor,
    rows: int,
    cols: int,
    blocksize: int,
    n: int,
    A: torch.Tensor,
    B: torch.Tensor,
    residual_rank: int,
    lora_scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """`salr_linear_decode` on a quantized bitmap base: the whole layer for a few tokens in one native call, or None
    where this path does not apply. Hot path: `n` (kept values) comes from the caller, whose base was validated."""
    call = _decode_call(x, A, B, bias, rows, cols)
    if call is None:
        return None
    calls, x_args, y = call
    bad = calls.qlinear(
        _gemv_isa_code(), _KIND_CODES[codes.dtype], bitmask.data_ptr(), codes.data_ptr(), absmax.data_ptr(),
        blocksize, row_offsets.data_ptr(), n, rows, cols, *x_args, residual_rank, lora_scale, A.data_ptr(),
        B.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), rows, torch.get_num_threads(),
    )  # fmt: skip
    return _decode_result(bad, y)


@qbitmap_linear.register_kernel("cpu")
def _qbitmap_linear_kernel(x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize):
    if available():
        return qbitmap_linear_cpu(x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    return reference.qbitmap_linear_reference(x, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)


@qbitmap_linear_grad_input.register_kernel("cpu")
def _qbitmap_grad_input_kernel(grad, bitmask, codes, absmax, row_offsets, rows, cols, blocksize):
    if available():
        return qbitmap_grad_input_cpu(grad, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)
    return reference.qbitmap_grad_input_reference(grad, bitmask, codes, absmax, row_offsets, rows, cols, blocksize)

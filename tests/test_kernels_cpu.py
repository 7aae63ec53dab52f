"""salr::bitmap_linear: native CPU kernel vs the reference, autograd, the fake impl, BitmapBase."""

import pytest
import torch

from salr import bitmap_format as fm
from salr import ops
from salr.bases import BitmapBase
from salr.errors import SALRError
from salr.ops import cpu, reference

native = pytest.mark.skipif(not cpu.available(), reason="native kernel not built (python setup.py build_ext -i)")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def make(rows, cols, dtype=torch.bfloat16, sparsity=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    if rows > 2:
        w[1] = 0  # an empty row
    w = w.to(dtype)
    return w, fm.encode(w)


def exact(x, w):
    """x @ w.T in float64 (the kernel accumulates in fp32, so compare against something better than both)."""
    return x.double() @ w.double().T


def rel_err(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# fp32 accumulation over up to ~2k terms; the output cast to x.dtype dominates for bf16/fp16 inputs
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16, 33, 130, 600])
@pytest.mark.parametrize("shape", [(37, 29), (64, 200), (19, 100), (300, 1037)])
def test_cpu_kernel_matches_reference(cpu_isa, dtype, m, shape):
    w, bw = make(*shape, dtype=dtype, seed=m)
    x = torch.randn(m, shape[1])
    y = cpu.bitmap_linear_cpu(x, bw.bitmask, bw.values, bw.row_offsets, *shape)
    assert y.shape == (m, shape[0]) and y.dtype == torch.float32
    assert rel_err(y, exact(x, w)) < TOL[torch.float32]


@native
@pytest.mark.parametrize("m", [1, 2, 8])
@pytest.mark.parametrize("cols", [64, 200, 1037])
def test_rows_at_the_end_of_the_values(cpu_isa, m, cols):
    """The AVX-512 GEMV reads whole 32-value chunks past a row's values when at least 32 more follow it (`slack`)
    and exactly the row's values in the last rows: a dense row ends the stream here, after near-empty ones, so both
    paths meet rows of every kind (a wrong chunk offset fails this test; an over-read would need a sanitizer)."""
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(6, cols, generator=g)
    w[0, ::3] = 0  # a long row first
    w[3] = 0  # empty rows among the last ones
    w[4, :-1] = 0  # one value at the very end of a row; the last row stays fully dense: its values end the tensor
    w = w.to(torch.bfloat16)
    bw = fm.encode(w)
    assert bw.values.numel() == int((w != 0).sum())
    x = torch.randn(m, cols, generator=g)
    y = cpu.bitmap_linear_cpu(x, bw.bitmask, bw.values, bw.row_offsets, 6, cols)
    ref = exact(x, w)
    assert rel_err(y, ref) < TOL[torch.float32]
    for r in range(6):  # row by row: a wrong short row would hide under the dense rows' larger outputs
        assert rel_err(y[:, r], ref[:, r]) < 1e-4  # an empty row's reference is 0: rel_err then needs y == 0 too


@native
@pytest.mark.parametrize("xdtype", DTYPES)
def test_3d_noncontiguous_input_keeps_dtype(xdtype):
    w, bw = make(96, 77, dtype=torch.bfloat16)
    base = torch.randn(77, 5, 3).to(xdtype)
    x = base.permute(2, 1, 0)  # [3, 5, 77], non-contiguous
    assert not x.is_contiguous()
    y = ops.bitmap_linear(x, bw.bitmask, bw.values, bw.row_offsets, 96, 77)
    assert y.shape == (3, 5, 96) and y.dtype == xdtype
    assert rel_err(y, exact(x, w)) < TOL[xdtype]
    ref = reference.bitmap_linear_reference(x, bw.bitmask, bw.values, bw.row_offsets, 96, 77)
    assert rel_err(y, ref.double()) < 2 * TOL[xdtype]


@native
@pytest.mark.parametrize("m", [1, 6, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_fallback_matches_avx2(monkeypatch, m, dtype):
    w, bw = make(50, 123, dtype=dtype, sparsity=0.7)
    x = torch.randn(m, 123)
    fast = cpu.bitmap_linear_cpu(x, bw.bitmask, bw.values, bw.row_offsets, 50, 123)
    monkeypatch.setenv("SALR_CPU_ISA", "scalar")
    assert cpu.isa() == "scalar"
    slow = cpu.bitmap_linear_cpu(x, bw.bitmask, bw.values, bw.row_offsets, 50, 123)
    assert rel_err(slow, exact(x, w)) < TOL[torch.float32]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("fp16_value", [1e-7, 6.1e-5, 65504.0, -(2.0**-24)])
def test_scalar_fp16_conversion_handles_subnormals_and_extremes(monkeypatch, fp16_value):
    w = torch.zeros(4, 16, dtype=torch.float16)
    w[2, 3] = fp16_value
    bw = fm.encode(w)
    x = torch.ones(1, 16)
    monkeypatch.setenv("SALR_CPU_ISA", "scalar")
    y = cpu.bitmap_linear_cpu(x, bw.bitmask, bw.values, bw.row_offsets, 4, 16)
    assert y[0, 2].item() == float(w[2, 3].float()) and y[0, [0, 1, 3]].abs().sum() == 0


@pytest.mark.parametrize("m", [1, 4, 70])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_input_gradient_matches_dense(m, dtype):
    w, bw = make(45, 66, dtype=dtype)
    x = torch.randn(2, m, 66, requires_grad=True)
    g = torch.randn(2, m, 45)
    ops.bitmap_linear(x, bw.bitmask, bw.values, bw.row_offsets, 45, 66).backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, w.float()).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_opcheck_schema_fake_and_autograd():
    _, bw = make(24, 40, dtype=torch.float32)
    x = torch.randn(3, 40, requires_grad=True)
    torch.library.opcheck(ops.bitmap_linear, (x, bw.bitmask, bw.values, bw.row_offsets, 24, 40))


def test_fake_tensor_shape_for_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, bw = make(24, 40)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (torch.randn(2, 7, 40, dtype=torch.float16), bw.bitmask, bw.values)]
        y = ops.bitmap_linear(*args, mode.from_tensor(bw.row_offsets), 24, 40)
    assert y.shape == (2, 7, 24) and y.dtype == torch.float16


@native
def test_corrupt_offsets_raise_instead_of_reading_out_of_bounds(cpu_isa):
    _, bw = make(20, 64)
    bad = bw.row_offsets.clone()
    bad[7] += 3
    for m in (1, 20):  # gemv path and decode path
        with pytest.raises(SALRError, match="row 7"):
            cpu.bitmap_linear_cpu(torch.randn(m, 64), bw.bitmask, bw.values, bad, 20, 64)
    with pytest.raises(SALRError, match="row"):  # values too short for the bitmap: last row overruns
        cpu.bitmap_linear_cpu(torch.randn(1, 64), bw.bitmask, bw.values[:-5], bw.row_offsets, 20, 64)


def test_backend_selection_errors():
    _, bw = make(8, 16)
    x = torch.randn(2, 16)
    with pytest.raises(SALRError, match="unknown backend"):
        ops.bitmap_linear_with("nope", x, bw.bitmask, bw.values, bw.row_offsets, 8, 16)
    with pytest.raises(SALRError, match="16 columns"):
        ops.bitmap_linear_with("reference", torch.randn(2, 15), bw.bitmask, bw.values, bw.row_offsets, 8, 16)
    with pytest.raises(SALRError, match="CUDA"):
        ops.bitmap_linear_with("triton", x, bw.bitmask, bw.values, bw.row_offsets, 8, 16)


# ------------------------------------------------------------------------------------------------ BitmapBase


def test_bitmap_base_forward_state_dict_and_dtype_moves():
    w, _ = make(40, 52, dtype=torch.bfloat16)
    base = BitmapBase.from_dense(w)
    assert base.shape == (40, 52) and base.dtype == torch.bfloat16
    assert torch.equal(base.to_dense(), w)
    assert base.nbytes == 40 * 7 + base.nnz * 2 + 40 * 8
    x = torch.randn(3, 52, dtype=torch.bfloat16)
    assert rel_err(base(x), exact(x, w)) < TOL[torch.bfloat16]

    loaded = BitmapBase.empty((40, 52), base.nnz, torch.bfloat16)
    loaded.load_state_dict(base.state_dict())
    assert set(base.state_dict()) == {"bitmask", "values", "row_offsets"}
    assert torch.equal(loaded.to_dense(), w)

    half = loaded.to(torch.float16)
    assert half.bitmask.dtype == torch.uint8 and half.row_offsets.dtype == torch.int64
    assert half.values.dtype == torch.float16 and half.dtype == torch.float16
    torch.testing.assert_close(half.to_dense(), w.to(torch.float16))


def test_bitmap_base_rejects_inconsistent_state_dict():
    w, _ = make(16, 24)
    sd = BitmapBase.from_dense(w).state_dict()
    sd["row_offsets"] = sd["row_offsets"].flip(0).contiguous()
    target = BitmapBase.empty((16, 24), sd["values"].numel())
    with pytest.raises(SALRError, match="row_offsets disagree"):
        target.load_state_dict(sd)


def test_bitmap_base_meta_empty_then_assign():
    w, _ = make(16, 24)
    sd = BitmapBase.from_dense(w).state_dict()
    target = BitmapBase.empty((16, 24), sd["values"].numel(), device="meta")
    target.load_state_dict(sd, assign=True)
    assert target.values.device.type == "cpu" and torch.equal(target.to_dense(), w)


@native
@pytest.mark.parametrize("m", [1, 3, 20])  # gemv (one token, a few tokens) and decode + sgemm
@pytest.mark.parametrize("extra_bit_col", [5, 700, 1033])  # a set bit in the first word, a middle word, the tail
def test_bitmap_with_extra_bits_is_caught_in_the_fast_path(cpu_isa, m, extra_bit_col):
    # Row 10 of 40 claims one more nonzero than its offsets give it: the AVX2 walk must notice it word by word
    # (rows far from the end of `values` take the AVX2 path) and raise, not read the next row's values.
    w, bw = make(40, 1037, sparsity=0.6)
    bitmask = bw.bitmask.clone()
    row = fm.unpack_mask(bitmask[10:11], 1037)[0]
    col = extra_bit_col + int((~row[extra_bit_col:]).nonzero()[0, 0])  # the first clear column from there on
    bitmask[10, col // 8] |= 1 << (col % 8)
    with pytest.raises(SALRError, match="row 10"):
        cpu.bitmap_linear_cpu(torch.randn(m, 1037), bitmask, bw.values, bw.row_offsets, 40, 1037)


@native
def test_multithreaded_gemv_matches_reference(cpu_isa):
    rows, cols = 1100, 1031  # above PARALLEL_MIN_WEIGHTS, rows not a multiple of the chunk, cols not of 64
    assert rows * cols >= cpu.PARALLEL_MIN_WEIGHTS
    w, bw = make(rows, cols)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(1, cols)
        y = cpu.bitmap_linear_cpu(x, bw.bitmask, bw.values, bw.row_offsets, rows, cols)
    finally:
        torch.set_num_threads(threads)
    assert rel_err(y, exact(x, w)) < TOL[torch.float32]


def adversarial(rows, cols, dtype, seed):
    """A weight with every kind of row the tiled paths must get right: all-zero, fully dense, a single nonzero in
    the last (padded) bitmap byte, and random rows at 50 %."""
    w, _ = make(rows, cols, dtype=torch.float32, seed=seed)
    w[0] = 0
    w[2] = torch.randn(cols)  # fully dense
    w[3] = 0
    w[3, cols - 1] = 1.5
    w = w.to(dtype)
    return w, fm.encode(w)


def force_tiles(monkeypatch, tiles: str) -> None:
    """Make the many-token path use `tiles` ("fp32" or "bf16") on any CPU: bf16 tiles need only torch's bf16
    matmul, which is slower without native bf16 but exact in what it computes."""
    if tiles == "bf16":
        monkeypatch.setattr(cpu, "_native_bf16_matmul", lambda: True)
        monkeypatch.delenv("SALR_CPU_TILES", raising=False)
    else:
        monkeypatch.setenv("SALR_CPU_TILES", "fp32")


@native
@pytest.mark.parametrize("tiles", ["fp32", "bf16"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,rows,cols", [(9, 53, 37), (40, 70, 129), (17, 16, 8), (12, 33, 230)])
def test_many_token_paths_across_tiles(cpu_isa, monkeypatch, tiles, xdtype, m, rows, cols):
    """Forward and input gradient with tiles smaller than the layer (a ragged last tile), non-contiguous inputs in
    bf16 / fp32, fp32 or bf16 tiles, against the plain-PyTorch reference."""
    force_tiles(monkeypatch, tiles)
    assert cpu.bf16_tiles(xdtype, torch.bfloat16) == (tiles == "bf16" and xdtype == torch.bfloat16)
    monkeypatch.setattr(cpu, "TILE_BYTES", 4 * 16 * 8 * -(-cols // 8))  # 16-row tiles
    w, bw = adversarial(rows, cols, torch.bfloat16, seed=m)
    args = (bw.bitmask, bw.values, bw.row_offsets, rows, cols)
    x = torch.randn(cols, m).to(xdtype).T  # [m, cols], non-contiguous
    y = cpu.bitmap_linear_cpu(x, *args)
    assert y.shape == (m, rows) and y.dtype == xdtype and y.is_contiguous()
    assert rel_err(y, exact(x, w)) < TOL[xdtype]
    assert rel_err(y, reference.bitmap_linear_reference(x, *args).double()) < 2 * TOL[xdtype]
    assert float(y[:, 0].abs().max()) == 0.0  # the all-zero row
    g = torch.randn(rows, m).to(xdtype).T
    gx = cpu.bitmap_grad_input_cpu(g, *args)
    assert gx.shape == (m, cols) and gx.dtype == xdtype
    assert rel_err(gx, g.double() @ w.double()) < TOL[xdtype]
    assert rel_err(gx, reference.bitmap_grad_input_reference(g, *args).double()) < 2 * TOL[xdtype]


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", [(7, 8), (53, 37), (70, 129), (33, 230), (5, 1)])
def test_decode_rows_in_16_bits_is_the_weight_bit_for_bit(cpu_isa, dtype, rows, cols):
    """16-bit tiles are the stored values themselves (all-zero, fully dense and end-heavy rows, ragged chunks), with
    zeros in the padding columns; a sub-range of rows lands at the top of the buffer."""
    w, bw = adversarial(rows, cols, dtype, seed=rows)
    kp = 8 * -(-cols // 8)
    out = torch.full((rows, kp + 5), float("nan"), dtype=dtype)[:, : kp + 3]  # row stride > kp
    cpu.decode_rows(bw.bitmask, bw.values, bw.row_offsets, rows, cols, 0, rows, out)
    assert torch.equal(out[:, :cols].view(torch.int16), w.view(torch.int16))
    assert not out[:, cols:kp].any()
    part = torch.empty(rows, kp, dtype=dtype)
    cpu.decode_rows(bw.bitmask, bw.values, bw.row_offsets, rows, cols, rows // 2, rows, part)
    assert torch.equal(part[: rows - rows // 2, :cols].view(torch.int16), w[rows // 2 :].view(torch.int16))


@native
def test_decode_rows_in_16_bits_refuses_corrupt_rows_and_wrong_buffers(cpu_isa):
    _, bw = adversarial(20, 64, torch.bfloat16, seed=3)
    bad = bw.row_offsets.clone()
    bad[7] += 3
    with pytest.raises(SALRError, match="row 7"):
        cpu.decode_rows(bw.bitmask, bw.values, bad, 20, 64, 0, 20, torch.empty(20, 64, dtype=torch.bfloat16))
    with pytest.raises(SALRError, match="fp32 or torch.bfloat16"):  # 16 bits, but not the values' type
        cpu.decode_rows(bw.bitmask, bw.values, bw.row_offsets, 20, 64, 0, 20, torch.empty(20, 64, dtype=torch.float16))
    _, b32 = adversarial(20, 64, torch.float32, seed=3)
    with pytest.raises(SALRError, match="fp32 or torch.float32"):  # fp32 values have no 16-bit tiles
        cpu.decode_rows(
            b32.bitmask, b32.values, b32.row_offsets, 20, 64, 0, 20, torch.empty(20, 64, dtype=torch.bfloat16)
        )
    with pytest.raises(SALRError, match="decode buffer"):
        cpu.decode_rows(
            bw.bitmask, bw.values, bw.row_offsets, 20, 64, 0, 20, torch.empty(20, 60, dtype=torch.bfloat16)
        )


def test_bf16_tiles_only_for_bf16_values_and_input(monkeypatch):
    monkeypatch.setattr(cpu, "_native_bf16_matmul", lambda: True)
    monkeypatch.delenv("SALR_CPU_TILES", raising=False)
    assert cpu.bf16_tiles(torch.bfloat16, torch.bfloat16)
    assert not cpu.bf16_tiles(torch.float32, torch.bfloat16)  # an fp32 input keeps fp32 arithmetic throughout
    assert not cpu.bf16_tiles(torch.bfloat16, torch.float16)
    monkeypatch.setenv("SALR_CPU_TILES", "fp32")
    assert not cpu.bf16_tiles(torch.bfloat16, torch.bfloat16)
    monkeypatch.setenv("SALR_CPU_TILES", "bf17")
    with pytest.raises(SALRError, match="SALR_CPU_TILES"):
        cpu.bf16_tiles(torch.bfloat16, torch.bfloat16)
    monkeypatch.delenv("SALR_CPU_TILES")
    monkeypatch.setattr(cpu, "_native_bf16_matmul", lambda: False)
    assert not cpu.bf16_tiles(torch.bfloat16, torch.bfloat16)


@native
def test_layers_sharing_the_decode_buffer_stay_independent(monkeypatch):
    """The many-token paths reuse one decode buffer per thread: a wide layer, a narrow one and the wide one again
    (forward and input gradient, bitmap and quantized) each match their own reference, and an earlier output is not
    overwritten by later calls."""
    monkeypatch.setattr(cpu, "TILE_BYTES", 4 * 16 * 304)  # several tiles for the wide layer
    x_wide, x_narrow = torch.randn(20, 300), torch.randn(20, 37)
    w_wide, b_wide = adversarial(90, 300, torch.bfloat16, seed=1)
    w_narrow, b_narrow = adversarial(41, 37, torch.bfloat16, seed=2)
    wide = (b_wide.bitmask, b_wide.values, b_wide.row_offsets, 90, 300)
    narrow = (b_narrow.bitmask, b_narrow.values, b_narrow.row_offsets, 41, 37)
    y1 = cpu.bitmap_linear_cpu(x_wide, *wide)
    kept = y1.clone()
    y2 = cpu.bitmap_linear_cpu(x_narrow, *narrow)
    g = torch.randn(20, 41)
    gx = cpu.bitmap_grad_input_cpu(g, *narrow)
    q = fm.encode_quantized(w_wide.float(), w_wide != 0, "nf4")
    qargs = (q.bitmask, q.q.codes, q.q.scales(), q.row_offsets, 90, 300, q.q.blocksize)
    yq = cpu.qbitmap_linear_cpu(x_wide, *qargs)
    y3 = cpu.bitmap_linear_cpu(x_wide, *wide)
    assert torch.equal(y1, kept) and torch.equal(y1, y3)
    assert rel_err(y1, exact(x_wide, w_wide)) < TOL[torch.float32]
    assert rel_err(y2, exact(x_narrow, w_narrow)) < TOL[torch.float32]
    assert rel_err(gx, g.double() @ w_narrow.double()) < TOL[torch.float32]
    torch.testing.assert_close(yq, reference.qbitmap_linear_reference(x_wide, *qargs), rtol=1e-4, atol=1e-4)


@native
def test_bf16_and_fp32_tiles_share_the_decode_buffer(monkeypatch):
    """A bf16 input (bf16 tiles), an fp32 one (fp32 tiles) and the bf16 one again, through the one per-thread buffer:
    each matches its reference and the first output is not overwritten."""
    force_tiles(monkeypatch, "bf16")
    monkeypatch.setattr(cpu, "TILE_BYTES", 4 * 16 * 304)  # several tiles for the wide layer
    w_wide, b_wide = adversarial(90, 300, torch.bfloat16, seed=4)
    w_narrow, b_narrow = adversarial(41, 37, torch.bfloat16, seed=5)
    wide = (b_wide.bitmask, b_wide.values, b_wide.row_offsets, 90, 300)
    narrow = (b_narrow.bitmask, b_narrow.values, b_narrow.row_offsets, 41, 37)
    x16, x32 = torch.randn(20, 300).to(torch.bfloat16), torch.randn(20, 37)
    y1 = cpu.bitmap_linear_cpu(x16, *wide)
    kept = y1.clone()
    y2 = cpu.bitmap_linear_cpu(x32, *narrow)
    y3 = cpu.bitmap_linear_cpu(x16, *wide)
    assert torch.equal(y1, kept) and torch.equal(y1, y3) and y1.dtype == torch.bfloat16
    assert rel_err(y1, exact(x16, w_wide)) < TOL[torch.bfloat16]
    assert rel_err(y2, exact(x32, w_narrow)) < TOL[torch.float32]


@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("cols", [29, 64, 1000, 1037])
def test_few_token_gemv_on_adversarial_rows(cpu_isa, m, cols):
    """The M <= 8 kernels (AVX-512 expands 32 columns per step, AVX2 8) on all-zero, fully dense and last-byte-only
    rows, with bf16 values and columns that leave 1-7 bitmap bytes after the last whole word."""
    w, bw = adversarial(70, cols, torch.bfloat16, seed=cols + m)
    x = torch.randn(cols, m).T  # non-contiguous
    y = cpu.bitmap_linear_cpu(x, bw.bitmask, bw.values, bw.row_offsets, 70, cols)
    assert rel_err(y, exact(x, w)) < TOL[torch.float32]
    assert float(y[:, 0].abs().max()) == 0.0
    torch.testing.assert_close(y[:, 3], 1.5 * x[:, cols - 1].float())  # the single nonzero in the last byte


def test_isa_override_errors(monkeypatch):
    monkeypatch.setenv("SALR_CPU_ISA", "sse9")
    with pytest.raises(SALRError, match="SALR_CPU_ISA='sse9' is not one of scalar, avx2, avx512"):
        cpu.isa()
    if cpu.available() and "avx512" not in cpu.supported_isas():
        monkeypatch.setenv("SALR_CPU_ISA", "avx512")
        with pytest.raises(SALRError, match="supports only"):
            cpu.isa()


@native
@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("cols", [29, 64, 200, 1037])
def test_bf16_input_gemv_with_and_without_vdpbf16ps(monkeypatch, mode, m, cols):
    """An x that is exactly bf16 takes vdpbf16ps on CPUs with AVX512-BF16 (SALR_CPU_BF16_DOT=on; the default on AMD):
    odd column counts (chunk tails), an empty row, dense rows, and a dense last row whose values end the tensor (the
    exact-load path), row by row against float64."""
    if mode == "on" and not cpu.bf16_dot_supported():
        pytest.skip("this CPU has no AVX512-BF16 (vdpbf16ps)")
    monkeypatch.setenv("SALR_CPU_BF16_DOT", mode)
    assert cpu.bf16_dot() == (mode == "on")
    g = torch.Generator().manual_seed(cols + m)
    w = torch.randn(40, cols, generator=g)
    w[torch.rand(40, cols, generator=g) < 0.5] = 0
    w[1] = 0
    w[2] = torch.randn(cols, generator=g)
    w[-1] = torch.randn(cols, generator=g)
    w = w.to(torch.bfloat16)
    bw = fm.encode(w)
    x = torch.randn(m, cols, generator=g).to(torch.bfloat16).float()  # fp32 holding bf16 values: still exact
    y = cpu.bitmap_linear_cpu(x, bw.bitmask, bw.values, bw.row_offsets, 40, cols)
    ref = exact(x, w)
    for r in range(40):
        assert rel_err(y[:, r], ref[:, r]) < 1e-4, r
    xs = torch.randn(cols, m, generator=g).to(torch.bfloat16).T  # non-contiguous bf16 input, bf16 output
    ys = ops.bitmap_linear(xs, bw.bitmask, bw.values, bw.row_offsets, 40, cols)
    assert ys.dtype == torch.bfloat16 and rel_err(ys, exact(xs, w)) < TOL[torch.bfloat16]


def test_bf16_dot_setting_errors(monkeypatch):
    monkeypatch.setenv("SALR_CPU_BF16_DOT", "maybe")
    with pytest.raises(SALRError, match="SALR_CPU_BF16_DOT='maybe' is not one of auto, on, off"):
        cpu.bf16_dot()
    monkeypatch.setenv("SALR_CPU_BF16_DOT", "on")
    monkeypatch.setattr(cpu, "_bf16_dot_support", lambda: 0)
    with pytest.raises(SALRError, match="needs AVX512-BF16"):
        cpu.bf16_dot()

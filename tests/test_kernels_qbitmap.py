"""salr::qbitmap_linear (QSALR): native CPU kernels against the reference on random and adversarial shapes, the
input gradient, the fused layer decode, corrupt inputs, and QBitmapBase."""

from __future__ import annotations

import pytest
import torch

from salr import bitmap_format as fm
from salr import ops
from salr.bases import QBitmapBase, base_for_saved
from salr.errors import SALRError
from salr.layer import SALRLinear
from salr.ops import cpu, reference

native = pytest.mark.skipif(not cpu.available(), reason="native kernel not built (python setup.py build_ext -i)")
QUANTS = [("nf4", False), ("nf4", True), ("int8", False)]


def make(rows, cols, kind="nf4", double_quant=False, sparsity=0.5, seed=0, blocksize=64, pattern=None):
    """(fp32 dequantized W, QBitmapWeight, effective scales); `pattern` sets adversarial masks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) >= sparsity
    if pattern == "rows" and rows > 4:
        mask[1] = False  # an all-zero row
        mask[2] = True  # a fully dense row
        mask[3, :-1] = False  # one value at the very end of a row
    if pattern == "ends":
        mask[:, 0] = mask[:, -1] = True  # rows start and end with kept values; blocks cross rows everywhere
    qw = fm.encode_quantized(w * mask, mask, kind, blocksize, double_quant)
    return fm.decode_quantized(qw, torch.float32), qw, qw.q.scales()


def args(qw, scales):
    return (qw.bitmask, qw.q.codes, scales, qw.row_offsets, *qw.shape, qw.q.blocksize)


def exact(x, w):
    return x.double() @ w.double().T


def rel_err(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@native
@pytest.mark.parametrize("kind,double_quant", QUANTS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 33, 130])
@pytest.mark.parametrize(
    "shape,pattern", [((37, 29), None), ((64, 200), "rows"), ((300, 1037), "ends"), ((3, 5), None)]
)
def test_cpu_kernel_matches_reference(cpu_isa, kind, double_quant, m, shape, pattern):
    w, qw, scales = make(*shape, kind, double_quant, seed=m, pattern=pattern)
    x = torch.randn(m, shape[1])
    y = cpu.qbitmap_linear_cpu(x, *args(qw, scales))
    assert y.shape == (m, shape[0]) and y.dtype == torch.float32
    assert rel_err(y, exact(x, w)) < TOL[torch.float32]
    ref = reference.qbitmap_linear_reference(x, *args(qw, scales))
    assert rel_err(y, ref.double()) < TOL[torch.float32]


@native
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.9, 0.999])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_densities_and_blocksizes(cpu_isa, kind, sparsity, blocksize):
    w, qw, scales = make(70, 333, kind, sparsity=sparsity, blocksize=blocksize)
    for m in (1, 4, 17):
        x = torch.randn(m, 333)
        assert rel_err(cpu.qbitmap_linear_cpu(x, *args(qw, scales)), exact(x, w)) < TOL[torch.float32]


@native
@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
@pytest.mark.parametrize(
    "shape,pattern", [((40, 29), "rows"), ((64, 200), "ends"), ((37, 1037), "rows"), ((3, 5), None)]
)
def test_nf4_gemv_of_a_bf16_input_with_and_without_vdpbf16ps(monkeypatch, mode, m, blocksize, shape, pattern):
    """NF4 with blocks of >= 64 values takes the buffer-free AVX-512 row kernel (codes expanded as bytes, two scaled
    codebooks per word). An exactly-bf16 x of up to GEMV_MAX_TOKENS rows with SALR_CPU_BF16_DOT=on (the default on
    AMD) multiplies each weight's dequantization rounded to bf16 with vdpbf16ps; off, or an fp32 x, the fp32
    dequantization itself. Row by row
    against float64 of the weights each path uses: odd first values, rows crossing scale blocks, empty and dense rows,
    rows whose codes end the stream."""
    if mode == "on" and not cpu.bf16_dot_supported():
        pytest.skip("this CPU has no AVX512-BF16 (vdpbf16ps)")
    monkeypatch.setenv("SALR_CPU_BF16_DOT", mode)
    rows, cols = shape
    w, qw, scales = make(rows, cols, "nf4", seed=m + blocksize, blocksize=blocksize, pattern=pattern)
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).float()
    y = cpu.qbitmap_linear_cpu(x, *args(qw, scales))
    dot = mode == "on" and m <= cpu.GEMV_MAX_TOKENS  # more tokens take fp32 tiles and sgemm
    ref = exact(x, w.to(torch.bfloat16).float() if dot else w)
    for r in range(rows):
        assert rel_err(y[:, r], ref[:, r]) < 1e-4, r
    if dot and cols >= 200:  # the bf16 weights were used, not the fp32 ones: rounding shows at 1e-3
        assert rel_err(y, exact(x, w)) > 1e-4
    x32 = torch.randn(m, cols, generator=torch.Generator().manual_seed(m + 1))  # not bf16: the fp32 weights
    assert rel_err(cpu.qbitmap_linear_cpu(x32, *args(qw, scales)), exact(x32, w)) < TOL[torch.float32]


@native
@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("m", [9, 12, 16, 17])
def test_bf16_tokens_past_eight_take_the_nf4_gemv_on_the_vdpbf16ps_path(monkeypatch, mode, m):
    """Up to QGEMV_BF16_MAX_TOKENS bf16 tokens stay on the NF4 GEMV where it multiplies with vdpbf16ps (it beats the
    tiles there, docs/benchmarks.md section 16); otherwise more than GEMV_MAX_TOKENS go to the tiles. Both give the
    bf16-rounded weights' product."""
    if mode == "on" and not cpu.bf16_dot_supported():
        pytest.skip("this CPU has no AVX512-BF16 (vdpbf16ps)")
    monkeypatch.setenv("SALR_CPU_BF16_DOT", mode)
    w, qw, scales = make(70, 333, "nf4", seed=m, pattern="rows")
    gemv = mode == "on" and m <= 16  # cpu.QGEMV_BF16_MAX_TOKENS, the measured crossover
    tiled = cpu._tiled_linear
    calls = []
    monkeypatch.setattr(cpu, "_tiled_linear", lambda *a: calls.append(1) or tiled(*a))
    x = torch.randn(m, 333, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    y = cpu.qbitmap_linear_cpu(x, *args(qw, scales))
    assert y.dtype == torch.bfloat16 and (not calls) == gemv
    assert rel_err(y, exact(x, w.to(torch.bfloat16).float())) < TOL[torch.bfloat16]


@native
@pytest.mark.parametrize("kind,double_quant", QUANTS)
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_gemv_weights_are_the_exact_dequantization(cpu_isa, monkeypatch, kind, double_quant, blocksize):
    """One-hot tokens read single columns of W through the gemv: each output is one product with 1.0 plus exact
    zeros, so it must equal the format's fp32 dequantization bit for bit (vdpbf16ps, which rounds the weights to
    bf16, is switched off)."""
    monkeypatch.setenv("SALR_CPU_BF16_DOT", "off")
    w, qw, scales = make(70, 333, kind, double_quant, seed=blocksize, blocksize=blocksize, pattern="rows")
    columns = [0, 1, 63, 64, 65, 200, 331, 332]
    x = torch.zeros(len(columns), 333)
    x[range(len(columns)), columns] = 1.0
    y = cpu.qbitmap_linear_cpu(x, *args(qw, scales))
    assert torch.equal(y, w[:, columns].T)


@native
def test_all_pruned_weight_gives_zeros(cpu_isa):
    w, qw, scales = make(8, 40, sparsity=1.0)
    assert qw.nnz == 0 and qw.q.codes.numel() == 0
    for m in (1, 12):
        assert torch.equal(cpu.qbitmap_linear_cpu(torch.randn(m, 40), *args(qw, scales)), torch.zeros(m, 8))


@native
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 6, 40])
def test_3d_noncontiguous_input_through_the_op(xdtype, m):
    w, qw, scales = make(96, 77, "nf4", True, pattern="rows")
    x = torch.randn(77, m, 3).to(xdtype).permute(2, 1, 0)  # [3, m, 77], non-contiguous
    assert not x.is_contiguous()
    y = ops.qbitmap_linear(x, *args(qw, scales))
    assert y.shape == (3, m, 96) and y.dtype == xdtype
    assert rel_err(y, exact(x, w)) < TOL[xdtype]


@native
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("m", [1, 6, 40])
def test_scalar_fallback_matches_avx2(monkeypatch, kind, m):
    w, qw, scales = make(50, 123, kind, sparsity=0.7, pattern="ends")
    x = torch.randn(m, 123)
    fast = cpu.qbitmap_linear_cpu(x, *args(qw, scales))
    monkeypatch.setenv("SALR_CPU_ISA", "scalar")
    assert cpu.isa() == "scalar"
    slow = cpu.qbitmap_linear_cpu(x, *args(qw, scales))
    assert rel_err(slow, exact(x, w)) < TOL[torch.float32]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@native
def test_decode_rows_is_the_exact_dequantization(cpu_isa):
    w, qw, scales = make(41, 77, "nf4", True, pattern="rows")
    out = torch.full((41, 80), float("nan"))
    bitmask, codes, sc, offsets, rows, cols, bs = args(qw, scales)
    cpu.qdecode_rows(bitmask, codes, sc, offsets, rows, cols, bs, 5, 41, out)
    assert torch.equal(out[: 41 - 5, :77], w[5:]) and bool((out[: 41 - 5, 77:] == 0).all())


@native
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("cols", [77, 64, 333])
def test_bf16_decode_is_the_dequantization_rounded(cpu_isa, kind, blocksize, cols):
    """bf16 tiles: the exact fp32 dequantization rounded to nearest even, bit for bit, and nothing written past the
    row's whole bitmap bytes (the out buffer is wider here)."""
    _, qw, scales = make(41, cols, kind, pattern="rows", blocksize=blocksize, seed=cols)
    bitmask, codes, sc, offsets, rows, cols, bs = args(qw, scales)
    kp = 8 * -(-cols // 8)
    exact32 = torch.empty(41, kp)
    cpu.qdecode_rows(bitmask, codes, sc, offsets, rows, cols, bs, 0, 41, exact32)
    out = torch.full((41, kp + 40), float("nan"), dtype=torch.bfloat16)  # room to see a 32-word store overrun
    cpu.qdecode_rows(bitmask, codes, sc, offsets, rows, cols, bs, 3, 41, out)
    assert torch.equal(out[:38, :kp], exact32[3:].to(torch.bfloat16))
    assert out[:38, kp:].isnan().all()
    bad = offsets.clone()
    bad[7] += 3
    with pytest.raises(SALRError, match="row 7"):
        cpu.qdecode_rows(bitmask, codes, sc, bad, rows, cols, bs, 0, 41, out)
    with pytest.raises(SALRError, match="fp32 or bf16"):
        cpu.qdecode_rows(bitmask, codes, sc, offsets, rows, cols, bs, 0, 41, out.half())


@native
@pytest.mark.parametrize("tiles", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("m", [9, 70])
def test_many_tokens_in_bf16_on_either_tiles(cpu_isa, monkeypatch, tiles, kind, m):
    """A bf16 input above the gemv's token count, with several tiles of either type forced on any CPU, against the
    exact product (bf16 tolerance: both round, the bf16 tiles their weights too)."""
    if tiles == "bf16":
        monkeypatch.setattr(cpu, "_native_bf16_matmul", lambda: True)
    else:
        monkeypatch.setenv("SALR_CPU_TILES", "fp32")
    monkeypatch.setattr(cpu, "TILE_BYTES", 4 * 16 * 304)  # 16-row tiles, a ragged last one
    w, qw, scales = make(45, 300, kind, pattern="ends")
    x = torch.randn(300, m).to(torch.bfloat16).T  # non-contiguous
    y = cpu.qbitmap_linear_cpu(x, *args(qw, scales))
    assert y.dtype == torch.bfloat16 and y.shape == (m, 45)
    assert rel_err(y, exact(x, w)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("m", [1, 4, 70])
@pytest.mark.parametrize("small_tiles", [False, True])
def test_input_gradient_matches_dense(monkeypatch, kind, m, small_tiles):
    """Forward and input gradient through the op; small_tiles: 16-row tiles (a ragged last one)."""
    if small_tiles:
        monkeypatch.setattr(cpu, "TILE_BYTES", 4 * 16 * 72)
    w, qw, scales = make(45, 66, kind)
    x = torch.randn(2, m, 66, requires_grad=True)
    g = torch.randn(2, m, 45)
    ops.qbitmap_linear(x, *args(qw, scales)).backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.qbitmap_linear(x.detach(), *args(qw, scales)), y_ref.detach(), rtol=1e-5, atol=1e-5)


def test_opcheck_schema_fake_and_autograd():
    _, qw, scales = make(24, 40, "nf4", True)
    x = torch.randn(3, 40, requires_grad=True)
    torch.library.opcheck(ops.qbitmap_linear, (x, *args(qw, scales)))


@native
def test_corrupt_inputs_raise_instead_of_reading_out_of_bounds(cpu_isa):
    _, qw, scales = make(20, 64)
    bad = qw.row_offsets.clone()
    bad[7] += 3
    for m in (1, 20):  # gemv and decode paths
        with pytest.raises(SALRError, match="row 7"):
            cpu.qbitmap_linear_cpu(torch.randn(m, 64), qw.bitmask, qw.q.codes, scales, bad, 20, 64, 64)
    with pytest.raises(SALRError, match="code bytes"):  # codes too short for the bitmap
        cpu.qbitmap_linear_cpu(torch.randn(1, 64), qw.bitmask, qw.q.codes[:-5], scales, qw.row_offsets, 20, 64, 64)
    bitmask = qw.bitmask.clone()
    bitmask[10, 3] = bitmask[10, 3] ^ 0xFF  # row 10 now claims a different number of values
    with pytest.raises(SALRError, match="row"):
        cpu.qbitmap_linear_cpu(torch.randn(1, 64), bitmask, qw.q.codes, scales, qw.row_offsets, 20, 64, 64)
    with pytest.raises(SALRError, match="fp32"):
        cpu.qbitmap_linear_cpu(torch.randn(1, 64), qw.bitmask, qw.q.codes, scales.double(), qw.row_offsets, 20, 64, 64)


@native
def test_multithreaded_gemv_matches_reference(cpu_isa):
    rows, cols = 1100, 1031
    assert rows * cols >= cpu.PARALLEL_MIN_WEIGHTS
    w, qw, scales = make(rows, cols, "nf4", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(3, cols)
        y = cpu.qbitmap_linear_cpu(x, *args(qw, scales))
    finally:
        torch.set_num_threads(threads)
    assert rel_err(y, exact(x, w)) < TOL[torch.float32]


@native
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("blocksize", [32, 64])
@pytest.mark.parametrize("kind,double_quant", QUANTS)
def test_fused_layer_decode_matches_the_unfused_layer(cpu_isa, xdtype, m, blocksize, kind, double_quant):
    w, qw, _ = make(48, 72, kind, double_quant, pattern="rows", blocksize=blocksize)
    base = QBitmapBase(qw)
    A, B = torch.randn(6, 72) * 0.1, torch.randn(48, 6) * 0.1
    layer = SALRLinear(base, torch.randn(48).to(xdtype), A, B, residual_rank=4, lora_scale=2.0).eval()
    x = torch.randn(1, m, 72).to(xdtype)
    with torch.no_grad():
        fused = layer(x)
        assert layer._fused_decode(x) is not None
        scale = torch.tensor([1.0] * 4 + [2.0] * 2)
        ref = x.double() @ w.double().T + ((x.double() @ A.double().T) * scale.double()) @ B.double().T
        ref = ref + layer.bias.double()
    assert fused.dtype == xdtype and rel_err(fused, ref) < TOL[xdtype]


# ------------------------------------------------------------------------------------------------ QBitmapBase


@pytest.mark.parametrize("kind,double_quant", QUANTS)
def test_qbitmap_base_state_dict_round_trip_and_meta_assign(kind, double_quant):
    w = torch.randn(40, 52, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    mask = torch.rand(40, 52, generator=torch.Generator().manual_seed(4)) < 0.5
    base = QBitmapBase.from_dense(w * mask, mask, kind=kind, double_quant=double_quant)
    assert base.shape == (40, 52) and base.dtype == torch.bfloat16 and base.nnz == int(mask.sum())
    assert base.nbytes == base.ideal_nbytes() + 40 * 8 + 32
    sd = base.state_dict()
    assert set(sd) >= {"bitmask", "row_offsets", "codes", "quant_meta"}
    assert ("qabsmax" in sd) == double_quant and ("absmax" in sd) != double_quant
    loaded = base_for_saved((40, 52), sd, "")
    assert isinstance(loaded, QBitmapBase) and loaded.codes.is_meta
    loaded.load_state_dict(sd, assign=True)
    assert torch.equal(loaded.dequantize(), base.dequantize()) and loaded.dtype == torch.bfloat16
    x = torch.randn(3, 52)
    assert torch.equal(loaded(x), base(x))


def test_dtype_casts_keep_codes_and_fp32_scales():
    base = QBitmapBase.from_dense(torch.randn(16, 24), kind="nf4", double_quant=True)
    before = base.dequantize()
    for cast in (lambda b: b.to(torch.bfloat16), lambda b: b.half(), lambda b: b.float()):
        cast(base)
        assert base.absmax is None and base.nested_absmax.dtype == torch.float32 and base.offset.dtype == torch.float32
        assert base.scales.dtype == torch.float32 and torch.equal(base.dequantize(), before)
    base.to(torch.bfloat16)
    assert base.dtype == torch.bfloat16 and base.to_dense().dtype == torch.bfloat16
    assert base.state_dict()["quant_meta"][3] == fm.DTYPE_CODES[torch.bfloat16]


def test_inconsistent_state_dict_is_rejected_at_load():
    base = QBitmapBase.from_dense(torch.randn(16, 24), kind="nf4")
    sd = base.state_dict()
    sd["row_offsets"] = sd["row_offsets"].flip(0).contiguous()
    target = base_for_saved((16, 24), base.state_dict(), "")
    with pytest.raises(SALRError, match="row_offsets disagree"):
        target.load_state_dict(sd, assign=True)

"""The fused CPU decode path: one native call for a whole SALRLinear (bitmap base + adapters + bias) vs the ops."""

import pytest
import torch

from salr import bitmap_format as fm
from salr.bases import BitmapBase
from salr.errors import SALRError
from salr.layer import SALRLinear
from salr.ops import cpu

native = pytest.mark.skipif(not cpu.available(), reason="native kernel not built (python setup.py build_ext -i)")


def make_layer(rows, cols, residual_rank, lora_rank, dtype, adapter_dtype=None, bias=True, sparsity=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    if rows > 3:
        w[1] = 0  # an all-zero row
        w[2] = torch.randn(cols, generator=g)  # a fully dense row
    adapter_dtype = adapter_dtype or dtype
    rank = residual_rank + lora_rank
    A = (0.1 * torch.randn(rank, cols, generator=g)).to(adapter_dtype)
    B = (0.1 * torch.randn(rows, rank, generator=g)).to(adapter_dtype)
    b = torch.randn(rows, generator=g).to(dtype) if bias else None
    layer = SALRLinear(BitmapBase.from_dense(w.to(dtype)), b, A, B, residual_rank, lora_scale=2.0).eval()
    return layer


@torch.no_grad()
def exact(layer, x):
    """The layer in float64 from its dense parts (the fused kernel accumulates in fp32)."""
    w = layer.base.to_dense().double()
    scale = torch.tensor([1.0] * layer.residual_rank + [layer.lora_scale] * layer.lora_rank, dtype=torch.float64)
    y = x.double() @ w.T + ((x.double() @ layer.A_cat.double().T) * scale) @ layer.B_cat.double().T
    return y + layer.bias.double() if layer.bias is not None else y


def rel_err(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize(
    "shape,ranks",
    [
        ((37, 29), (5, 3)),
        ((64, 64), (0, 0)),
        ((100, 203), (0, 4)),
        ((576, 192), (64, 16)),
        ((130, 1031), (7, 0)),
        ((45, 70), (13, 8)),  # the adapters' 16-row steps: a partial one, the LoRA scale starting inside one
        ((16, 33), (16, 16)),
    ],
)
def test_fused_layer_matches_exact(cpu_isa, dtype, m, shape, ranks):
    layer = make_layer(*shape, *ranks, dtype)
    x = torch.randn(1, m, shape[1]).to(dtype)
    with torch.no_grad():
        fused = layer._fused_decode(x)
    assert fused is not None and fused.dtype == dtype and fused.shape == (1, m, shape[0])
    assert rel_err(fused, exact(layer, x)) < TOL[dtype]


@native
@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_fused_layer_with_and_without_vdpbf16ps(monkeypatch, mode, m):
    """bf16 activations on bf16 values: vdpbf16ps where the CPU has AVX512-BF16 and SALR_CPU_BF16_DOT allows it."""
    if mode == "on" and not cpu.bf16_dot_supported():
        pytest.skip("this CPU has no AVX512-BF16 (vdpbf16ps)")
    monkeypatch.setenv("SALR_CPU_BF16_DOT", mode)
    layer = make_layer(130, 1031, 7, 4, torch.bfloat16)
    x = torch.randn(1, m, 1031).to(torch.bfloat16)
    with torch.no_grad():
        fused = layer._fused_decode(x)
    assert fused is not None and rel_err(fused, exact(layer, x)) < TOL[torch.bfloat16]


@native
def test_fused_equals_unfused_ops_on_the_same_layer():
    layer = make_layer(300, 200, 16, 8, torch.float32, seed=3)
    x = torch.randn(3, 200)
    with torch.no_grad():
        fused = layer(x)
    unfused = layer(x)  # grad enabled and adapters trainable: the op-by-op path
    assert unfused.requires_grad
    torch.testing.assert_close(fused, unfused.detach(), rtol=1e-5, atol=1e-5)


@native
def test_fp32_adapters_on_bf16_activations():
    layer = make_layer(96, 80, 8, 8, torch.bfloat16, adapter_dtype=torch.float32)
    x = torch.randn(1, 80).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, exact(layer, x)) < TOL[torch.bfloat16]


@native
def test_scalar_isa_matches(monkeypatch):
    layer = make_layer(70, 45, 4, 4, torch.bfloat16)
    x = torch.randn(4, 45).to(torch.bfloat16)
    with torch.no_grad():
        avx = layer(x)
        monkeypatch.setenv("SALR_CPU_ISA", "scalar")
        scalar = layer(x)
    assert rel_err(scalar, exact(layer, x)) < TOL[torch.bfloat16]
    assert rel_err(scalar, avx.double()) < TOL[torch.bfloat16]


@native
def test_two_threads_match_one(cpu_isa):
    layer = make_layer(1100, 1031, 32, 16, torch.float32)
    x = torch.randn(2, 1031)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = layer(x)
            torch.set_num_threads(2)
            two = layer(x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    assert rel_err(two, exact(layer, x)) < TOL[torch.float32]


@native
def test_fused_path_is_taken_only_where_it_applies():
    layer = make_layer(40, 24, 4, 4, torch.float32)
    with torch.no_grad():
        assert layer._fused_decode(torch.randn(1, 24)) is not None
        assert layer._fused_decode(torch.randn(9, 24)) is None  # prefill: the tiled sgemm path
        assert layer._fused_decode(torch.randn(2, 24).to(torch.float16)) is None  # fp16 activations
        assert layer._fused_decode(torch.randn(24, 2).T) is None  # strided activations
        strided = torch.randn(2, 48)[:, ::2]
        torch.testing.assert_close(layer(strided), exact(layer, strided).float(), rtol=1e-4, atol=1e-4)
    assert layer._fused_decode(torch.randn(1, 24)) is None  # autograd needs the op path
    layer.train()
    with torch.no_grad():
        assert layer._fused_decode(torch.randn(1, 24)) is None  # training mode (LoRA dropout)


@native
def test_corrupt_bitmap_raises_in_the_fused_path(cpu_isa):
    layer = make_layer(30, 40, 2, 2, torch.float32, sparsity=0.5)
    bw = fm.encode(layer.base.to_dense())
    bm = bw.bitmask.clone()
    bm[5, 0] ^= 0x01  # one bit too many (or too few) in row 5: its popcount disagrees with the offsets
    layer.base.bitmask.copy_(bm)
    with torch.no_grad(), pytest.raises(SALRError, match="bitmap row"):
        layer(torch.randn(1, 40))


@native
def test_adapter_shape_mismatch_is_a_clear_error():
    layer = make_layer(30, 40, 2, 2, torch.float32)
    with torch.no_grad(), pytest.raises(SALRError, match="adapter shapes"):
        cpu.salr_linear_decode(
            torch.randn(1, 40), layer.base.bitmask, layer.base.values, layer.base.row_offsets, 30, 40,
            torch.randn(4, 40), torch.randn(31, 4), 2, 2.0,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ salr._fastcall


def _ctypes_calls(lib):
    return cpu.DecodeCalls(lib.salr_linear_decode, lib.salr_qlinear_decode, "ctypes")


@native
def test_decode_calls_go_through_fastcall_where_it_is_built():
    """setup.py builds salr._fastcall beside the kernel wherever Python's headers exist (CI's machines do): the hot
    decode calls must not silently fall back to ctypes there."""
    pytest.importorskip("salr._fastcall", reason="salr._fastcall not built (python setup.py build_ext -i)")
    assert cpu.decode_calls().binding == "fastcall"


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_fastcall_and_ctypes_give_the_same_bits(monkeypatch, cpu_isa, dtype, bias):
    """Both bindings call the same C function: same arguments (an int64 nnz, a float scale, None for no bias, C ints
    for the codes) must give identical outputs, for the bitmap and the quantized base."""
    from salr.bases import QBitmapBase

    pytest.importorskip("salr._fastcall", reason="salr._fastcall not built (python setup.py build_ext -i)")
    layer = make_layer(70, 90, 6, 3, dtype, bias=bias)
    qlayer = SALRLinear(QBitmapBase.from_dense(layer.base.to_dense().float(), kind="nf4"), layer.bias,
                        layer.A_cat, layer.B_cat, 6, lora_scale=0.75).eval()  # fmt: skip
    x = torch.randn(1, 3, 90).to(dtype)
    with torch.no_grad():
        fast = [layer(x), qlayer(x)]
        monkeypatch.setattr(cpu, "decode_calls", lambda: _ctypes_calls(cpu.load()))
        slow = [layer(x), qlayer(x)]
    for f, s in zip(fast, slow, strict=True):
        assert torch.equal(f, s)
    assert rel_err(fast[0], exact(layer, x)) < TOL[dtype]


@native
def test_fastcall_refuses_bad_arguments_with_python_errors():
    fastcall = pytest.importorskip("salr._fastcall", reason="salr._fastcall not built (python setup.py build_ext -i)")
    cpu.decode_calls()  # binds the module to the kernel
    with pytest.raises(TypeError, match="expected 22 arguments, got 3"):
        fastcall.linear_decode(1, 2, 3)
    with pytest.raises(TypeError, match="expected 24 arguments, got 0"):
        fastcall.qlinear_decode()
    with pytest.raises(TypeError):
        fastcall.linear_decode(*(["not a number"] + [0] * 21))
    with pytest.raises(OverflowError, match="argument 0 does not fit a C int"):
        fastcall.linear_decode(*([1 << 40] + [0] * 21))
    with pytest.raises(ValueError, match="non-null"):
        fastcall.bind(0, 0)


@native
def test_without_fastcall_the_decode_calls_fall_back_to_ctypes(monkeypatch):
    import sys

    layer = make_layer(40, 50, 4, 2, torch.bfloat16)
    x = torch.randn(1, 2, 50).to(torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
    monkeypatch.setitem(sys.modules, "salr._fastcall", None)  # importing it raises ImportError
    cpu.decode_calls.cache_clear()
    try:
        assert cpu.decode_calls().binding == "ctypes"
        with torch.no_grad():
            assert torch.equal(layer(x), expected)
    finally:
        cpu.decode_calls.cache_clear()

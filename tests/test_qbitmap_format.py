"""The quantized bitmap format (QSALR): NF4 bit-exact with bitsandbytes, int8, double-quantized scales, validation
and the safetensors round trip."""

from __future__ import annotations

import pytest
import torch

from salr import bitmap_format as fm
from salr.errors import SALRError

G = torch.Generator().manual_seed(1234)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so -0.0 != 0.0 and a tensor equals another only byte for byte."""
    t = t.contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def streams() -> list[tuple[str, torch.Tensor]]:
    """Value streams with the edge cases of the format: odd lengths, short last blocks, all-zero blocks (full and
    short), outliers, subnormals, values exactly on the NF4 decision midpoints, heavy tails."""
    out = [(f"randn n={n}", torch.randn(n, generator=G)) for n in (1, 2, 3, 63, 64, 65, 129, 1000, 64 * 300 + 5)]
    x = torch.randn(64 * 10 + 7, generator=G)
    x[64:128] = 0
    x[640:] = 0
    out.append(("zero blocks", x))
    x = torch.randn(64 * 8, generator=G) * 0.01
    x[5], x[64 * 3 + 17] = 1e4, -3e5
    out.append(("outliers", x))
    out.append(("subnormal", torch.randn(64 * 4 + 3, generator=G) * 1e-39))
    b = fm._NF4_BOUNDS
    ties = torch.cat([b, -b, torch.nextafter(b, b + 1), torch.nextafter(b, b - 1), fm.NF4_CODE])
    blk, blk2 = torch.zeros(64), torch.zeros(64)
    blk[:63], blk[63] = ties[:63], 1.0
    blk2[: ties.numel() - 63], blk2[63] = ties[63:], -1.0
    out.append(("ties", torch.cat([blk, blk2, torch.tensor([1.0, b[3].item()])])))
    out.append(("heavy tail", torch.distributions.StudentT(2.0).sample((5000,))))
    return out


@pytest.fixture
def bnb():
    """bitsandbytes' functional module, its torch.compile'd fallback disabled (it only adds compile time)."""
    functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    with torch._dynamo.config.patch(disable=True):
        yield functional


def test_codebooks_are_bitsandbytes(bnb):
    assert same(fm.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu"))
    assert same(fm.DYNAMIC_MAP, bnb.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_nf4_quantization_is_byte_identical_to_bitsandbytes(bnb, double_quant, blocksize):
    for name, x in streams():
        for dtype in (torch.float32, torch.bfloat16):
            xs = x.to(dtype)
            if not bool(torch.isfinite(xs).all()) or (dtype != torch.float32 and name == "subnormal"):
                continue
            ref_codes, ref_state = bnb.quantize_4bit(
                xs, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
            )
            q = fm.quantize_values(xs, "nf4", blocksize, double_quant)
            assert same(q.codes, ref_codes.reshape(-1)), (name, dtype)
            if double_quant:
                assert same(q.qabsmax, ref_state.absmax), name
                assert same(q.nested_absmax, ref_state.state2.absmax), name
                assert same(q.offset.reshape(()), ref_state.offset.reshape(())), name
            else:
                assert same(q.absmax, ref_state.absmax), (name, dtype)


def _quant_state(bnb, q: fm.QuantizedValues, dtype: torch.dtype):
    """The QuantState bitsandbytes.functional.dequantize_4bit needs for our arrays, built by hand."""
    common = dict(shape=torch.Size([q.n]), code=fm.NF4_CODE.clone(), blocksize=q.blocksize, quant_type="nf4")
    if not q.double_quant:
        return bnb.QuantState(absmax=q.absmax, dtype=dtype, **common)
    nested = bnb.QuantState(absmax=q.nested_absmax, code=fm.DYNAMIC_MAP.clone(), blocksize=256, dtype=torch.float32)
    return bnb.QuantState(absmax=q.qabsmax, offset=q.offset.reshape(()), state2=nested, dtype=dtype, **common)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_bitsandbytes_dequantizes_our_packed_codes_exactly(bnb, double_quant, blocksize):
    """The issue's check: bitsandbytes.functional.dequantize_4bit on our packed codes == our dequantization."""
    for name, x in streams():
        q = fm.quantize_values(x, "nf4", blocksize, double_quant)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if not bool(torch.isfinite(x.to(dtype)).all()):
                continue  # fp16 overflows on the outliers
            theirs = bnb.dequantize_4bit(q.codes.view(-1, 1), _quant_state(bnb, q, dtype)).reshape(-1)
            assert same(fm.dequantize_values(q, dtype), theirs), (name, double_quant, dtype)


def test_bitsandbytes_dequantizes_a_whole_encoded_layer(bnb):
    """A pruned layer's kept-value stream (rows of odd length, blocks across rows) through both dequantizers."""
    w = torch.randn(37, 131, generator=G)
    mask = torch.rand(37, 131, generator=G) < 0.5
    qw = fm.encode_quantized(w * mask, mask, "nf4", 64, double_quant=True)
    theirs = bnb.dequantize_4bit(qw.q.codes.view(-1, 1), _quant_state(bnb, qw.q, torch.float32)).reshape(-1)
    dense = fm.decode_dense(qw.bitmask, theirs, 37, 131)
    assert same(dense, fm.decode_quantized(qw, torch.float32))


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_dequantizes_searched_scales_exactly(bnb, double_quant):
    """Searched (clipped) block scales change only the numbers stored, not the layout bitsandbytes reads."""
    for name, x in streams():
        if not bool(torch.isfinite(x).all()):
            continue
        q = fm.quantize_values(x, "nf4", 64, double_quant, scales=fm.search_scales(x, "nf4", 64))
        theirs = bnb.dequantize_4bit(q.codes.view(-1, 1), _quant_state(bnb, q, torch.float32)).reshape(-1)
        assert same(fm.dequantize_values(q), theirs), (name, double_quant)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_searched_scales_never_lose_to_absmax_and_codes_are_nearest_on_them(kind, double_quant):
    x = torch.distributions.StudentT(4.0).sample((64 * 50 + 17,))  # a ragged last block
    weights = torch.rand(x.numel(), generator=G) + 0.1
    absmax = fm.quantize_values(x, kind, 64)
    scales = fm.search_scales(x, kind, 64, weights=weights)
    assert scales.shape == absmax.absmax.shape and bool((scales <= absmax.absmax + 1e-6).all())

    def block_errors(q: fm.QuantizedValues) -> torch.Tensor:
        err = (fm.dequantize_values(q) - x) ** 2 * weights
        return torch.nn.functional.pad(err, (0, 64 * q.nblocks - x.numel())).view(-1, 64).sum(1)

    searched = fm.quantize_values(x, kind, 64, scales=scales)
    assert bool((block_errors(searched) <= block_errors(absmax) * (1 + 1e-6)).all())  # alpha = 1 is a candidate
    if kind == "nf4":  # clipping pays for NF4's coarse grid; int8's is fine enough that it rarely does
        assert block_errors(searched).sum() < 0.95 * block_errors(absmax).sum()
    q = fm.quantize_values(x, kind, 64, double_quant, scales=scales)
    per = q.scales().repeat_interleave(64)[: x.numel()]
    assert torch.equal(fm.unpack_codes(q), fm.round_to_scales(x, per, kind)[0])  # nearest codes on stored scales
    with pytest.raises(SALRError, match="non-negative block scales"):
        fm.quantize_values(x, kind, 64, scales=scales[:-1])


def test_int8_matches_bitsandbytes_llm_int8_rule_per_block(bnb):
    x = torch.randn(64 * 200, generator=G)
    q = fm.quantize_values(x, "int8", 64)
    ref_codes, ref_stats, _ = bnb.int8_vectorwise_quant(x.view(-1, 64))
    assert same(q.codes, ref_codes.reshape(-1)) and same(q.absmax, ref_stats)
    assert same(fm.dequantize_values(q), bnb.int8_vectorwise_dequant(ref_codes, ref_stats).reshape(-1))


def test_int8_edge_cases_and_error_bound():
    x = torch.randn(64 * 5 + 9, generator=G)
    x[64:128] = 0
    x[3] = 500.0
    q = fm.quantize_values(x, "int8", 64)
    assert q.codes.dtype == torch.int8 and q.codes.numel() == x.numel() and q.absmax.numel() == 6
    assert int(q.codes[64:128].abs().sum()) == 0 and int(q.codes.abs().max()) == 127
    per = q.absmax.repeat_interleave(64)[: x.numel()]
    assert bool(((fm.dequantize_values(q) - x).abs() <= per / 254 * 1.0001 + 1e-12).all())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_nf4_and_int8_errors_are_what_the_codes_allow(kind):
    x = torch.randn(64 * 1000, generator=G)
    err = fm.dequantize_values(fm.quantize_values(x, kind)) - x
    rel = float(err.pow(2).mean() / x.pow(2).mean())
    # NF4: ~1 % of the energy for Gaussian blocks of 64; int8: a uniform step absmax/127 (~2.5/127), step^2/12
    assert (0.005 < rel < 0.015) if kind == "nf4" else (1e-5 < rel < 5e-5), rel


def test_double_quantization_is_close_and_saves_bytes():
    x = torch.randn(64 * 3000, generator=G)
    plain, dq = fm.quantize_values(x, "nf4"), fm.quantize_values(x, "nf4", double_quant=True)
    assert torch.equal(plain.codes, dq.codes)
    assert float((dq.scales() - plain.scales()).abs().max() / plain.scales().max()) < 0.02
    # 4.5 bits per value plain, ~4.127 with double quantization
    assert 8 * plain.nbytes / x.numel() == pytest.approx(4.5)
    assert 8 * dq.nbytes / x.numel() == pytest.approx(4 + 8 / 64 + 32 / 64 / 256, abs=2e-3)


@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True), ("int8", False), ("int8", True)])
def test_encode_decode_and_tensor_round_trip_exact(kind, double_quant):
    w = torch.randn(23, 45, generator=G).to(torch.bfloat16)
    mask = torch.rand(23, 45, generator=G) < 0.6
    mask[4] = False  # an empty row
    mask[5] = True  # a full row
    w[7, mask[7]] = 0  # kept weights that are exactly zero stay kept (the bitmap is the mask)
    qw = fm.encode_quantized(w, mask, kind, 64, double_quant)
    assert qw.nnz == int(mask.sum()) and qw.dtype == torch.bfloat16
    assert torch.equal(fm.unpack_mask(qw.bitmask, 45), mask)
    dense = fm.decode_quantized(qw, torch.float32)
    assert bool((dense[~mask] == 0).all())
    tensors = fm.quantized_to_tensors(qw, prefix="model.layers.0.mlp.up_proj.weight.")
    back = fm.quantized_from_tensors(tensors, prefix="model.layers.0.mlp.up_proj.weight.")
    assert back.q.kind == kind and back.q.double_quant == double_quant and back.dtype == torch.bfloat16
    assert same(fm.decode_quantized(back, torch.float32), dense)
    assert fm.decode_quantized(back).dtype == torch.bfloat16


def _corrupt(qw: fm.QBitmapWeight, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    named = fm.quantized_to_tensors(qw)
    named.update(tensors)
    return named


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: {"codes": t["codes"][:-1]}, "codes must be"),
        (lambda t: {"absmax": t["absmax"][:-1]}, "absmax must be"),
        (lambda t: {"absmax": t["absmax"].double()}, "absmax must be"),
        (lambda t: {"absmax": torch.where(torch.arange(t["absmax"].numel()) == 1, -1.0, t["absmax"])}, "finite"),
        (lambda t: {"quant_meta": torch.tensor([0, 48, 0, 2])}, "not a known quantization"),
        (lambda t: {"quant_meta": torch.tensor([0, 64, 0])}, "int64 \\[4\\]"),
        (lambda t: {"codes": torch.cat([t["codes"][:-1], (t["codes"][-1:] & 0xF0) | 3])}, "padding nibble"),
        (lambda t: {"row_offsets": t["row_offsets"].flip(0).contiguous()}, "row_offsets disagree"),
    ],
)
def test_validation_rejects_corrupt_tensors(change, message):
    w = torch.randn(9, 21, generator=G)
    mask = torch.rand(9, 21, generator=G) < 0.7
    mask[0, :3] = True  # an odd number of kept values
    mask[0, 3:] = False
    if int(mask.sum()) % 2 == 0:
        mask[1, 0] = not bool(mask[1, 0])
    qw = fm.encode_quantized(w, mask, "nf4", 32)
    assert qw.nnz % 2 == 1 and qw.q.nblocks > 1
    with pytest.raises(SALRError, match=message):
        fm.quantized_from_tensors(_corrupt(qw, **change(fm.quantized_to_tensors(qw))))


def test_int8_rejects_code_minus_128_and_missing_names():
    qw = fm.encode_quantized(torch.randn(4, 16, generator=G), kind="int8")
    codes = qw.q.codes.clone()
    codes[3] = -128
    with pytest.raises(SALRError, match=r"\[-127, 127\]"):
        fm.quantized_from_tensors(_corrupt(qw, codes=codes))
    named = fm.quantized_to_tensors(qw)
    del named["quant_meta"]
    with pytest.raises(SALRError, match="missing"):
        fm.quantized_from_tensors(named)


def test_quantization_refuses_bad_input():
    with pytest.raises(SALRError, match="non-finite"):
        fm.quantize_values(torch.tensor([1.0, float("inf")]))
    with pytest.raises(SALRError, match="blocksize"):
        fm.quantize_values(torch.randn(8), blocksize=48)
    with pytest.raises(SALRError, match="kind"):
        fm.quantize_values(torch.randn(8), kind="fp4")
    empty = fm.quantize_values(torch.zeros(0), double_quant=True)
    assert empty.n == 0 and fm.dequantize_values(empty).numel() == 0


def test_ideal_bytes_at_50_percent_nf4_is_3_25_bits_per_weight():
    shape, nnz = (4096, 4096), 4096 * 4096 // 2
    ideal = fm.ideal_quantized_nbytes(shape, nnz, "nf4", 64)
    assert 8 * ideal / (4096 * 4096) == pytest.approx(1 + 0.5 * 4.5)
    assert fm.dense_nbytes(shape) / ideal == pytest.approx(16 / 3.25)
    qw = fm.encode_quantized(torch.randn(64, 100, generator=G), torch.rand(64, 100, generator=G) < 0.5)
    assert qw.nbytes == fm.ideal_quantized_nbytes((64, 100), qw.nnz) + 8 * 64

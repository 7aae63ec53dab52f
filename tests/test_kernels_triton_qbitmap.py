"""Triton quantized-bitmap (QSALR) decode + GEMM and input-gradient kernels against the reference.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported, as in
tests/test_kernels_triton.py); with a GPU the same tests run the compiled kernels."""

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed: pip install --no-deps triton")

import salr.ops.triton as tb  # noqa: E402
import salr.ops.triton_qbitmap as tq  # noqa: E402
from salr import bitmap_format as fm  # noqa: E402
from salr.errors import SALRError  # noqa: E402

if not CUDA and not tb.interpreting():  # imported earlier without the interpreter: rebuild the kernels
    tb = importlib.reload(tb)
    tq = importlib.reload(tq)

DEVICE = "cuda" if CUDA else "cpu"
MIN_SNR = {torch.float32: 100.0, torch.float16: 55.0, torch.bfloat16: 40.0}


def snr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (y.double() - ref.double()).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.double().pow(2).sum() / noise))


def quantized(n, k, kind="nf4", double_quant=False, sparsity=0.5, seed=0, adversarial=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mask = torch.rand(n, k, generator=g) >= sparsity
    if adversarial:
        mask[0] = False  # all-zero row
        mask[1] = True  # fully dense row
        mask[2] = False
        mask[2, k - 1] = True  # only the last (padded-byte) column
    qw = fm.encode_quantized(w * mask, mask, kind, 64, double_quant)
    ops = [t.to(DEVICE) for t in (qw.bitmask, qw.q.codes, qw.q.scales(), qw.row_offsets)]
    return fm.decode_quantized(qw, torch.float32).to(DEVICE), (*ops, n, k, 64)


@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True), ("int8", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,k", [(1, 33, 37), (3, 40, 300), (33, 65, 260)])
def test_forward_matches_reference(kind, double_quant, dtype, m, n, k):
    w, args = quantized(n, k, kind, double_quant, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype).to(DEVICE)
    y = tq.triton_qbitmap_linear(x, *args)
    assert y.shape == (m, n) and y.dtype == dtype
    assert snr_db(y, x.double() @ w.double().T) >= MIN_SNR[dtype]


@pytest.mark.parametrize("m", [1, 20])
def test_adversarial_rows_strides_and_empty_weight(m):
    w, args = quantized(9, 203, "nf4", True, adversarial=True)
    x = torch.randn(2, m, 406).to(DEVICE)[..., ::2]  # 3-D, strided last dim
    y = tq.triton_qbitmap_linear(x, *args)
    assert y.shape == (2, m, 9) and snr_db(y, x.double() @ w.double().T) >= MIN_SNR[torch.float32]
    _, empty = quantized(7, 50, sparsity=1.0)
    assert torch.count_nonzero(tq.triton_qbitmap_linear(torch.randn(m, 50).to(DEVICE), *empty)) == 0


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("m,n,k", [(1, 33, 37), (17, 40, 129)])
def test_grad_input_matches_reference(kind, m, n, k):
    w, args = quantized(n, k, kind, seed=k, adversarial=True)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(n)).to(DEVICE)
    gx = tq.triton_qbitmap_grad_input(g, *args)
    assert gx.shape == (m, k) and snr_db(gx, g.double() @ w.double()) >= MIN_SNR[torch.float32]


def test_refuses_mismatched_operands():
    _, (bitmask, codes, absmax, offsets, n, k, bs) = quantized(8, 40)
    with pytest.raises(SALRError, match="features"):
        tq.triton_qbitmap_linear(torch.randn(2, 41).to(DEVICE), bitmask, codes, absmax, offsets, n, k, bs)
    with pytest.raises(SALRError, match="code bytes"):
        tq.triton_qbitmap_linear(torch.randn(2, 40).to(DEVICE), bitmask, codes[:-1], absmax, offsets, n, k, bs)


@pytest.mark.parametrize("kind,double_quant,blocksize", [("nf4", False, 64), ("nf4", True, 32), ("int8", False, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_decode_is_the_reference_dequantization(kind, double_quant, blocksize, dtype):
    """triton_qbitmap_decode gives the fp32 dequantization of the format module bit for bit (rounded once to bf16
    for a bf16 W, to nearest even on a GPU): adversarial rows, and a weight with nothing kept."""
    g = torch.Generator().manual_seed(blocksize)
    w = torch.randn(9, 203, generator=g)
    mask = torch.rand(9, 203, generator=g) >= 0.5
    mask[0], mask[1], mask[2] = False, True, False
    mask[2, 202] = True
    qw = fm.encode_quantized(w * mask, mask, kind, blocksize, double_quant)
    args = [t.to(DEVICE) for t in (qw.bitmask, qw.q.codes, qw.q.scales(), qw.row_offsets)]
    dense = tq.triton_qbitmap_decode(*args, 9, 203, blocksize, dtype)
    ref = fm.decode_quantized(qw, torch.float32).to(DEVICE)
    if dtype == torch.float32 or CUDA:
        assert torch.equal(dense, ref.to(dtype))
    else:  # Triton's interpreter rounds fp32 -> bf16 toward zero (a GPU to nearest even): one bf16 step at most
        assert torch.equal(dense == 0, ref == 0)
        assert ((dense.float() - ref).abs() <= ref.abs() * 2**-7).all()
    _, (bitmask, codes, absmax, offsets, n, k, bs) = quantized(7, 50, sparsity=1.0)
    assert torch.count_nonzero(tq.triton_qbitmap_decode(bitmask, codes, absmax, offsets, n, k, bs)) == 0


@pytest.mark.parametrize("dense_decode", [False, True], ids=["fused", "decode+cublas"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_both_large_m_paths_match_reference(dense_decode, kind, monkeypatch):
    """From DENSE_DECODE_MIN_M rows up W is decoded once and multiplied densely; both paths (forced at M = 33) give
    the reference forward and input gradient, also when nothing is kept."""
    monkeypatch.setattr(tb, "DENSE_DECODE_MIN_M", 1 if dense_decode else 10**9)
    w, args = quantized(40, 129, kind, seed=5, adversarial=True)
    x = torch.randn(3, 11, 129, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = tq.triton_qbitmap_linear(x, *args)
    assert y.shape == (3, 11, 40) and snr_db(y, x.double() @ w.double().T) >= MIN_SNR[torch.float32]
    g = torch.randn(40, 33, generator=torch.Generator().manual_seed(2)).to(DEVICE).T  # transposed
    gx = tq.triton_qbitmap_grad_input(g, *args)
    assert gx.shape == (33, 129) and snr_db(gx, g.double() @ w.double()) >= MIN_SNR[torch.float32]
    _, empty = quantized(7, 50, kind, sparsity=1.0)
    assert torch.count_nonzero(tq.triton_qbitmap_linear(torch.randn(33, 50).to(DEVICE), *empty)) == 0


def test_operand_count_check_runs_once_per_weight(monkeypatch):
    """The count of kept values reads the GPU (a sync), so it is checked on a weight's first call only, and again
    after any of its tensors changes in place; a different weight is checked on its own first call."""
    calls = []
    real = tq.check_quantized_operands
    monkeypatch.setattr(tq, "check_quantized_operands", lambda *a: calls.append(1) or real(*a))
    _, args = quantized(8, 40, seed=11)
    x = torch.randn(2, 40).to(DEVICE)
    for _ in range(3):
        tq.triton_qbitmap_linear(x, *args)
    assert len(calls) == 1
    args[2].mul_(1.0)  # absmax modified in place: its version moves
    tq.triton_qbitmap_linear(x, *args)
    assert len(calls) == 2
    _, other = quantized(8, 40, seed=12)
    tq.triton_qbitmap_linear(x, *other)
    assert len(calls) == 3
    bitmask, codes, absmax, offsets, n, k, bs = args
    with pytest.raises(SALRError, match="code bytes"):  # the same codes with a bad count: checked, refused
        tq.triton_qbitmap_linear(x, bitmask, codes, absmax[:-1], offsets, n, k, bs)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_grad_input_decodes_w_in_row_blocks(kind, monkeypatch):
    """The large-M input gradient decodes W a block of rows at a time, as the bitmap op's does (the shared
    grad_input_by_row_blocks): with a tiny budget, 40 rows in blocks of 8, and the sum is still grad @ W."""
    monkeypatch.setattr(tb, "DENSE_DECODE_MIN_M", 1)
    monkeypatch.setattr(tb, "GRAD_DECODE_BYTES", 8 * 129 * 4)  # 8 fp32 rows of 129 columns
    decoded = []
    real = tq._decode
    monkeypatch.setattr(tq, "_decode", lambda *a: decoded.append(a[6]) or real(*a))
    w, args = quantized(40, 129, kind, seed=5, adversarial=True)
    g = torch.randn(33, 40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    gx = tq.triton_qbitmap_grad_input(g, *args)
    assert decoded == [8] * 5
    assert gx.shape == (33, 129) and snr_db(gx, g.double() @ w.double()) >= MIN_SNR[torch.float32]

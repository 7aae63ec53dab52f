"""Triton bitmap decode + GEMM kernel against a plain-torch reference.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before triton is imported);
with a GPU the same tests run the compiled kernel on CUDA, and the large-shape tests run too.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must happen before triton (and our kernel module) are imported
pytest.importorskip("triton", reason="triton is not installed: pip install --no-deps triton")

import salr.ops.triton as tb  # noqa: E402
from salr.errors import SALRError  # noqa: E402

if not CUDA and not tb.interpreting():  # imported earlier without the interpreter: rebuild the kernels
    tb = importlib.reload(tb)

DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter is too slow for real shapes)")


# ---------------------------------------------------------------- reference encode / decode (plain torch)


def encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bitmap form of w [N, K]: (bitmask uint8 [N, ceil(K/8)] LSB-first, values, row_offsets int64)."""
    n, k = w.shape
    nz = w != 0
    padded = torch.nn.functional.pad(nz, (0, -(-k // 8) * 8 - k)).reshape(n, -1, 8).long()
    bitmask = (padded << torch.arange(8, device=w.device)).sum(-1).to(torch.uint8)
    counts = nz.sum(1)
    return bitmask, w[nz], (torch.cumsum(counts, 0) - counts).long()


def decode(bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int):
    bits = (bitmask.long()[:, :, None] >> torch.arange(8, device=bitmask.device)) & 1
    mask = bits.reshape(rows, -1)[:, :cols].bool()
    assert torch.equal(row_offsets, torch.cumsum(mask.sum(1), 0) - mask.sum(1))
    w = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    w[mask] = values
    return w


def snr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (y.double() - ref.double()).pow(2).sum()
    signal = ref.double().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


MIN_SNR = {torch.float32: 100.0, torch.float16: 55.0, torch.bfloat16: 40.0}
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # of max |ref|, ~2 ulp at output


def random_weight(n: int, k: int, sparsity: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    return w.to(dtype)


def check(x: torch.Tensor, w: torch.Tensor, **adapter) -> None:
    """Run the kernel on (x, bitmap(w)) and compare with x @ w.T (+ adapter) in float64."""
    n, k = w.shape
    bitmask, values, row_offsets = encode(w)
    assert torch.equal(decode(bitmask, values, row_offsets, n, k), w)
    y = tb.triton_bitmap_linear(x, bitmask, values, row_offsets, n, k, **adapter)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype
    ref = x.double() @ w.double().T
    if adapter:
        t = torch.nn.functional.linear(x, adapter["a_cat"]) * adapter["scale"].to(x.dtype)  # kernel rounds t to x
        ref = ref + t.double() @ adapter["b_cat"].double().T
    assert_close_to_reference(y, ref)


def assert_close_to_reference(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Max error within REL_TOL of max |ref| and SNR at least MIN_SNR, for y's dtype."""
    err = (y.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-6)
    assert err <= REL_TOL[y.dtype] * scale, f"max abs err {err:.3g} vs max |ref| {scale:.3g}"
    if ref.abs().max() > 0:
        assert snr_db(y, ref) >= MIN_SNR[y.dtype]


# ---------------------------------------------------------------- correctness on small shapes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 33, 37),  # K not a multiple of 8, N odd, one K tile (second split-K slice is empty)
        (3, 40, 300),  # three K tiles across two split-K slices
        (16, 17, 136),  # K a multiple of 8 but not of the block
        (33, 65, 260),  # prefill path, partial M / N / K tiles
    ],
)
def test_matches_reference(m, n, k, dtype):
    g = torch.Generator().manual_seed(m * 1000 + n)
    w = random_weight(n, k, 0.5, dtype, seed=n).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    check(x, w)


def adversarial_weight(n: int = 9, k: int = 203) -> torch.Tensor:
    """All-zero rows, fully dense rows, a single nonzero and the last column set, in one fp32 weight."""
    w = random_weight(n, k, 0.5, torch.float32)
    w[0] = 0  # all-zero row
    w[1] = torch.randn(k).abs() + 0.1  # fully dense row
    w[2] = 0
    w[2, k - 1] = 3.0  # only the last (padded-byte) column
    w[4] = 0
    w[4, 0] = -2.0
    w[-1] = torch.randn(k).abs() + 0.1  # dense last row
    return w.to(DEVICE)


@pytest.mark.parametrize("m", [1, 33])
def test_adversarial_rows(m):
    check(torch.randn(m, 203).to(DEVICE), adversarial_weight(9, 203))


def test_all_zero_matrix_gives_zeros():
    w = torch.zeros(7, 50, dtype=torch.bfloat16)
    bitmask, values, row_offsets = encode(w)
    assert values.numel() == 0
    y = tb.triton_bitmap_linear(torch.randn(3, 50, dtype=torch.bfloat16).to(DEVICE), *to(bitmask, values, row_offsets))
    assert y.shape == (3, 7) and torch.count_nonzero(y) == 0


def to(bitmask, values, row_offsets, rows=7, cols=50):
    return bitmask.to(DEVICE), values.to(DEVICE), row_offsets.to(DEVICE), rows, cols


def test_noncontiguous_and_batched_x():
    w = random_weight(21, 70, 0.6, torch.float32).to(DEVICE)
    big = torch.randn(2, 5, 140).to(DEVICE)
    check(big[..., ::2], w)  # strided last dim, 3-D input
    check(torch.randn(70, 4).to(DEVICE).T, w)  # transposed x


def test_values_dtype_differs_from_x():
    w = random_weight(12, 40, 0.5, torch.bfloat16).to(DEVICE)
    bitmask, values, row_offsets = encode(w)
    x = torch.randn(2, 40).to(DEVICE)
    y = tb.triton_bitmap_linear(x, bitmask, values, row_offsets, 12, 40)
    ref = x.double() @ w.double().T
    assert snr_db(y, ref) >= MIN_SNR[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", [(9, 203), (33, 37), (40, 300), (1, 1)])
def test_dense_decode_is_exact(n, k, dtype):
    """triton_bitmap_decode rebuilds W bit for bit: adversarial rows (9 x 203), odd shapes, a 1 x 1 weight."""
    w = (adversarial_weight(n, k) if (n, k) == (9, 203) else random_weight(n, k, 0.5, torch.float32, seed=k)).to(dtype)
    w = w.to(DEVICE)
    assert torch.equal(tb.triton_bitmap_decode(*encode(w), n, k), w)
    zero = torch.zeros(n, k, dtype=dtype, device=DEVICE)  # no kept value at all: an empty values tensor
    assert torch.equal(tb.triton_bitmap_decode(*encode(zero), n, k), zero)


@pytest.mark.parametrize("dense_decode", [False, True], ids=["fused", "decode+cublas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_both_large_m_paths_match_reference(dense_decode, dtype, monkeypatch):
    """From DENSE_DECODE_MIN_M rows up, W is decoded once and multiplied densely; both paths (forced here at
    M = 33) give the reference forward with adapters, and the reference input gradient."""
    monkeypatch.setattr(tb, "DENSE_DECODE_MIN_M", 1 if dense_decode else 10**9)
    n, k, r = 65, 260, 5
    g = torch.Generator().manual_seed(7)
    w = random_weight(n, k, 0.5, dtype, seed=3).to(DEVICE)
    x = torch.randn(3, 11, k, generator=g).to(dtype).to(DEVICE)  # 33 rows in a 3-D batch
    adapter = {
        "a_cat": torch.randn(r, k, generator=g).to(dtype).to(DEVICE),
        "b_cat": torch.randn(n, r, generator=g).to(dtype).to(DEVICE),
        "scale": torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5], device=DEVICE),
    }
    check(x, w, **adapter)
    check(torch.randn(33, 203, generator=g).to(dtype).to(DEVICE), adversarial_weight(9, 203).to(dtype))
    check_grad_input(torch.randn(33, n, generator=g).to(dtype).to(DEVICE), w)
    check_grad_input(torch.randn(n, 33, generator=g).to(dtype).to(DEVICE).T, w)  # transposed grad


@pytest.mark.parametrize("m", [2, 20])
def test_adapter_epilogue(m):
    n, k, r = 30, 150, 6
    dtype = torch.float16
    g = torch.Generator().manual_seed(5)
    w = random_weight(n, k, 0.5, dtype).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    a_cat = (torch.randn(r, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    b_cat = torch.randn(n, r, generator=g).to(dtype).to(DEVICE)
    scale = torch.rand(r, generator=g).to(DEVICE) + 0.5
    check(x, w, a_cat=a_cat, b_cat=b_cat, scale=scale)
    # and the adapter really contributes: without it the result differs
    bitmask, values, row_offsets = encode(w)
    base = tb.triton_bitmap_linear(x, bitmask, values, row_offsets, n, k)
    full = tb.triton_bitmap_linear(x, bitmask, values, row_offsets, n, k, a_cat=a_cat, b_cat=b_cat, scale=scale)
    assert (full.float() - base.float()).abs().max() > 0.1


def check_grad_input(g: torch.Tensor, w: torch.Tensor) -> None:
    """triton_bitmap_grad_input(g, bitmap(w)) against g @ w in float64."""
    n, k = w.shape
    gx = tb.triton_bitmap_grad_input(g, *encode(w), n, k)
    assert gx.shape == (*g.shape[:-1], k) and gx.dtype == g.dtype
    assert_close_to_reference(gx, g.double() @ w.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k", [(1, 33, 37), (5, 70, 300), (17, 40, 129)])
def test_grad_input_matches_reference(m, n, k, dtype):
    g = torch.Generator().manual_seed(m + n + k)
    w = random_weight(n, k, 0.5, dtype, seed=k).to(DEVICE)
    check_grad_input(torch.randn(m, n, generator=g).to(dtype).to(DEVICE), w)


def test_grad_input_adversarial_rows_and_strides():
    n = 9
    w = adversarial_weight(n, 203)
    check_grad_input(torch.randn(2, 3, 2 * n).to(DEVICE)[..., ::2], w)  # 3-D, strided last dim
    check_grad_input(torch.randn(n, 4).to(DEVICE).T, w)  # transposed
    zero = tb.triton_bitmap_grad_input(torch.randn(3, 7).to(DEVICE), *to(*encode(torch.zeros(7, 50))))
    assert zero.shape == (3, 50) and torch.count_nonzero(zero) == 0
    with pytest.raises(SALRError, match="rows"):
        tb.triton_bitmap_grad_input(torch.randn(3, 8).to(DEVICE), *to(*encode(torch.zeros(7, 50))))


def test_grad_input_is_the_autograd_of_the_forward_kernel():
    """Through torch autograd: the gradient of sum(y * c) w.r.t. x is c @ W, matched by the grad kernel."""
    w = random_weight(24, 130, 0.5, torch.float32, seed=4).to(DEVICE)
    x = torch.randn(6, 130, device=DEVICE, requires_grad=True)
    c = torch.randn(6, 24, device=DEVICE)
    (x @ w.T * c).sum().backward()
    gx = tb.triton_bitmap_grad_input(c, *encode(w), 24, 130)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- metadata and validation


def test_block_prefix_counts_nonzeros_before_each_block():
    w = random_weight(5, 300, 0.7, torch.float32, seed=3)
    bitmask, _, _ = encode(w)
    prefix = tb.bitmap_block_prefix(bitmask, 300)
    assert prefix.dtype == torch.int32 and prefix.shape == (5, 3)
    nz = (w != 0).int()
    for b in range(3):
        assert torch.equal(prefix[:, b], nz[:, : b * tb.PREFIX_BLOCK].sum(1).int())
    assert torch.equal(tb.bitmap_block_prefix(bitmask, 300, block=8)[:, 5], nz[:, :40].sum(1).int())


def test_block_prefix_cache_reuses_and_invalidates():
    w = random_weight(4, 260, 0.5, torch.float32)
    bitmask, _, _ = encode(w)
    first = tb.cached_block_prefix(bitmask, 260)
    assert tb.cached_block_prefix(bitmask, 260) is first
    bitmask[:, :] = 0xFF  # in-place change bumps the version counter
    again = tb.cached_block_prefix(bitmask, 260)
    assert again is not first and again[:, 1].tolist() == [128] * 4


def test_grad_input_decodes_w_in_row_blocks(monkeypatch):
    """The large-M input gradient decodes W a block of rows at a time (at most GRAD_DECODE_BYTES of dense W): with
    a tiny budget, 65 rows go in blocks of 8 (the last partial) and the sum is still grad @ W."""
    monkeypatch.setattr(tb, "DENSE_DECODE_MIN_M", 1)
    monkeypatch.setattr(tb, "GRAD_DECODE_BYTES", 8 * 260 * 4)  # 8 fp32 rows of 260 columns
    decoded = []
    real = tb._decode_dense
    monkeypatch.setattr(tb, "_decode_dense", lambda *a: decoded.append(a[4]) or real(*a))
    w = random_weight(65, 260, 0.5, torch.float32, seed=2).to(DEVICE)
    check_grad_input(torch.randn(40, 65).to(DEVICE), w)
    assert decoded == [8] * 8 + [1]


def test_explicit_block_prefix_is_used():
    w = random_weight(10, 200, 0.5, torch.float32)
    bitmask, values, row_offsets = encode(w)
    x = torch.randn(2, 200)
    prefix = tb.bitmap_block_prefix(bitmask, 200)
    args = (x.to(DEVICE), bitmask.to(DEVICE), values.to(DEVICE), row_offsets.to(DEVICE), 10, 200)
    good = tb.triton_bitmap_linear(*args, block_prefix=prefix.to(DEVICE))
    assert snr_db(good.cpu(), x.double() @ w.double().T) >= 100
    wrong = tb.triton_bitmap_linear(*args, block_prefix=(prefix + 1).to(DEVICE))  # shifted indices: wrong values
    assert snr_db(wrong.cpu(), x.double() @ w.double().T) < 40


def test_bad_inputs_raise_salr_error():
    w = random_weight(6, 24, 0.5, torch.float32)
    bitmask, values, row_offsets = encode(w)
    x = torch.randn(2, 24)
    with pytest.raises(SALRError, match="input features"):
        tb.triton_bitmap_linear(torch.randn(2, 25), bitmask, values, row_offsets, 6, 24)
    with pytest.raises(SALRError, match="bitmask shape .* does not match weight shape"):
        tb.triton_bitmap_linear(x, bitmask[:5], values, row_offsets, 6, 24)
    with pytest.raises(SALRError, match="row_offsets must be int64"):
        tb.triton_bitmap_linear(x, bitmask, values, row_offsets.int(), 6, 24)
    with pytest.raises(SALRError, match="block_prefix must be int32"):
        tb.triton_bitmap_linear(x, bitmask, values, row_offsets, 6, 24, block_prefix=torch.zeros(6, 1))
    with pytest.raises(SALRError, match="bf16, fp16 or fp32"):
        tb.triton_bitmap_linear(x.double(), bitmask, values, row_offsets, 6, 24)


# ---------------------------------------------------------------- GPU only: real shapes


@gpu_only
@pytest.mark.parametrize("m", [1, 16, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_shapes_on_gpu(m, dtype):
    n, k = 4096, 4096
    w = random_weight(n, k, 0.5, dtype).cuda()
    x = torch.randn(m, k, device="cuda").to(dtype)
    check(x, w)


@gpu_only
def test_odd_large_shape_on_gpu():
    w = random_weight(11008 + 3, 4096 + 5, 0.5, torch.bfloat16).cuda()
    check(torch.randn(7, 4096 + 5, device="cuda").bfloat16(), w)
    check(torch.randn(300, 4096 + 5, device="cuda").bfloat16(), w)


# ---------------------------------------------------------------- bench helpers


def test_project_encoder_matches_reference_layout():
    from salr.bitmap_format import encode as project_encode

    w = random_weight(13, 45, 0.5, torch.float16)
    bw = project_encode(w)
    for got, want in zip((bw.bitmask, bw.values, bw.row_offsets), encode(w), strict=True):
        assert torch.equal(got, want)
    assert encode(w)[0][0, 0].item() == sum(1 << c for c in range(8) if w[0, c] != 0)  # LSB-first


def test_cuda_kernels_are_registered_at_import():
    # importing salr.ops installs a CUDA kernel for every op (it loads Triton on its first call), so a direct
    # torch.ops.salr.* call on CUDA tensors never falls back to the reference for lack of a prior forward
    import salr.ops  # noqa: F401

    for op in ("salr::bitmap_linear", "salr::bitmap_linear_grad_input", "salr::salr_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_direct_op_call_on_cuda_reaches_triton_without_a_forward():
    # a fresh interpreter: nothing has run a forward pass; count calls of the Triton entry point
    code = """
import torch, salr.ops, salr.ops.triton as tb
calls = []
real = tb.triton_bitmap_linear
tb.triton_bitmap_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
from salr.bitmap_format import encode
w = torch.randn(40, 100)
w[w.abs() < 0.7] = 0
bw = encode(w.bfloat16().cuda())
x = torch.randn(5, 100, device="cuda").bfloat16()
y = torch.ops.salr.bitmap_linear(x, bw.bitmask, bw.values, bw.row_offsets, 40, 100)
ref = x.double() @ w.bfloat16().double().cuda().T
assert calls, "the Triton kernel was not called"
assert (y.double() - ref).norm() / ref.norm() < 1e-2
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.skipif(CUDA, reason="interpreter mode only (TRITON_INTERPRET is not set when a GPU is present)")
def test_check_triton_on_cpu_reports_small_error():
    from salr.bench.kernel import check_triton_on_cpu

    report = check_triton_on_cpu((128, 256), tokens=16, sparsity=0.5)
    assert report["backend"] == "triton-interpreter" and report["shape"] == [128, 256]
    assert abs(report["measured_sparsity"] - 0.5) < 0.01
    assert report["snr_db"] >= MIN_SNR[torch.bfloat16]
    assert report["max_abs_err"] <= REL_TOL[torch.bfloat16] * report["max_abs_ref"]


@gpu_only
def test_bench_gpu_kernel_reports_timings():
    from salr.bench.kernel import bench_gpu_kernel

    report = bench_gpu_kernel((1024, 1024), tokens=16, sparsity=0.5, rep_ms=20)
    assert report["dense_ms"] > 0 and report["bitmap_triton_ms"] > 0
    assert report["bitmap_snr_db"] >= MIN_SNR[torch.bfloat16]
    assert report["bitmap_bytes"] < report["dense_bytes"]


def test_autotune_switch_keeps_one_config_per_kernel():
    """SALR_TRITON_AUTOTUNE=0 at import: one config per kernel (the GPU suite's test stage), split-K for decode."""
    code = (
        "import salr.ops.triton as t, salr.ops.triton_qbitmap as q\n"
        "print(t.AUTOTUNE, len(t._DECODE_CONFIGS), len(t._PREFILL_CONFIGS), len(t._GRAD_CONFIGS),"
        " len(q._DECODE_CONFIGS), len(q._PREFILL_CONFIGS), len(q._GRAD_CONFIGS),"
        " t._DECODE_CONFIGS[0].kwargs['SPLIT_K'])"
    )
    for value, expected in (("0", "False 1 1 1 1 1 1 4"), ("1", None)):
        env = {**os.environ, "SALR_TRITON_AUTOTUNE": value, "TRITON_INTERPRET": "1"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        if expected:
            assert out.stdout.split() == expected.split()
        else:
            fields = out.stdout.split()
            assert fields[0] == "True" and all(int(n) > 1 for n in fields[1:7])

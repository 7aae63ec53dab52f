"""2:4 semi-structured helper: mask validation and availability logic on CPU; the sparse matmul on a GPU."""

import logging
import re

import pytest
import torch

from salr.bases.semi_structured import (
    SemiStructuredBase,
    check_2to4,
    semi_structured_available,
    support_reason,
)
from salr.errors import SALRError

CUDA = torch.cuda.is_available()


def two_four(rows: int, cols: int, dtype=torch.float32, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Random weight with the 2 largest-magnitude entries kept in every group of 4 columns."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    groups = w.reshape(rows, cols // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(rows, cols).to(dtype).to(device)


def test_check_2to4_accepts_valid_and_sparser_patterns():
    w = two_four(8, 32)
    check_2to4(w)
    w[:, :4] = 0  # fewer than 2 nonzeros in a group is still 2:4
    check_2to4(w)


def test_check_2to4_rejects_dense_groups_with_count():
    w = two_four(8, 32)
    w[0, 0:4] = 1.0  # one group with 4 nonzeros
    w[3, 8:11] = 1.0  # one with 3
    with pytest.raises(SALRError, match="2 of 64 groups"):
        check_2to4(w)


def test_check_2to4_rejects_bad_shapes():
    with pytest.raises(SALRError, match="divisible by 4"):
        check_2to4(torch.zeros(4, 10))
    with pytest.raises(SALRError, match="2-D"):
        check_2to4(torch.zeros(2, 4, 8))


@pytest.mark.parametrize(
    "shape,dtype,device,cap,backend,expect",
    [
        ((64, 64), torch.float16, "cuda", (8, 0), "cusparselt", None),
        ((64, 64), torch.bfloat16, "cuda", (9, 0), "cutlass", None),
        ((48, 64), torch.float16, "cuda", (8, 6), "cusparselt", None),  # 48 is a multiple of 16
        ((48, 64), torch.float16, "cuda", (8, 6), "cutlass", "multiples of \\[32, 64\\]"),
        ((64, 64), torch.float16, "cpu", None, "cusparselt", "needs a CUDA device"),
        ((64, 64), torch.float16, "cuda", (7, 5), "cusparselt", "compute capability >= 8.0"),
        ((64, 64), torch.float32, "cuda", (8, 0), "cusparselt", "fp16/bf16"),
        ((8, 64), torch.float16, "cuda", (8, 0), "cusparselt", "multiples of \\[16, 16\\]"),
        ((64, 40), torch.bfloat16, "cuda", (8, 0), "cusparselt", "multiples"),
    ],
)
def test_support_reason(shape, dtype, device, cap, backend, expect):
    reason = support_reason(shape, dtype, device, cap, backend)
    if expect is None:
        assert reason is None
    else:
        assert reason is not None
        assert re.search(expect, reason), reason


def test_fallback_without_cuda_is_dense_exact_and_logged(caplog):
    w = two_four(32, 64, seed=1)
    bias = torch.randn(32)
    ok, reason = semi_structured_available(w)
    assert not ok and "CUDA" in reason
    with caplog.at_level(logging.INFO, logger="salr.bases.semi_structured"):
        mod = SemiStructuredBase(w)
    assert mod.backend == "dense" and "CUDA" in mod.reason
    assert any("runs dense" in r.message for r in caplog.records)
    x = torch.randn(2, 3, 64)
    y = mod(x) + bias
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, x @ w.T + bias)


def test_invalid_pattern_rejected_before_conversion():
    w = torch.randn(32, 64)
    with pytest.raises(SALRError, match="not 2:4"):
        SemiStructuredBase(w)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_matmul_on_gpu(dtype):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability >= 8.0")
    w = two_four(256, 512, dtype, device="cuda")
    mod = SemiStructuredBase(w)
    assert mod.backend in ("cusparselt", "cutlass"), mod.reason
    x = torch.randn(4, 37, 512, device="cuda", dtype=dtype)  # 148 rows: not a multiple of the tile
    ref = x.double() @ w.double().T
    y = mod(x)
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel < 1e-2


# ---------------------------------------------------------------- the 2:4 base of SALR layers


def test_semi_structured_base_without_cuda_is_an_exact_dense_base():
    from salr.bases.semi_structured import SemiStructuredBase

    w = two_four(24, 64)
    base = SemiStructuredBase(w)
    assert base.backend == "dense" and "CUDA" in base.reason
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(base(x), x @ w.T, rtol=0, atol=0)
    assert base.shape == (24, 64) and base.dtype == torch.float32 and base.nbytes == w.numel() * 4
    assert torch.equal(base.to_dense(), w)
    assert list(base.state_dict()) == ["weight"] and torch.equal(base.state_dict()["weight"], w)
    with pytest.raises(SALRError, match="not 2:4"):
        SemiStructuredBase(torch.ones(4, 8))


def _convert_2to4(model, device: str = "cpu"):
    from salr.config import SALRConfig
    from salr.convert import convert

    model.to(device)
    return convert(model, SALRConfig.from_preset("paper", pattern="2:4", residual_rank=4, r=2, seed=0), progress=False)


def test_use_semi_structured_on_cpu_keeps_every_base_and_says_why(tiny_llama):
    from salr.bases import DenseBase
    from salr.convert import salr_modules, use_semi_structured

    report = _convert_2to4(tiny_llama)
    assert "semi_structured" not in report  # convert never moves bases onto sparse tensor cores by itself
    layers = [m for _, m in salr_modules(tiny_llama)]
    assert layers and all(isinstance(m.base, DenseBase) for m in layers)
    for m in layers:
        check_2to4(m.base.weight)  # raises unless 2:4
    result = use_semi_structured(tiny_llama)
    assert result == {"semi_structured": 0, "kept": len(layers), "reasons": {"not on a CUDA device": len(layers)}}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_use_semi_structured_on_gpu_uses_sparse_tensor_cores_and_saves_dense(tiny_llama, tmp_path):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability >= 8.0")
    import salr
    from salr.bases.semi_structured import SemiStructuredBase
    from salr.convert import salr_modules, use_semi_structured

    tiny_llama.to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    report = _convert_2to4(tiny_llama, "cuda")
    assert "semi_structured" not in report  # no device side effect in convert
    layers = [m for _, m in salr_modules(tiny_llama)]
    swapped = use_semi_structured(tiny_llama)["semi_structured"]
    assert swapped == sum(isinstance(m.base, SemiStructuredBase) for m in layers) and swapped > 0
    state = tiny_llama.state_dict()  # what salr.save writes: plain dense bases
    for name, m in salr_modules(tiny_llama):
        if isinstance(m.base, SemiStructuredBase):
            saved = state[f"{name}.base.weight"]
            assert type(saved) is torch.Tensor and torch.equal(saved, m.base.to_dense())
    with torch.no_grad():
        fast = tiny_llama(ids).logits.float()
        for m in layers:  # the same weights, dense
            if isinstance(m.base, SemiStructuredBase):
                m.base = salr.DenseBase(m.base.to_dense())
        ref = tiny_llama(ids).logits.float()
    assert (fast - ref).norm() / ref.norm() < 2e-2

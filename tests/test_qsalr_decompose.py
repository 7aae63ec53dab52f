"""QSALR with the activation-aware recipes: the residual is fitted to the *quantized* base's error whatever the mask
criterion (SparseGPT's updated kept weights included) and residual fit (whitened, alternating)."""

from __future__ import annotations

import pytest
import torch

import salr
from salr.bases import QBitmapBase
from salr.calibration import LayerStats, relative_output_error
from salr.config import SALRConfig
from salr.decompose import decompose, prune
from salr.layer import SALRLinear
from salr.residual import whitened_svd


def problem(out_dim: int = 48, in_dim: int = 64, tokens: int = 600, seed: int = 0):
    """W [out, in] and a Gram of correlated inputs with a few loud features (like LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_dim, in_dim, generator=gen)
    mix = torch.randn(in_dim, in_dim, generator=gen) / in_dim**0.5 + torch.eye(in_dim)
    x = (torch.randn(tokens, in_dim, generator=gen) @ mix).double()
    x[:, :3] *= 8.0
    return w, x.T @ x


def config(**fields) -> SALRConfig:
    return SALRConfig(sparsity=0.5, residual_rank=6, r=0, **fields)


@pytest.mark.parametrize("criterion", ["sparsegpt", "wanda", "magnitude"])
def test_whitened_residual_is_fitted_to_the_quantized_base_error(criterion):
    w, gram = problem()
    stats = LayerStats(gram, 600)
    quant = config(criterion=criterion, residual_init="whitened", quant="nf4")
    split = decompose(w, quant, stats)
    # the stored base: NF4 codes of the pruned weight (SparseGPT: its updated kept weights), computing deq(Q(Ŵ))
    pruned, mask = prune(w, quant, stats)
    expected = QBitmapBase.from_dense(pruned, mask, kind="nf4")
    assert isinstance(split.stored, QBitmapBase) and torch.equal(split.stored.codes, expected.codes)
    assert torch.equal(split.base, expected.dequantize()) and not torch.equal(split.base, pruned)
    # the residual: the whitened SVD of E = W0 - deq(Q(Ŵ)), not of the pruning error W0 - Ŵ alone
    direct = whitened_svd(w - expected.dequantize(), None, 6, cholesky=stats.factor("cholesky", quant.damping))
    torch.testing.assert_close(split.factors.B @ split.factors.A, direct.B @ direct.A, atol=1e-5, rtol=1e-4)
    plain = decompose(w, config(criterion=criterion, residual_init="whitened"), stats)
    assert torch.equal(plain.base, pruned) and plain.stored is None
    # fitting the quantized error beats keeping the unquantized fit on the quantized base, on the output error
    ours = relative_output_error(w, split.base + split.factors.B @ split.factors.A, gram)
    unaware = relative_output_error(w, split.base + plain.factors.B @ plain.factors.A, gram)
    assert ours < unaware
    row = split.row
    assert row["quantization_energy"] > 0 and row["output_error_after_residual"] == pytest.approx(ours, rel=1e-6)
    assert row["pruned_energy"] == pytest.approx(float((w - pruned).pow(2).sum()), rel=1e-6)
    assert row["error_energy"] == pytest.approx(float((w - split.base).pow(2).sum()), rel=1e-6)


@pytest.mark.parametrize("criterion", ["sparsegpt", "magnitude"])
def test_alternating_rounds_quantize_inside_each_prune_step(criterion):
    w, gram = problem()
    stats = LayerStats(gram, 600)
    alt = config(criterion=criterion, residual_init="alternating", alternating_rounds=3, quant="nf4")
    split = decompose(w, alt, stats)
    # the last round's base is the quantized prune of W0 - (previous round's B A): replay rounds 1 and 2
    low_rank = torch.zeros_like(w)
    for _ in range(2):
        pruned, mask = prune(w - low_rank, alt, stats)
        base = QBitmapBase.from_dense(pruned, mask, kind="nf4").dequantize()
        fit = whitened_svd(w - base, None, 6, cholesky=stats.factor("cholesky", alt.damping))
        low_rank = fit.B @ fit.A
    pruned, mask = prune(w - low_rank, alt, stats)
    assert torch.equal(split.base, QBitmapBase.from_dense(pruned, mask, kind="nf4").dequantize())
    final = whitened_svd(w - split.base, None, 6, cholesky=stats.factor("cholesky", alt.damping))
    torch.testing.assert_close(split.factors.B @ split.factors.A, final.B @ final.A, atol=1e-5, rtol=1e-4)
    once = decompose(w, config(criterion=criterion, residual_init="whitened", quant="nf4"), stats)
    assert split.row["output_error_after_residual"] <= once.row["output_error_after_residual"] * 1.02


def test_salr_plus_convert_stores_quantized_bases(tiny_llama):
    config = SALRConfig.from_preset(
        "salr+", sparsity=0.5, residual_rank=8, r=2, quant="nf4", calibration_samples=4, calibration_length=16
    )
    report = salr.convert(tiny_llama, config, progress=False)
    quantized = [m for m in tiny_llama.modules() if isinstance(m, SALRLinear)]
    assert quantized and all(isinstance(m.base, QBitmapBase) for m in quantized)
    totals = report["totals"]
    assert totals["quant"] == "nf4" and totals["quantization_energy"] > 0
    assert totals["sparsity"] == pytest.approx(0.5, abs=0.01)
    for row in report["layers"]:
        assert row["output_error_after_residual"] < row["output_error_before_residual"]


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_dense_bases_of_lora_and_qlora_need_no_calibration_with_the_default_recipe(tiny_llama, quant):
    # method_config("lora" | "qlora") sets sparsity 0 on the default (salr+: SparseGPT) recipe: no Grams are
    # collected then, so pruning must keep every weight without asking for them
    from salr.train import method_config

    config = method_config("lora", SALRConfig(residual_rank=4, r=4, quant=quant))
    assert config.criterion == "sparsegpt" and not config.needs_calibration
    dense = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)}
    report = salr.convert(tiny_llama, config, progress=False)
    assert report["totals"]["sparsity"] == 0.0
    layer = tiny_llama.model.layers[0].mlp.up_proj
    w0 = dense["model.layers.0.mlp.up_proj"]
    if quant == "none":
        assert torch.equal(layer.base.weight, w0)
    else:
        assert isinstance(layer.base, QBitmapBase) and torch.equal(
            layer.base.dequantize(), QBitmapBase.from_dense(w0, torch.ones_like(w0, dtype=torch.bool)).dequantize()
        )

"""QSALR with the activation-aware recipes: the residual is fitted to the *quantized* base's error whatever the mask
criterion (SparseGPT's updated kept weights included) and residual fit (whitened, alternating); and GPTQ rounding of
the quantized base (quant_rounding), checked against textbook GPTQ, against nearest rounding, and for the format."""

from __future__ import annotations

import pytest
import torch

import salr
from salr.bases import QBitmapBase
from salr.bitmap_format import QuantizedValues, pack_codes, round_to_scales, unpack_codes
from salr.calibration import LayerStats, relative_output_error
from salr.config import PRESETS, SALRConfig
from salr.decompose import decompose, prune
from salr.errors import SALRError
from salr.layer import SALRLinear
from salr.pruning import damped_gram, sparsegpt
from salr.quantize import quantize_bases
from salr.residual import whitened_svd
from salr.train import method_config


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
    quant = config(
        criterion=criterion, residual_init="whitened", quant="nf4", quant_rounding="nearest", quant_scales="absmax"
    )
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
    alt = config(
        criterion=criterion,
        residual_init="alternating",
        alternating_rounds=3,
        quant="nf4",
        quant_rounding="nearest",
        quant_scales="absmax",
    )
    split = decompose(w, alt, stats)
    # the last round's base is the quantized prune of W0 - (the previous rounds' B A, extrapolated by the
    # momentum m), and each round's randomized SVD starts from the basis of the round before: replay rounds 1 and 2
    low_rank = previous = torch.zeros_like(w)
    m, chol, fit = alt.alternating_momentum, stats.factor("cholesky", alt.damping), None
    for _ in range(2):
        pruned, mask = prune(w - low_rank - m * (low_rank - previous), alt, stats)
        base = QBitmapBase.from_dense(pruned, mask, kind="nf4").dequantize()
        fit = whitened_svd(w - base, None, 6, cholesky=chol, start=fit.basis if fit else None)
        previous, low_rank = low_rank, fit.B @ fit.A
    assert fit.basis is not None  # 48 x 64 at rank 6: the randomized SVD, so the warm start is exercised
    pruned, mask = prune(w - low_rank - m * (low_rank - previous), alt, stats)
    assert torch.equal(split.base, QBitmapBase.from_dense(pruned, mask, kind="nf4").dequantize())
    final = whitened_svd(w - split.base, None, 6, cholesky=chol, start=fit.basis)
    torch.testing.assert_close(split.factors.B @ split.factors.A, final.B @ final.A, atol=1e-5, rtol=1e-4)
    once = decompose(
        w,
        config(
            criterion=criterion, residual_init="whitened", quant="nf4", quant_rounding="nearest", quant_scales="absmax"
        ),
        stats,
    )
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


def textbook_gptq(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, round_fn, damping: float = 0.01):
    """GPTQ as its paper writes it, fp64: round column j, spread its error over the later columns with the inverse
    Hessian's row j, then remove j from the inverse (no Cholesky, no blocks). Pruned weights are rounded to 0."""
    w = w.double().clone()
    h_inv = torch.linalg.inv(damped_gram(gram, damping))
    for j in range(w.shape[1]):
        stored = torch.where(keep[:, j], round_fn(w[:, j]), torch.zeros_like(w[:, j]))
        err = (w[:, j] - stored) / h_inv[j, j]
        w[:, j:] -= torch.outer(err, h_inv[j, j:])
        w[:, j] = stored
        h_inv = h_inv - torch.outer(h_inv[:, j], h_inv[j, :]) / h_inv[j, j]
    return w


@pytest.mark.parametrize("blocksize", [128, 16, 7])
def test_sweep_with_rounding_is_textbook_gptq(blocksize):
    w, gram = problem(out_dim=24, in_dim=40)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5

    def to_quarters(v):
        return torch.round(v * 4) / 4

    ours, mask = sparsegpt(w, gram, 0.5, keep_mask=keep, blocksize=blocksize, round_kept=lambda _j, v: to_quarters(v))
    expected = textbook_gptq(w, gram, keep, to_quarters)
    assert torch.equal(mask, keep)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(ours, to_quarters(ours))  # every kept weight on the grid, pruned ones exactly 0
    assert not ours[~keep].any()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_gptq_keeps_bitmap_and_scales_and_lowers_the_output_error(kind, double_quant):
    w, gram = problem()
    stats = LayerStats(gram, 600)
    pruned, mask = sparsegpt(w, gram, 0.5)
    results = {}
    for rounding in ("nearest", "gptq"):
        config = SALRConfig(quant=kind, quant_double=double_quant, quant_rounding=rounding, quant_scales="absmax")
        [(stored, base)] = quantize_bases([(pruned, mask)], config, [torch.float32], stats)
        assert torch.equal(stored.dequantize(), base)  # the stored codes compute exactly what was fitted against
        results[rounding] = stored, base
    nearest, gptq = results["nearest"][0], results["gptq"][0]
    assert torch.equal(gptq.bitmask, nearest.bitmask) and torch.equal(gptq.row_offsets, nearest.row_offsets)
    for name in ("absmax", "qabsmax", "nested_absmax", "offset"):
        a, b = getattr(gptq, name), getattr(nearest, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert not torch.equal(gptq.codes, nearest.codes)
    # what GPTQ minimizes: the quantization's own output error on the calibration inputs, ‖(Ŵ − deq) X‖² (both
    # relative to the same ‖Ŵ X‖², so the ratio of the squares is that of the absolute errors)
    err_nearest = relative_output_error(pruned, results["nearest"][1], gram) ** 2
    err_gptq = relative_output_error(pruned, results["gptq"][1], gram) ** 2
    assert err_gptq < 0.8 * err_nearest, (err_gptq, err_nearest)


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_searched_scales_lower_the_output_error_of_the_quantized_base(rounding):
    w, gram = problem()
    stats = LayerStats(gram, 600)
    pruned, mask = sparsegpt(w, gram, 0.5)
    errors = {}
    for rule in ("absmax", "search"):
        config = SALRConfig(quant="nf4", quant_rounding=rounding, quant_scales=rule)
        [(stored, base)] = quantize_bases([(pruned, mask)], config, [torch.float32], stats)
        assert torch.equal(stored.dequantize(), base)  # the stored codes compute exactly what was fitted against
        errors[rule] = relative_output_error(pruned, base, gram)
        if rule == "absmax":
            absmax = stored
    assert not torch.equal(stored.absmax, absmax.absmax) and torch.equal(stored.bitmask, absmax.bitmask)
    assert errors["search"] < errors["absmax"], errors


def test_a_group_is_rounded_as_one_by_one():
    # q/k/v share a Gram: one sweep over their concatenation must round each exactly as its own sweep
    w, gram = problem(out_dim=80)
    stats = LayerStats(gram, 600)
    parts = [sparsegpt(p, gram, 0.5) for p in w.split([48, 32])]
    config = SALRConfig(quant="nf4", quant_rounding="gptq")
    together = quantize_bases(parts, config, [torch.float32] * 2, stats)
    for part, (stored, base) in zip(parts, together, strict=True):
        [(alone, alone_base)] = quantize_bases([part], config, [torch.float32], stats)
        assert torch.equal(stored.codes, alone.codes) and torch.equal(base, alone_base)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_round_to_scales_round_trips_and_packs_like_the_encoder(kind):
    values = torch.randn(131) * 3
    scales = torch.rand(131) + 0.5
    scales[5] = 0.0  # an all-zero block: code of 0
    codes, dequantized = round_to_scales(values, scales, kind)
    again, _ = round_to_scales(dequantized, scales, kind)
    assert torch.equal(codes, again) and dequantized[5] == 0
    packed = pack_codes(codes, kind)
    absmax = torch.ones(3)
    q = QuantizedValues(kind, packed, 131, 64, absmax=absmax)
    assert torch.equal(unpack_codes(q), codes)


def test_rounding_defaults_and_clear_errors():
    assert SALRConfig(quant="nf4").rounding == "gptq"  # salr+ default: calibration statistics exist
    assert SALRConfig.from_preset("paper", quant="nf4").rounding == "nearest"  # magnitude + SVD: no data
    assert SALRConfig().rounding is None and PRESETS["paper"].get("quant_rounding") is None
    assert method_config("qlora", SALRConfig(quant="nf4")).rounding == "nearest"  # dense NF4 base: nothing to see
    with pytest.raises(SALRError, match="needs calibration statistics"):
        SALRConfig.from_preset("paper", quant="nf4", quant_rounding="gptq")
    with pytest.raises(SALRError, match="pass quant="):
        SALRConfig(quant_rounding="gptq")
    with pytest.raises(SALRError, match="quant_rounding must be one of"):
        SALRConfig(quant="nf4", quant_rounding="stochastic")
    saved = SALRConfig(quant="nf4").to_dict()
    del saved["quant_rounding"]  # a checkpoint written before GPTQ rounding existed was rounded to nearest
    assert SALRConfig.from_dict(saved).rounding == "nearest"


def test_scale_rule_defaults_and_clear_errors():
    assert SALRConfig(quant="nf4").scale_rule == "search"  # salr+: weighted by the calibration statistics
    assert SALRConfig.from_preset("paper", quant="nf4").scale_rule == "absmax"  # QLoRA's, as the paper
    assert method_config("qlora", SALRConfig(quant="nf4")).scale_rule == "absmax"  # the QLoRA baseline is QLoRA
    assert SALRConfig().scale_rule is None
    assert SALRConfig.from_preset("paper", quant="nf4", quant_scales="search").scale_rule == "search"
    with pytest.raises(SALRError, match="pass quant="):
        SALRConfig(quant_scales="search")
    with pytest.raises(SALRError, match="quant_scales must be one of"):
        SALRConfig(quant="nf4", quant_scales="minmax")
    saved = SALRConfig(quant="nf4").to_dict()
    del saved["quant_scales"]  # a checkpoint written before the search existed has absmax scales
    assert SALRConfig.from_dict(saved).scale_rule == "absmax"

"""One weight W0 [out, in] -> frozen sparse base Ŵ + residual factors B A (+ the report row): the per-layer core of
`convert`, combining the masks of salr.pruning and the fits of salr.residual as SALRConfig says.

- criterion "magnitude" + residual_init "svd" is the paper: Ŵ = M ⊙ W0 with M from |W0|, B A = SVD_r(W0 − Ŵ);
- "wanda" / "sparsegpt" choose M from the input Gram H of the layer (SparseGPT also updates the kept weights);
- "whitened" fits B A to the output error ‖(W0 − Ŵ − B A) X‖ instead of the weight error;
- "alternating" repeats: Ŵ = prune(W0 − B A), B A = fit(W0 − Ŵ), starting from B A = 0 (OATS-style); from the
  second round on the prune step sees B A extrapolated along its last step, L + m (L − L_prev) with
  m = `alternating_momentum` (heavy-ball / over-relaxation: the plain alternation converges slowly, and on the
  default model five extrapolated rounds reach a lower output error than eight plain ones).

With `quant` (QSALR) the frozen base is the quantized Ŵ and every fit above sees its error: E = W0 − deq(Q(Ŵ))
(salr.quantize); in alternating rounds the quantization is part of each round's prune step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from salr.bases.qbitmap import QBitmapBase
from salr.calibration import LayerStats, output_errors
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.pruning import magnitude_mask, sparsegpt, wanda_mask
from salr.quantize import error_energies, quantize_bases
from salr.residual import ResidualFactors, residual_svd, whitened_svd


@dataclass
class Decomposition:
    base: torch.Tensor  # what the frozen base computes [out, in] fp32: Ŵ, or deq(Q(Ŵ)) with quant; 0 where pruned
    factors: ResidualFactors  # B [out, r], A [r, in] fp32
    row: dict[str, Any]  # report row (without the layer name)
    stored: QBitmapBase | None = None  # the quantized base (quant != "none"), else None: `base` is stored dense


def prune(
    target: torch.Tensor, config: SALRConfig, stats: LayerStats | None, threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ŵ [out, in] fp32, mask [out, in] bool, True where kept) for `target` [out, in]: the masked target
    (magnitude, wanda) or SparseGPT's updated one. Sparsity 0 (LoRA / QLoRA bases) keeps every weight whatever the
    criterion, without statistics (SALRConfig.needs_calibration says none are collected then)."""
    if config.criterion == "magnitude" or config.sparsity == 0:
        mask = magnitude_mask(target, config.sparsity, config.pattern, config.granularity, threshold)
        return target * mask, mask
    if stats is None:
        raise SALRError(f"criterion {config.criterion!r} needs calibration statistics for every target layer")
    if config.criterion == "wanda":
        mask = wanda_mask(target, stats.gram, config.sparsity, config.pattern, config.granularity)
        return target * mask, mask
    inverse_upper = stats.factor("inverse_upper", config.damping)
    return sparsegpt(target, None, config.sparsity, config.pattern, config.granularity, inverse_upper=inverse_upper)


def fit_residual(
    error: torch.Tensor, config: SALRConfig, stats: LayerStats | None, previous: ResidualFactors | None = None
) -> ResidualFactors:
    """Rank-`residual_rank` B A for E [out, in]: plain SVD, or whitened by the input Gram when one is given;
    `previous`, the fit of the round before, warm-starts the whitened randomized SVD."""
    if config.residual_init == "svd" or stats is None:
        return residual_svd(error, config.residual_rank, config.svd_method, seed=config.seed)
    return whitened_svd(
        error, None, config.residual_rank, method=config.svd_method, seed=config.seed,
        cholesky=stats.factor("cholesky", config.damping), start=previous.basis if previous else None,
    )  # fmt: skip


def decompose(
    weight: torch.Tensor, config: SALRConfig, stats: LayerStats | None = None, threshold: float | None = None
) -> Decomposition:
    """Split W0 into a frozen sparse base and residual factors following `config` (see the module docstring).

    `stats` holds the layer's calibration Gram (needed by wanda / sparsegpt / whitened / alternating); `threshold`
    is the global magnitude threshold for granularity "global".
    """
    return decompose_group([weight], config, stats, threshold)[0]


def _prunes_rows_independently(config: SALRConfig) -> bool:
    """Whether SparseGPT's result for a row depends on that row alone (per-row or N:M masks): then weights that
    share an input Gram (q/k/v, gate/up) can be pruned in one call on their concatenation, exactly as one by one
    but with one column sweep instead of several (the sweep is a Python loop over input columns)."""
    return config.criterion == "sparsegpt" and config.sparsity > 0 and (config.nm or config.granularity == "row")


def _prune_all(
    targets: list[torch.Tensor], config: SALRConfig, stats: LayerStats | None, threshold: float | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`prune` of each target; in one call on their concatenation when rows are pruned independently."""
    if len(targets) == 1 or not _prunes_rows_independently(config):
        return [prune(t, config, stats, threshold) for t in targets]
    pruned, mask = prune(torch.cat(targets), config, stats, threshold)
    sizes = [t.shape[0] for t in targets]
    return list(zip(pruned.split(sizes), mask.split(sizes), strict=True))


def decompose_group(
    weights: list[torch.Tensor], config: SALRConfig, stats: LayerStats | None = None, threshold: float | None = None
) -> list[Decomposition]:
    """`decompose` of several weights [out_i, in] that share one input (and so one `stats`), such as a block's
    q/k/v or gate/up projections; the same result as one by one, faster with SparseGPT (see `_prune_all`)."""
    w0s = [w.detach().float() for w in weights]
    rounds = config.alternating_rounds if config.residual_init == "alternating" and config.residual_rank else 1
    low_ranks = previous = [torch.zeros_like(w0) for w0 in w0s]
    momentum = config.alternating_momentum
    fits: list[ResidualFactors | None] = [None] * len(w0s)  # each round's fit warm-starts the next one's SVD
    for _ in range(rounds):  # round 1 prunes W0 itself: low_ranks and previous are still zero
        targets = [w0 - lr - momentum * (lr - prev) for w0, lr, prev in zip(w0s, low_ranks, previous, strict=True)]
        prunes = _prune_all(targets, config, stats, threshold)
        quantized = quantize_bases(prunes, config, [w.dtype for w in weights], stats)  # base = Ŵ, or deq(Q(Ŵ))
        fits = [
            fit_residual(w0 - base, config, stats, last)
            for w0, (_, base), last in zip(w0s, quantized, fits, strict=True)
        ]
        previous, low_ranks = low_ranks, [factors.B @ factors.A for factors in fits]
    splits = []
    for w0, (pruned, mask), (stored, base), factors in zip(w0s, prunes, quantized, fits, strict=True):
        row = _report_row(w0, base, mask, factors, config, stats)
        row.update(error_energies(w0, pruned, base))
        splits.append(Decomposition(base, factors, row, stored))
    return splits


def _report_row(
    w0: torch.Tensor,
    base: torch.Tensor,
    mask: torch.Tensor,
    factors: ResidualFactors,
    config: SALRConfig,
    stats: LayerStats | None,
) -> dict[str, Any]:
    out_dim, in_dim = w0.shape
    rank = config.residual_rank
    exact = config.residual_init == "svd" and factors.singular_values.numel() == min(out_dim, in_dim)
    row = {
        "shape": [out_dim, in_dim],
        "sparsity": 1.0 - float(mask.float().mean()),
        "residual_energy_after_svd": factors.tail_energy,
        "svd_tail_energy": float(factors.singular_values[rank:].pow(2).sum()) if exact else None,
        "theorem3_bound": (1.0 - rank / min(out_dim, in_dim)) * factors.error_energy,
        "output_error_before_residual": None,
        "output_error_after_residual": None,
    }
    if stats is not None:  # ‖(W0 − Ŵ [− B A]) X‖ / ‖W0 X‖ on the calibration activations
        before, after = output_errors(w0, base, factors.B, factors.A, stats.gram)
        row["output_error_before_residual"], row["output_error_after_residual"] = before, after
    return row

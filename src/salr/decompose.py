"""One weight W0 [out, in] -> frozen sparse base Ŵ + residual factors B A (+ the report row): the per-layer core of
`convert`, combining the masks of salr.pruning and the fits of salr.residual as SALRConfig says.

- criterion "magnitude" + residual_init "svd" is the paper: Ŵ = M ⊙ W0 with M from |W0|, B A = SVD_r(W0 − Ŵ);
- "wanda" / "sparsegpt" choose M from the input Gram H of the layer (SparseGPT also updates the kept weights);
- "whitened" fits B A to the output error ‖(W0 − Ŵ − B A) X‖ instead of the weight error;
- "alternating" repeats: Ŵ = prune(W0 − B A), B A = fit(W0 − Ŵ), starting from B A = 0 (OATS-style).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from salr.calibration import LayerStats, relative_output_error
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.pruning import magnitude_mask, sparsegpt, wanda_mask
from salr.residual import ResidualFactors, residual_svd, whitened_svd


@dataclass
class Decomposition:
    base: torch.Tensor  # Ŵ [out, in] fp32, zeros at pruned positions
    factors: ResidualFactors  # B [out, r], A [r, in] fp32
    row: dict[str, Any]  # report row (without the layer name)


def prune(
    target: torch.Tensor, config: SALRConfig, stats: LayerStats | None, threshold: float | None = None
) -> torch.Tensor:
    """Ŵ [out, in] fp32 for `target` [out, in]: the masked target (magnitude, wanda) or SparseGPT's updated one."""
    if config.criterion == "magnitude":
        return target * magnitude_mask(target, config.sparsity, config.pattern, config.granularity, threshold)
    if stats is None:
        raise SALRError(f"criterion {config.criterion!r} needs calibration statistics for every target layer")
    if config.criterion == "wanda":
        return target * wanda_mask(target, stats.gram, config.sparsity, config.pattern, config.granularity)
    inverse_upper = stats.factor("inverse_upper", config.damping)
    pruned, _ = sparsegpt(
        target, None, config.sparsity, config.pattern, config.granularity, inverse_upper=inverse_upper
    )
    return pruned


def fit_residual(error: torch.Tensor, config: SALRConfig, stats: LayerStats | None) -> ResidualFactors:
    """Rank-`residual_rank` B A for E [out, in]: plain SVD, or whitened by the input Gram when one is given."""
    if config.residual_init == "svd" or stats is None:
        return residual_svd(error, config.residual_rank, config.svd_method, seed=config.seed)
    return whitened_svd(
        error, None, config.residual_rank, method=config.svd_method, seed=config.seed,
        cholesky=stats.factor("cholesky", config.damping),
    )  # fmt: skip


def decompose(
    weight: torch.Tensor, config: SALRConfig, stats: LayerStats | None = None, threshold: float | None = None
) -> Decomposition:
    """Split W0 into a frozen sparse base and residual factors following `config` (see the module docstring).

    `stats` holds the layer's calibration Gram (needed by wanda / sparsegpt / whitened / alternating); `threshold`
    is the global magnitude threshold for granularity "global".
    """
    w0 = weight.detach().float()
    rounds = config.alternating_rounds if config.residual_init == "alternating" and config.residual_rank else 1
    low_rank = torch.zeros_like(w0)
    for _ in range(rounds):
        base = prune(w0 - low_rank, config, stats, threshold)
        factors = fit_residual(w0 - base, config, stats)
        low_rank = factors.B @ factors.A
    return Decomposition(base, factors, _report_row(w0, base, factors, config, stats))


def _report_row(
    w0: torch.Tensor, base: torch.Tensor, factors: ResidualFactors, config: SALRConfig, stats: LayerStats | None
) -> dict[str, Any]:
    out_dim, in_dim = w0.shape
    rank = config.residual_rank
    exact = config.residual_init == "svd" and factors.singular_values.numel() == min(out_dim, in_dim)
    row = {
        "shape": [out_dim, in_dim],
        "sparsity": 1.0 - float((base != 0).float().mean()),
        "pruned_energy": factors.error_energy,
        "residual_energy_after_svd": factors.tail_energy,
        "svd_tail_energy": float(factors.singular_values[rank:].pow(2).sum()) if exact else None,
        "theorem3_bound": (1.0 - rank / min(out_dim, in_dim)) * factors.error_energy,
        "output_error_before_residual": None,
        "output_error_after_residual": None,
    }
    if stats is not None:  # ‖(W0 − Ŵ [− B A]) X‖ / ‖W0 X‖ on the calibration activations
        row["output_error_before_residual"] = relative_output_error(w0, base, stats.gram)
        row["output_error_after_residual"] = relative_output_error(w0, base + factors.B @ factors.A, stats.gram)
    return row

"""QSALR: the quantized frozen base of one layer and its error report.

With `SALRConfig(quant="nf4" | "int8")` the kept values of the pruned weight Ŵ (M ⊙ W0, or SparseGPT's updated kept
weights) are quantized blockwise (salr.bitmap_format) and the residual is fitted to what the quantized base misses,

    E = W0 - deq(Q(Ŵ)) = (W0 - Ŵ) + (Ŵ - deq(Q(Ŵ))),

so its rank-r fit (plain or whitened SVD, salr.decompose) is the best rank-r correction of pruning *and*
quantization error (LoftQ's idea applied to SALR). For a masking criterion (magnitude, wanda) the two parts live on
disjoint entries (pruned vs kept), so their energies add up exactly to ‖E‖²; SparseGPT also changes the kept
entries, so there the parts overlap and the sum is only approximately ‖E‖².
"""

from __future__ import annotations

from typing import Any

import torch

from salr.bases.qbitmap import QBitmapBase
from salr.bitmap_format import QUANT_BLOCKSIZE
from salr.config import SALRConfig


def quantize_base(
    pruned: torch.Tensor, mask: torch.Tensor, config: SALRConfig, dtype: torch.dtype
) -> tuple[QBitmapBase | None, torch.Tensor]:
    """(stored quantized base or None, the fp32 weight the frozen base computes with) for one pruned weight.

    pruned: fp32 [out, in], zeros outside `mask`; mask: bool [out, in], True where kept; dtype: the model's weight
    dtype. Without quantization there is nothing to store here (the caller keeps `pruned` as a dense base) and the
    weight is `pruned`; with it, a QBitmapBase holding the quantized kept values (of `pruned` in `dtype`, widened
    exactly to fp32, as bitsandbytes quantizes) and the weight is its exact fp32 dequantization.
    """
    if config.quant == "none":
        return None, pruned
    base = QBitmapBase.from_dense(
        pruned.to(dtype), mask, kind=config.quant, blocksize=QUANT_BLOCKSIZE, double_quant=config.quant_double
    )
    return base, base.dequantize().to(pruned.device)


def error_energies(w0: torch.Tensor, pruned: torch.Tensor, kept: torch.Tensor) -> dict[str, float]:
    """Squared Frobenius norms (fp32 [out, in] inputs): `pruned_energy` ‖W0 - Ŵ‖² (pruning), `quantization_energy`
    ‖Ŵ - kept‖² (0 without quantization) and `error_energy` ‖W0 - kept‖², what the residual fit starts from."""
    return {
        "pruned_energy": float((w0 - pruned).pow(2).sum()),
        "quantization_energy": float((pruned - kept).pow(2).sum()),
        "error_energy": float((w0 - kept).pow(2).sum()),
    }


def quant_totals(rows: list[dict[str, Any]], config: SALRConfig) -> dict[str, Any]:
    """The report's quantization totals: the method and the summed quantization error energy."""
    return {
        "quant": config.quant,
        "quant_double": config.quant_double,
        "quantization_energy": sum(r.get("quantization_energy", 0.0) for r in rows),
    }

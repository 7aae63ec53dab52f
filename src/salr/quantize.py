"""QSALR: the quantized frozen base of one layer and its error report.

With `SALRConfig(quant="nf4" | "int8")` the kept values of M ⊙ W0 are quantized blockwise (salr.bitmap_format) and the
residual is fitted to what the quantized base misses,

    E = W0 - deq(Q(M ⊙ W0)) = (W0 - M ⊙ W0) + (M ⊙ W0 - deq(Q(M ⊙ W0))),

so its rank-r SVD is the best rank-r correction of pruning *and* quantization error (LoftQ's idea applied to SALR).
The two parts live on disjoint entries (pruned vs kept), so their energies add up exactly to ‖E‖².
"""

from __future__ import annotations

from typing import Any

import torch

from salr.bases.qbitmap import QBitmapBase
from salr.bitmap_format import QUANT_BLOCKSIZE
from salr.config import SALRConfig


def quantize_roundtrip(
    w0: torch.Tensor, mask: torch.Tensor, config: SALRConfig, dtype: torch.dtype
) -> tuple[QBitmapBase | torch.Tensor, torch.Tensor]:
    """(frozen base, the fp32 weight it computes with) for one pruned weight.

    w0: fp32 [out, in]; mask: bool [out, in], True where kept; dtype: the model's weight dtype. Without quantization
    the base is the dense M ⊙ W0 in `dtype`; with it, a QBitmapBase holding the quantized kept values (of W0 in
    `dtype`, widened exactly to fp32, as bitsandbytes quantizes) and the weight is its exact fp32 dequantization.
    """
    sparse = w0 * mask
    if config.quant == "none":
        return sparse.to(dtype), sparse
    base = QBitmapBase.from_dense(
        sparse.to(dtype), mask, kind=config.quant, blocksize=QUANT_BLOCKSIZE, double_quant=config.quant_double
    )
    return base, base.dequantize()


def error_energies(w0: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor) -> dict[str, float]:
    """Squared Frobenius norms (fp32 [out, in] inputs): `pruned_energy` ‖W0 - M ⊙ W0‖², `quantization_energy`
    ‖M ⊙ W0 - kept‖² (0 without quantization) and `error_energy` ‖W0 - kept‖², what the residual SVD starts from."""
    pruned = float((w0 * ~mask).pow(2).sum())
    quant = float((w0 * mask - kept).pow(2).sum())
    return {"pruned_energy": pruned, "quantization_energy": quant, "error_energy": float((w0 - kept).pow(2).sum())}


def quant_totals(rows: list[dict[str, Any]], config: SALRConfig) -> dict[str, Any]:
    """The report's quantization totals: the method and the summed quantization error energy."""
    return {
        "quant": config.quant,
        "quant_double": config.quant_double,
        "quantization_energy": sum(r.get("quantization_energy", 0.0) for r in rows),
    }

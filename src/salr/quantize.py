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

from dataclasses import replace
from typing import Any

import torch

from salr.bases.qbitmap import QBitmapBase
from salr.bitmap_format import (
    QBitmapWeight,
    encode_quantized,
    pack_codes,
    round_to_scales,
    search_scales,
)
from salr.calibration import LayerStats
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.pruning import sparsegpt


def quantize_bases(
    prunes: list[tuple[torch.Tensor, torch.Tensor]],
    config: SALRConfig,
    dtypes: list[torch.dtype],
    stats: LayerStats | None = None,
) -> list[tuple[QBitmapBase | None, torch.Tensor]]:
    """(stored quantized base or None, the fp32 weight the frozen base computes with) for each (pruned, mask).

    pruned: fp32 [out, in], zeros outside `mask`; mask: bool [out, in], True where kept; dtypes: each weight's own
    dtype. Without quantization there is nothing to store here (the caller keeps `pruned` as a dense base) and the
    weight is `pruned`. With it, a QBitmapBase of the kept values (of `pruned` in its dtype, widened exactly to
    fp32, as bitsandbytes quantizes) and its exact fp32 dequantization. Block scales are each block's absmax (QLoRA)
    or, with `scale_rule` "search", the clipped scales of least rounding error. Rounding "nearest" is QLoRA's;
    "gptq" keeps those block scales but rounds one input column at a time, spreading each rounding error
    over the columns not yet rounded through the inverse input Gram (GPTQ; SparseGPT's sweep with the mask fixed),
    so the base's *output* error on the calibration activations is what is kept small. The weights of a group
    share `stats` (q/k/v, gate/up); with fixed masks and scales GPTQ's rows are independent, so one sweep over
    their concatenation rounds them all.
    """
    if config.quant == "none":
        return [(None, pruned) for pruned, _ in prunes]
    encoded = []
    for (pruned, mask), dtype in zip(prunes, dtypes, strict=True):
        weight = pruned.to(dtype)
        scales = (
            _searched_scales(weight, mask, config.quant, config.quant_blocksize, stats)
            if config.scale_rule == "search"
            else None
        )
        encoded.append(
            encode_quantized(weight, mask, config.quant, config.quant_blocksize, config.quant_double, scales)
        )
    if config.rounding == "gptq":
        if stats is None:
            raise SALRError("quant_rounding 'gptq' needs calibration statistics: pass calibration, or use 'nearest'")
        encoded = _gptq_round(prunes, encoded, dtypes, stats.factor("inverse_upper", config.damping))
    bases = [QBitmapBase(qw) for qw in encoded]
    return [(base, base.dequantize().to(pruned.device)) for base, (pruned, _) in zip(bases, prunes, strict=True)]


def _searched_scales(
    weight: torch.Tensor, mask: torch.Tensor, kind: str, blocksize: int, stats: LayerStats | None
) -> torch.Tensor:
    """Block scales from `search_scales` over the kept values (row-major), each value's error weighted by its
    input column's energy, diag H / tokens, when calibration statistics exist (the output error a layer of
    uncorrelated inputs would see; GPTQ rounding then handles the correlations)."""
    values = weight[mask].float()
    if stats is None:
        return search_scales(values, kind, blocksize)
    energy = torch.diagonal(stats.gram).float().to(weight.device)
    return search_scales(values, kind, blocksize, weights=energy.expand_as(weight)[mask])


def _gptq_round(
    prunes: list[tuple[torch.Tensor, torch.Tensor]],
    encoded: list[QBitmapWeight],
    dtypes: list[torch.dtype],
    inverse_upper: torch.Tensor,
) -> list[QBitmapWeight]:
    """`encoded` with the codes re-chosen by GPTQ's sweep (see quantize_bases); bitmap and scales unchanged."""
    kind = encoded[0].q.kind
    scale_maps = [  # each kept weight's block scale, at its position; 0 where pruned
        torch.zeros_like(pruned).masked_scatter_(mask, qw.q.scales().repeat_interleave(qw.q.blocksize)[: qw.nnz])
        for (pruned, mask), qw in zip(prunes, encoded, strict=True)
    ]
    column_scales = torch.cat(scale_maps).t().contiguous()  # [in, sum of out]: one contiguous row per input column
    weight = torch.cat([pruned.to(dtype).float() for (pruned, _), dtype in zip(prunes, dtypes, strict=True)])
    rounded, _ = sparsegpt(
        weight, None, 0.0, keep_mask=torch.cat([mask for _, mask in prunes]), inverse_upper=inverse_upper,
        round_kept=lambda j, column: round_to_scales(column, column_scales[j], kind)[1],
    )  # fmt: skip
    result = []
    sizes = [pruned.shape[0] for pruned, _ in prunes]
    for part, (_, mask), scales, qw in zip(rounded.split(sizes), prunes, scale_maps, encoded, strict=True):
        codes, _ = round_to_scales(part[mask], scales[mask], kind)  # the sweep's own codes: its values are on grid
        result.append(replace(qw, q=replace(qw.q, codes=pack_codes(codes, kind))))
    return result


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
        "quant_blocksize": config.quant_blocksize,
        "quant_rounding": config.rounding,
        "quant_scales": config.scale_rule,
        "quantization_energy": sum(r.get("quantization_energy", 0.0) for r in rows),
    }

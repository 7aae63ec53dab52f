"""Static magnitude masks for frozen base weights: unstructured (per layer, per row, global) and N:M.

A mask is True where the weight is kept. Masks are computed once from W0 and never change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from salr.config import parse_nm
from salr.errors import SALRError


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise SALRError(f"sparsity must be in [0, 1), got {sparsity}")


def _keep_largest(scores: torch.Tensor, n_keep: int, dim: int) -> torch.Tensor:
    """Boolean mask keeping exactly `n_keep` largest entries along `dim` (ties broken by position)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_keep > 0:
        idx = torch.topk(scores, n_keep, dim=dim, sorted=False).indices
        mask.scatter_(dim, idx, True)
    return mask


def unstructured_mask(weight: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep the round((1 - sparsity) * n) largest |w| of the layer (or of each output row)."""
    check_sparsity(sparsity)
    scores = weight.detach().abs().float()
    if per_row:
        n_keep = round((1.0 - sparsity) * scores.shape[-1])
        return _keep_largest(scores, n_keep, dim=-1)
    n_keep = round((1.0 - sparsity) * scores.numel())
    return _keep_largest(scores.reshape(-1), n_keep, dim=0).reshape(scores.shape)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` largest |w| in every group of `m` consecutive weights along the input (last) dim."""
    if weight.shape[-1] % m:
        raise SALRError(
            f"N:M pattern {n}:{m} needs the input dimension divisible by {m}, but this weight has shape "
            f"{tuple(weight.shape)}: exclude the layer (exclude_modules) or use unstructured pruning"
        )
    scores = weight.detach().abs().float().reshape(*weight.shape[:-1], weight.shape[-1] // m, m)
    return _keep_largest(scores, n, dim=-1).reshape(weight.shape)


def global_threshold(weights: Iterable[torch.Tensor], sparsity: float, iters: int = 64) -> float:
    """Magnitude t such that a fraction `sparsity` of all entries across `weights` has |w| <= t.

    Bisection on counts keeps memory at one layer at a time (no concatenation of a whole model).
    """
    check_sparsity(sparsity)
    weights = list(weights)
    total = sum(w.numel() for w in weights)
    target = sparsity * total
    if target < 0.5:
        return -1.0  # keep everything (|w| > -1 always)
    lo, hi = 0.0, max(float(w.detach().abs().max()) for w in weights)
    for _ in range(iters):
        mid = (lo + hi) / 2
        count = sum(int((w.detach().abs().float() <= mid).sum()) for w in weights)
        if count < target:
            lo = mid
        else:
            hi = mid
    return hi


def magnitude_mask(
    weight: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    granularity: str = "layer",
    threshold: float | None = None,
) -> torch.Tensor:
    """Mask for one weight [out, in] (or [experts, out, in]: each expert is pruned on its own).

    `granularity='global'` needs the `threshold` from `global_threshold` over all target layers.
    """
    nm = parse_nm(pattern)
    if weight.dim() == 3 and nm is None and granularity != "global":
        return torch.stack([magnitude_mask(w, sparsity, pattern, granularity) for w in weight])
    if nm is not None:
        return nm_mask(weight, *nm)
    if granularity == "global":
        if threshold is None:
            raise SALRError("global pruning needs a threshold: compute it with global_threshold() over all layers")
        return weight.detach().abs().float() > threshold
    if granularity not in ("layer", "row"):
        raise SALRError(f"granularity must be 'layer', 'row' or 'global', got {granularity!r}")
    return unstructured_mask(weight, sparsity, per_row=granularity == "row")

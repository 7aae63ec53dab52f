"""The calibration passes of one LoSA round, block by block with bounded memory (salr.calibration):

- `block_features`: the representation entering every block (for the RMI Grams) and, once, the dense model's block
  outputs (the reference for the reconstruction error);
- `prune_blocks`: one-shot Wanda or SparseGPT of every LoSA layer at its block's ratio, on the merged weights, with
  the inputs propagated through the already pruned blocks; the reconstruction error of each block against the
  dense reference.

Masks only grow: a weight pruned in an earlier round scores below every kept one, so it is pruned again. With an
N:M pattern every round stays N:M-compatible: only the M-N lowest-scoring weights of each group are candidates,
and the round prunes the lowest-scoring candidates of each row; the last round prunes all of them (exact N:M).
"""

from __future__ import annotations

import torch
from torch import nn

from salr.bases import DenseBase
from salr.calibration import BlockwiseCalibration, LayerStats, iterate_blocks
from salr.config import parse_nm
from salr.errors import SALRError
from salr.losa.allocate import reconstruction_error, sample_gram
from salr.losa.layer import LoSALinear, losa_layers
from salr.pruning import input_norms, sparsegpt

REFERENCE_DTYPE = torch.float16  # dense block outputs are kept for the whole run: half the memory of fp32


def _already_pruned_lowest(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.where(weight == 0, torch.full_like(scores, -1.0), scores)


def wanda_scores(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖x_j‖ (fp32 [out, in]); weights that are already 0 score -1, below any kept weight."""
    return _already_pruned_lowest(weight.abs().float() * input_norms(gram)[None, :], weight)


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask pruning the round(sparsity · in) lowest scores of every row."""
    n_prune = round(sparsity * scores.shape[-1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        keep.scatter_(-1, torch.topk(scores, n_prune, dim=-1, largest=False).indices, False)
    return keep


def progressive_nm_mask(scores: torch.Tensor, n: int, m: int, sparsity: float) -> torch.Tensor:
    """Keep mask with round(sparsity · in) pruned weights per row (sparsity <= 1 - n/m), chosen among the m - n
    lowest scores of every group of m consecutive inputs: N:M-compatible at any sparsity, exact N:M at 1 - n/m."""
    out_dim, in_dim = scores.shape
    if in_dim % m:
        raise SALRError(f"N:M pattern {n}:{m} needs the input dimension divisible by {m}, got {in_dim}")
    grouped = scores.reshape(out_dim, in_dim // m, m)
    candidate = torch.zeros_like(grouped, dtype=torch.bool)
    candidate.scatter_(-1, torch.topk(grouped, m - n, dim=-1, largest=False).indices, True)
    candidate = candidate.reshape(out_dim, in_dim)
    n_prune = min(round(sparsity * in_dim), in_dim // m * (m - n))
    ranked = torch.where(candidate, scores, torch.full_like(scores, float("inf")))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        keep.scatter_(-1, torch.topk(ranked, n_prune, dim=-1, largest=False).indices, False)
    return keep


def prune_weight(
    weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: str, method: str, damping: float = 0.01
) -> torch.Tensor:
    """The pruned weight (fp32 [out, in]) of one merged LoSA weight at `sparsity` (for N:M: at most 1 - N/M).

    Wanda zeroes the lowest |W|·‖x‖ per row (or per the N:M rule above). SparseGPT chooses its mask per row and
    column block (unstructured), per group (exact N:M) or by the N:M rule above on its saliency w² / [U]_jj², and
    updates the kept weights to absorb the error."""
    nm = parse_nm(pattern)
    if method == "wanda":
        scores = wanda_scores(weight, stats.gram)
        keep = row_keep_mask(scores, sparsity) if nm is None else progressive_nm_mask(scores, *nm, sparsity)
        return weight.float() * keep
    if method != "sparsegpt":
        raise SALRError(f"LoSA prunes with 'wanda' or 'sparsegpt', got {method!r}")
    upper = stats.factor("inverse_upper", damping)
    if nm is None:
        return sparsegpt(weight, None, sparsity, "unstructured", "row", inverse_upper=upper)[0]
    if sparsity >= 1.0 - nm[0] / nm[1] - 1e-9:
        return sparsegpt(weight, None, 1.0 - nm[0] / nm[1], pattern, inverse_upper=upper)[0]
    saliency = weight.float() ** 2 / torch.diagonal(upper).float()[None, :] ** 2
    keep = progressive_nm_mask(_already_pruned_lowest(saliency, weight), *nm, sparsity)
    return sparsegpt(weight, None, sparsity, "unstructured", inverse_upper=upper, keep_mask=keep)[0]


def _block_layers(model: nn.Module) -> list[tuple[str, nn.Module, dict[str, LoSALinear]]]:
    """(name, block, {name relative to the block: LoSA layer}) for every transformer block."""
    layers = losa_layers(model)
    blocks = list(iterate_blocks(model))
    outside = [n for n, _ in layers if not any(n.startswith(b + ".") for b, _ in blocks)]
    if outside:
        raise SALRError(f"{outside[:3]} are outside the transformer blocks: LoSA prunes block by block, exclude them")
    return [(b, block, {n[len(b) + 1 :]: m for n, m in layers if n.startswith(b + ".")}) for b, block in blocks]


@torch.no_grad()
def block_features(
    model: nn.Module, ids: torch.Tensor, rmi_samples: int, keep_outputs: bool, batch_size: int = 8
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]] | None]:
    """(per block, the sample Gram [n, n] of the hidden states entering it over the first `rmi_samples` windows;
    per block, its outputs on all windows if `keep_outputs`). The inputs, not the outputs, as the reference code
    (block 0's representation is the embedding output)."""
    calib = BlockwiseCalibration(model, ids, batch_size)
    calib.capture_inputs()
    grams, outputs = [], []
    for _, block in iterate_blocks(model):
        grams.append(sample_gram(torch.cat(calib.hidden)[:rmi_samples]))
        calib.hidden = calib.run_block(block)
        if keep_outputs:
            outputs.append([h.to(REFERENCE_DTYPE) for h in calib.hidden])
    return grams, outputs if keep_outputs else None


@torch.no_grad()
def prune_blocks(
    model: nn.Module,
    ids: torch.Tensor,
    ratios: list[float],
    pattern: str,
    method: str,
    dense_outputs: list[list[torch.Tensor]],
    damping: float = 0.01,
    batch_size: int = 8,
) -> list[float]:
    """Prune the merged base of every LoSA layer of block i at ratios[i] (layers must be merged), block after block
    on the pruned model's own activations; returns each block's reconstruction error against `dense_outputs`."""
    calib = BlockwiseCalibration(model, ids, batch_size)
    calib.capture_inputs()
    errors = []
    for i, (_, block, layers) in enumerate(_block_layers(model)):
        if layers:
            if not all(layer.merged for layer in layers.values()):
                raise SALRError("prune_blocks needs merged LoSA layers: call merge() on each first")
            stats, _ = calib.statistics(block, list(layers))  # the outputs are of the unpruned block: unused
            for local, layer in layers.items():
                pruned = prune_weight(layer.base.to_dense(), stats[local], ratios[i], pattern, method, damping)
                layer.base = DenseBase(pruned.to(layer.base.dtype))
            del stats
        calib.hidden = calib.run_block(block)
        errors.append(reconstruction_error(dense_outputs[i], calib.hidden))
    return errors


def block_of_layers(model: nn.Module) -> list[list[LoSALinear]]:
    """The LoSA layers of each block, in block order (a block's LoRA rank is shared by all its layers)."""
    return [list(layers.values()) for _, _, layers in _block_layers(model)]

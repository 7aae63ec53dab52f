"""LoSA's two allocations, as pure functions of small tensors:

- per-block sparsity from Representation Mutual Information (RMI): linear CKA between the blocks' representations
  (`rmi_matrix`), summed into a redundancy per block, turned into an importance (`block_importance`) and solved as
  the linear program min Σ x_i imp_i, mean(x) = s, |x_i - s| <= δ (`block_sparsities`): redundant blocks are pruned
  more;
- per-block LoRA rank from the reconstruction error after pruning (`reconstruction_error`, `allocate_ranks`): more
  error, more rank, under a fixed total.
"""

from __future__ import annotations

import math

import torch

from salr.errors import SALRError


def sample_gram(features: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram K = X Xᵀ (fp64 [n, n]) of one representation, features [n, ...] flattened per sample."""
    x = features.reshape(features.shape[0], -1).double()
    return x @ x.T


def centered(gram: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11ᵀ/n (the biased HSIC centring), symmetrised first."""
    k = (gram.double() + gram.double().T) / 2
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def linear_cka(gram_a: torch.Tensor, gram_b: torch.Tensor) -> float:
    """Linear CKA (normalised HSIC) of two representations of the same n samples, from their Grams: ⟨K̃a, K̃b⟩ /
    (‖K̃a‖ ‖K̃b‖). 1 for identical representations; invariant to orthogonal maps and isotropic scaling; 0 when one
    of them is constant across samples."""
    a, b = centered(gram_a), centered(gram_b)
    norm = float(a.norm() * b.norm())
    return float((a * b).sum()) / norm if norm > 0 else 0.0


def rmi_matrix(grams: list[torch.Tensor]) -> torch.Tensor:
    """Symmetric [L, L] matrix of linear CKA between every pair of blocks' representations (diagonal 1)."""
    n = len(grams)
    centred = [centered(g) for g in grams]
    norms = [float(c.norm()) for c in centred]
    out = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            denom = norms[i] * norms[j]
            out[i, j] = out[j, i] = float((centred[i] * centred[j]).sum()) / denom if denom > 0 else 0.0
    return out


def block_importance(rmi: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """imp_i = exp(-β ĉ_i), ĉ_i = c_i / Σ c, c_i = Σ_{j≠i} RMI(i, j): a block similar to the others (redundant)
    is less important. Only the order matters to `block_sparsities`, so β (1 for Wanda, 100 for SparseGPT in the
    reference code) changes nothing there."""
    c = rmi.sum(1) - torch.diagonal(rmi)
    total = float(c.sum())
    return torch.exp(-beta * (c / total if total > 0 else c))


def block_sparsities(importance: torch.Tensor, mean: float, delta: float) -> list[float]:
    """Solution of min Σ x_i imp_i subject to mean(x) = `mean` and max(0, mean-δ) <= x_i <= min(1, mean+δ).

    A linear program whose optimum is a vertex, found greedily: every block starts at the lower bound and the
    least important blocks are raised to the upper bound, one after the other, until the mean is met (one block
    may end in between). Ties are broken by block index. Same optimum as the reference code's SLSQP call, without
    its stopping noise."""
    n = importance.numel()
    lo, hi = max(0.0, mean - delta), min(1.0, mean + delta)
    if not lo <= mean <= hi:
        raise SALRError(f"mean sparsity {mean} is outside [0, 1]")
    x = [lo] * n
    budget = (mean - lo) * n
    order = sorted(range(n), key=lambda i: (float(importance[i]), i))  # least important first
    for i in order:
        step = min(hi - lo, budget)
        x[i] += step
        budget -= step
        if budget <= 1e-15:
            break
    return x


def reconstruction_error(dense: list[torch.Tensor], sparse: list[torch.Tensor]) -> float:
    """LoSA's per-block error: the mean over hidden channels c of Σ (D - S)² / Σ D² over every token of every sample,
    D the dense model's block output and S the pruned model's (lists of [b, T, hidden] mini-batches)."""
    num = den = None
    for d, s in zip(dense, sparse, strict=True):
        d, s = d.double().reshape(-1, d.shape[-1]), s.double().reshape(-1, s.shape[-1])
        n_, d_ = ((d - s) ** 2).sum(0), (d**2).sum(0)
        num, den = (n_, d_) if num is None else (num + n_, den + d_)
    if num is None:
        raise SALRError("reconstruction_error needs at least one mini-batch")
    return float((num / den.clamp_min(1e-30)).mean())


def allocate_ranks(
    errors: list[float], budget: int, max_rank: int, min_rank: int = 1, exact: bool = True
) -> list[int]:
    """Integer rank per block, proportional to its error, clipped to [min_rank, max_rank], summing to `budget`.

    r_i = clip(round(e_i / Σe · budget)); then the excess (or shortfall) is removed one rank at a time from the
    lowest-error (added to the highest-error) blocks that can still move, passing over the blocks again until the
    total is the budget. `exact=False` stops after one pass, as the reference code does, so heavy clipping can
    leave the total short of the budget. The budget must lie in [n min_rank, n max_rank].
    """
    n = len(errors)
    if not n * min_rank <= budget <= n * max_rank:
        raise SALRError(f"rank budget {budget} is not reachable by {n} blocks of ranks {min_rank}..{max_rank}")
    total_error = math.fsum(errors)
    shares = [e / total_error * budget if total_error > 0 else budget / n for e in errors]
    ranks = [min(max_rank, max(min_rank, round(s))) for s in shares]
    by_error = sorted(range(n), key=lambda i: (errors[i], i))
    while sum(ranks) != budget:
        moved = False
        excess = sum(ranks) - budget
        for i in by_error if excess > 0 else reversed(by_error):
            if sum(ranks) == budget:
                break
            if excess > 0 and ranks[i] > min_rank:
                ranks[i] -= 1
                moved = True
            elif excess < 0 and ranks[i] < max_rank:
                ranks[i] += 1
                moved = True
        if not exact or not moved:
            break
    return ranks

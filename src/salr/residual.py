"""Residual adapter initialisation: a rank-r B A approximating the pruning error E = W0 - Ŵ.

- `residual_svd` (the paper): truncated SVD of E, B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, the best rank-r
  approximation of E in weight space (Eckart–Young). Computed in fp32.
- `whitened_svd`: the best rank-r correction of the layer's *output* error ‖(E − B A) X‖_F on calibration
  activations X (SVD-LLM / EoRA-style whitening): with H = X Xᵀ = C Cᵀ (Cholesky, damped), the SVD of E C gives
  B = U_r sqrt(S_r), A = sqrt(S_r) V_rᵀ C⁻¹. The factorization and the map back in fp64, E C and its SVD in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from salr.errors import SALRError
from salr.pruning import damped_cholesky

# From this many rows/cols up an exact SVD costs seconds per layer; randomized SVD is near-exact for small ranks.
RANDOMIZED_MIN_DIM = 2048


def auto_svd_method(shape: tuple[int, ...], rank: int) -> str:
    """The SVD "auto" picks for an [out, in] matrix: randomized when both sides are at least RANDOMIZED_MIN_DIM
    (a 1B-class model's 2048-wide layers included) and the rank is small, else exact."""
    small = min(shape)
    return "randomized" if small >= RANDOMIZED_MIN_DIM and rank * 4 < small else "exact"


@dataclass
class ResidualFactors:
    B: torch.Tensor  # [out, r] fp32
    A: torch.Tensor  # [r, in]  fp32
    singular_values: torch.Tensor  # the top-r singular values of E (all of them for the exact method)
    error_energy: float  # ||E||_F^2
    tail_energy: float  # ||E - B A||_F^2, measured
    # the randomized SVD's right basis [in, rank + oversampling] (whitened coordinates for whitened_svd), to start
    # the next fit of a nearby matrix from (alternating rounds); None for the exact SVD
    basis: torch.Tensor | None = None


WARM_NITER = 1  # power iterations of a randomized SVD started from a nearby matrix's basis (cold: 4)


def _svd(
    matrix: torch.Tensor, rank: int, method: str, seed: int, start: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of `matrix`, exact or randomized ("auto": randomized for large layers and small ranks).

    `start` [in, q]: a right basis to begin the randomized SVD's subspace iteration from instead of a random one
    (the previous round's, when the matrix has moved little): one power iteration then does what four do from
    random vectors."""
    small = min(matrix.shape)
    if method == "auto":
        method = auto_svd_method(tuple(matrix.shape), rank)
    if method == "exact":
        return torch.linalg.svd(matrix, full_matrices=False)
    if method != "randomized":
        raise SALRError(f"svd method must be 'exact', 'randomized' or 'auto', got {method!r}")
    if start is not None and start.shape == (matrix.shape[1], min(rank + 16, small)):
        return _subspace_svd(matrix, start.to(matrix.dtype), WARM_NITER)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    u, s, v = torch.svd_lowrank(matrix, q=min(rank + 16, small), niter=4)
    torch.random.set_rng_state(gen_state)
    return u, s, v.T


def _subspace_svd(
    matrix: torch.Tensor, start: torch.Tensor, niter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD (Halko et al., as torch.svd_lowrank) from the right basis `start` [in, q]: `niter` rounds of
    subspace iteration, then the exact SVD of the [q, in] projection. Returns U [out, q], S [q], Vh [q, in]."""
    basis = torch.linalg.qr(matrix @ start).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u, s, vh


def _check_rank(rank: int, shape: torch.Size) -> None:
    if rank < 0 or rank > min(shape):
        raise SALRError(
            f"residual rank {rank} is larger than the layer allows (min(out, in) = {min(shape)} for shape "
            f"{tuple(shape)}): choose a rank <= {min(shape)}"
        )


def residual_svd(error: torch.Tensor, rank: int, method: str = "auto", seed: int = 0) -> ResidualFactors:
    """Rank-`rank` factors of `error` [out, in]; `method` is 'exact', 'randomized' or 'auto'."""
    out_dim, in_dim = error.shape
    _check_rank(rank, error.shape)
    e = error.detach().float()
    energy = float(e.pow(2).sum())
    if rank == 0:
        empty = e.new_zeros
        return ResidualFactors(empty(out_dim, 0), empty(0, in_dim), empty(0), energy, energy)
    u, s, vh = _svd(e, rank, method, seed)
    root = s[:rank].sqrt()
    B = u[:, :rank] * root
    A = root[:, None] * vh[:rank]
    tail = float((e - B @ A).pow(2).sum())
    return ResidualFactors(B.contiguous(), A.contiguous(), s, energy, tail)


def whitened_svd(
    error: torch.Tensor,
    gram: torch.Tensor | None,
    rank: int,
    damping: float = 0.01,
    method: str = "auto",
    seed: int = 0,
    cholesky: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> ResidualFactors:
    """Rank-`rank` factors of `error` [out, in] minimising ‖(E − B A) X‖_F, given the input Gram H = X Xᵀ [in, in]
    (or its damped lower Cholesky factor `cholesky`, to reuse one). `method` as for `residual_svd`: the randomized
    SVD for large layers and small ranks. `singular_values` are those of E C (output space, the top ones only for
    the randomized SVD); `tail_energy` is still ‖E − B A‖²_F in weight space. `start`: the `basis` of a previous
    fit of a nearby E (alternating rounds) to warm-start the randomized SVD from.
    """
    out_dim, in_dim = error.shape
    _check_rank(rank, error.shape)
    e = error.detach().float()
    energy = float(e.pow(2).sum(dtype=torch.float64))
    if rank == 0:
        empty = error.new_zeros
        return ResidualFactors(empty(out_dim, 0).float(), empty(0, in_dim).float(), empty(0), energy, energy)
    chol = damped_cholesky(gram, damping) if cholesky is None else cholesky
    if method == "auto":  # E C has no exact-SVD tradition to keep: randomized whenever the rank is small
        method = "randomized" if rank * 4 < min(out_dim, in_dim) else "exact"
    # E C and its SVD in fp32 (3-5x faster): their rounding (~1e-7 relative) is far below the randomized SVD's own
    # approximation error. The Cholesky factor and the map back through it stay fp64: H is ill-conditioned.
    u, s, vh = _svd(e @ chol.float(), rank, method, seed, start)
    root = s[:rank].double().sqrt()
    B = u[:, :rank].double() * root
    # A C = sqrt(S) Vᵀ, i.e. Cᵀ Aᵀ = V sqrt(S): one triangular solve, no explicit inverse of C
    A = torch.linalg.solve_triangular(chol.T, vh[:rank].double().T * root, upper=True).T
    B, A = B.float().contiguous(), A.float().contiguous()
    tail = float((e - B @ A).pow(2).sum(dtype=torch.float64))  # of the fp32 factors that are stored
    basis = vh.T.contiguous() if method == "randomized" else None
    return ResidualFactors(B, A, s.float(), energy, tail, basis)

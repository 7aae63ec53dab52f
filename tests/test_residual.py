import pytest
import torch

from salr.errors import SALRError
from salr.pruning import magnitude_mask
from salr.residual import RANDOMIZED_MIN_DIM, auto_svd_method, residual_svd


def _error(shape, sparsity=0.5, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(shape)
    return w - w * magnitude_mask(w, sparsity)


@pytest.mark.parametrize("shape,rank", [((40, 60), 8), ((60, 40), 40), ((33, 17), 1), ((16, 16), 0)])
def test_exact_svd_factors_give_best_rank_r_approximation(shape, rank):
    e = _error(shape)
    f = residual_svd(e, rank, method="exact")
    assert f.B.shape == (shape[0], rank) and f.A.shape == (rank, shape[1])
    s = torch.linalg.svdvals(e.double())
    tail = float(s[rank:].pow(2).sum())
    assert f.tail_energy == pytest.approx(tail, rel=1e-4, abs=1e-6)
    # Theorem 3: the tail is at most (1 - r / min(d, k)) of the pruned energy.
    assert f.tail_energy <= (1 - rank / min(shape)) * f.error_energy + 1e-6 * f.error_energy
    # B = U sqrt(S), A = sqrt(S) V^T: both factors carry the same singular values.
    if rank:
        assert torch.allclose(f.B.norm(dim=0), f.A.norm(dim=1), rtol=1e-4)


def test_randomized_svd_is_close_to_exact_on_large_layer():
    e = _error((600, 300))
    exact = residual_svd(e, 16, method="exact")
    approx = residual_svd(e, 16, method="randomized")
    assert approx.tail_energy >= exact.tail_energy * (1 - 1e-5)  # cannot beat Eckart–Young
    assert approx.tail_energy <= exact.tail_energy * 1.02


def test_auto_svd_is_randomized_from_2048_wide_layers_up():
    # a 1B-class model's 2048x2048 projections must not take the exact SVD (minutes per model)
    assert auto_svd_method((RANDOMIZED_MIN_DIM, RANDOMIZED_MIN_DIM), 64) == "randomized"
    assert auto_svd_method((5632, 2048), 64) == "randomized"
    assert auto_svd_method((RANDOMIZED_MIN_DIM - 1, 4096), 64) == "exact"
    assert auto_svd_method((4096, 4096), 1024) == "exact"  # rank too large for a sketch to pay off


def test_half_precision_error_is_decomposed_in_fp32():
    e = _error((32, 48)).to(torch.bfloat16)
    f = residual_svd(e, 4)
    assert f.A.dtype == torch.float32 and f.B.dtype == torch.float32


def test_rank_larger_than_layer_is_a_clear_error():
    with pytest.raises(SALRError, match="residual rank 20 is larger"):
        residual_svd(torch.randn(10, 30), 20)


def _whitened_problem(seed=0, out_dim=120, in_dim=96, tokens=500):
    gen = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(tokens, in_dim, generator=gen)
        @ (torch.eye(in_dim) + 0.3 * torch.randn(in_dim, in_dim, generator=gen))
    ).double()
    return _error((out_dim, in_dim), seed=seed), x.T @ x


def test_warm_started_whitened_svd_matches_a_cold_one_on_a_nearby_error():
    # Alternating rounds fit a slowly moving E; each round's randomized SVD starts from the basis of the last one
    # (one power iteration instead of four from random vectors). Its output error must match a cold fit's.
    from salr.calibration import relative_output_error
    from salr.residual import whitened_svd

    error, gram = _whitened_problem()
    first = whitened_svd(error, gram, 12, method="randomized")
    assert first.basis is not None and first.basis.shape == (96, 12 + 16)
    moved = error + 0.05 * _error(error.shape, seed=1)
    cold = whitened_svd(moved, gram, 12, method="randomized")
    warm = whitened_svd(moved, gram, 12, method="randomized", start=first.basis)
    exact = whitened_svd(moved, gram, 12, method="exact")
    assert exact.basis is None
    errors = {
        k: relative_output_error(moved, f.B @ f.A, gram) for k, f in (("cold", cold), ("warm", warm), ("exact", exact))
    }
    assert errors["exact"] <= errors["warm"] * (1 + 1e-6)  # nothing beats the exact whitened fit
    assert errors["warm"] <= errors["exact"] * 1.01 and errors["warm"] <= errors["cold"] * 1.01
    # the warm start is really used: it differs from the cold (random) start bit for bit
    assert not torch.equal(warm.B, cold.B)
    # a basis of another width (another rank) is ignored: the cold start runs
    other = whitened_svd(moved, gram, 12, method="randomized", start=first.basis[:, :20])
    assert torch.equal(other.B, cold.B)

import pytest
import torch

from salr.config import SALRConfig
from salr.errors import SALRError
from salr.pruning import (
    damped_gram,
    damped_inverse_upper,
    global_threshold,
    magnitude_mask,
    nm_mask,
    unstructured_mask,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.99])
@pytest.mark.parametrize("shape", [(7, 13), (64, 96), (1, 5)])
def test_unstructured_layer_sparsity_is_exact_and_keeps_largest(sparsity, shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    mask = unstructured_mask(w, sparsity)
    assert int((~mask).sum()) == w.numel() - round((1 - sparsity) * w.numel())
    if mask.any() and (~mask).any():
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_per_row_mask_prunes_every_row_equally():
    torch.manual_seed(1)
    w = torch.randn(10, 40) * torch.arange(1, 11)[:, None]  # rows of very different scale
    mask = magnitude_mask(w, 0.25, granularity="row")
    assert (mask.sum(dim=1) == 30).all()
    layer_mask = magnitude_mask(w, 0.25)
    assert not (layer_mask.sum(dim=1) == 30).all()  # per-layer pruning hits the small rows harder


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_n_of_every_m(n, m):
    torch.manual_seed(2)
    w = torch.randn(6, 32)
    mask = nm_mask(w, n, m)
    groups = mask.reshape(6, 32 // m, m)
    assert (groups.sum(-1) == n).all()
    wg = w.abs().reshape(6, 32 // m, m)
    kept_min = torch.where(groups, wg, torch.inf).amin(-1)
    dropped_max = torch.where(~groups, wg, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_nm_on_indivisible_dimension_is_a_clear_error():
    with pytest.raises(SALRError, match="divisible by 4"):
        nm_mask(torch.randn(4, 10), 2, 4)


def test_global_threshold_hits_target_across_layers():
    torch.manual_seed(3)
    weights = [torch.randn(30, 40), 3 * torch.randn(50, 20), 0.1 * torch.randn(8, 8)]
    t = global_threshold(weights, 0.6)
    masks = [magnitude_mask(w, 0.6, granularity="global", threshold=t) for w in weights]
    kept = sum(int(m.sum()) for m in masks)
    total = sum(w.numel() for w in weights)
    assert abs(1 - kept / total - 0.6) < 1e-3
    assert masks[1].float().mean() > masks[2].float().mean()  # big-scale layer keeps more


def test_three_dimensional_weight_is_pruned_per_expert():
    torch.manual_seed(4)
    w = torch.randn(3, 8, 16) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]
    mask = magnitude_mask(w, 0.5)
    assert (mask.reshape(3, -1).sum(1) == 64).all()


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_bad_sparsity_is_a_clear_error(sparsity):
    with pytest.raises(SALRError, match=r"sparsity must be in \[0, 1\)"):
        SALRConfig(sparsity=sparsity)
    with pytest.raises(SALRError, match=r"sparsity must be in \[0, 1\)"):
        unstructured_mask(torch.randn(4, 4), sparsity)


def test_config_rejects_bad_patterns_and_conflicts():
    with pytest.raises(SALRError, match="not understood"):
        SALRConfig(pattern="half")
    with pytest.raises(SALRError, match="implies sparsity 0.5"):
        SALRConfig(pattern="2:4", sparsity=0.7)
    assert SALRConfig(pattern="4:8", sparsity=None).sparsity == 0.5
    assert SALRConfig(pattern="1:4", sparsity=None).sparsity == 0.75
    with pytest.raises(SALRError, match="non-negative"):
        SALRConfig(r=-1)


@pytest.mark.parametrize("n", [1, 7, 96])
def test_damped_inverse_upper_factors_the_inverse_of_the_damped_gram(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3 * n + 5, n, generator=gen, dtype=torch.float64)
    x[:, 0] *= 1e3  # a loud feature: a badly conditioned Gram
    if n > 2:
        x[:, 2] = 0.0  # a dead input (diag 0) gets a unit diagonal
    gram = x.T @ x
    upper = damped_inverse_upper(gram, 0.01)
    assert upper.dtype == torch.float64 and torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    expected = torch.linalg.inv(damped_gram(gram, 0.01))
    torch.testing.assert_close(upper.T @ upper, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


def test_damped_inverse_upper_refuses_an_indefinite_gram():
    with pytest.raises(SALRError, match="not positive definite"):
        damped_inverse_upper(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64), 1e-6)

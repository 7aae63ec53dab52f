"""The MSE framework (salr.theory): closed forms against independent quadrature and Monte Carlo, Theorems 3 and 4."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from salr import theory
from salr.commands import theory as theory_command
from salr.errors import SALRError
from salr.pruning import magnitude_mask
from salr.train.residual_lr import sigma_max_power_iteration

STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "models" / "stories260K" / "stories260K.bin"


@pytest.fixture(autouse=True)
def one_thread():
    # Small matrices: one thread is faster, and much faster on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _simpson_truncated_moment(z: float, n: int = 2000) -> float:
    """2 ∫_0^z x² φ(x) dx by Simpson's rule: an independent check of the integration by parts."""
    h = z / n
    f = [(i * h) ** 2 * math.exp(-((i * h) ** 2) / 2) / math.sqrt(2 * math.pi) for i in range(n + 1)]
    return 2 * h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


# ------------------------------------------------------------------------------------------- pruning MSE


def test_pruning_mse_at_half_sparsity_is_the_papers_0_0713():
    assert theory.pruning_mse(0.5) == pytest.approx(0.0713, rel=0.01)
    assert theory.pruning_mse(0.5) == pytest.approx(0.071326, abs=1e-6)
    assert theory.pruning_mse(0.5, sigma=3.0) == pytest.approx(9 * theory.pruning_mse(0.5))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_closed_form_matches_quadrature(p):
    z = theory.pruning_threshold(p)
    assert 2 * (theory._STD.cdf(z) - 0.5) == pytest.approx(p)  # a fraction p has |x| <= z
    assert theory.truncated_second_moment(z) == pytest.approx(_simpson_truncated_moment(z), rel=1e-8)


def test_pruning_mse_limits_and_bad_input():
    assert theory.pruning_mse(0.0) == 0.0
    assert theory.pruning_mse(0.999) == pytest.approx(0.999 - 0.0, abs=0.02)  # almost all of E[w²] = 1
    with pytest.raises(SALRError, match="sparsity"):
        theory.pruning_mse(1.0)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_pruning_mse_matches_monte_carlo_with_the_project_mask(p):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1024, 1024, generator=gen)
    err = torch.where(magnitude_mask(w, p), 0.0, w)
    assert float(err.double().pow(2).mean()) == pytest.approx(theory.pruning_mse(p), rel=0.02)


# -------------------------------------------------------------------------------------------- placements


@pytest.mark.parametrize("delta", theory.DELTA_KINDS)
def test_closed_form_ordering_is_e1_e3_e2(delta):
    for p in theory.DEFAULT_SPARSITIES:
        for tau in (0.1, 0.5, 1.0, 2.0):
            e = theory.placement_mse(p, tau, delta)
            assert e["E1"] < e["E3"] < e["E2"], (p, tau, e)
            assert e["E2"] - e["E1"] == pytest.approx(p * tau**2)


def test_gaussian_e3_scales_with_merged_variance_and_low_rank_tends_to_it():
    p, tau = 0.5, 0.7
    gauss = theory.placement_mse(p, tau, "gaussian")
    assert gauss["E3"] == pytest.approx((1 + tau**2) * gauss["E1"])
    # Δ = B A with a huge inner rank has Gaussian entries; rank 1 has heavy-tailed ones and a different E3.
    assert theory.placement_mse(p, tau, "low_rank", delta_rank=10_000)["E3"] == pytest.approx(gauss["E3"], rel=1e-4)
    assert abs(theory.placement_mse(p, tau, "low_rank", delta_rank=1)["E3"] / gauss["E3"] - 1) > 0.005


@pytest.mark.parametrize("delta", theory.DELTA_KINDS)
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_monte_carlo_matches_closed_form_within_2_percent(delta, p):
    closed = theory.placement_mse(p, 0.5, delta, delta_rank=8)
    mc = theory.monte_carlo_placements(p, 0.5, delta, shape=(128, 256), samples=24, delta_rank=8, seed=3)
    for name in theory.PLACEMENTS:
        assert mc[name]["mse"] == pytest.approx(closed[name], rel=0.02), name
        assert abs(mc[name]["mse"] - closed[name]) < 5 * mc[name]["mse_stderr"] + 1e-12, name


def test_placement_errors_definitions():
    w0 = torch.tensor([[3.0, -0.1], [0.2, -2.0]])
    delta = torch.tensor([[0.0, 2.5], [0.0, 0.0]])  # W0 + Δ = [[3, 2.4], [0.2, -2]]
    e = theory.placement_errors(w0, delta, 0.5)
    assert torch.allclose(e["E1"], torch.tensor([[0.0, -0.1], [0.2, 0.0]]))  # pruned part of W0
    assert torch.allclose(e["E2"], torch.tensor([[0.0, 2.4], [0.2, 0.0]]))  # W0's mask on W0 + Δ
    assert torch.allclose(e["E3"], torch.tensor([[0.0, 0.0], [0.2, -2.0]]))  # W0 + Δ pruned by its own magnitudes


def test_recomputed_mask_beats_static_mask_on_every_matrix():
    # Same number of zeros, and magnitude pruning is the best sparse approximation: E3 <= E2 sample by sample.
    gen = torch.Generator().manual_seed(5)
    for p in (0.2, 0.5, 0.8):
        w0, delta = torch.randn(32, 48, generator=gen), 0.8 * torch.randn(32, 48, generator=gen)
        e = theory.placement_errors(w0, delta, p)
        assert float(e["E3"].pow(2).sum()) <= float(e["E2"].pow(2).sum())


def test_ordering_helper():
    assert theory.ordering({"E1": 1.0, "E2": 3.0, "E3": 2.0}) == "E1 <= E3 <= E2"
    assert theory.ordering({"E1": 1.0, "E2": 2.0, "E3": 3.0}) == "E1 <= E2 <= E3"


# ----------------------------------------------------------------------------------------------- Theorem 3


def test_marchenko_pastur_tail_matches_gaussian_svd_and_sits_below_the_bound():
    gen = torch.Generator().manual_seed(0)
    for d, k, r in [(200, 200, 25), (100, 400, 10)]:
        x = torch.randn(d, k, generator=gen, dtype=torch.float64)
        s2 = torch.linalg.svdvals(x).pow(2)
        measured = float(s2[r:].sum() / s2.sum())
        predicted = theory.marchenko_pastur_tail_fraction(r, d, k)
        assert predicted == pytest.approx(measured, rel=0.03)
        assert predicted < theory.theorem3_bound_fraction(r, d, k)
    assert theory.marchenko_pastur_tail_fraction(0, 50, 80) == 1.0
    assert theory.marchenko_pastur_tail_fraction(50, 50, 80) == pytest.approx(0.0, abs=1e-6)


def test_theorem3_tail_is_the_discarded_singular_energy_and_flat_spectra_attain_the_bound():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 20, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(30, 20, generator=gen))
    s = torch.linspace(5.0, 0.5, 20)
    check = theory.theorem3_check(u @ torch.diag(s) @ v.T, rank=6)
    assert check["tail_energy"] == pytest.approx(float(s[6:].pow(2).sum()), rel=1e-4)
    assert check["holds"] and check["tightness"] < 1.0
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen))
    flat = theory.theorem3_check(q, rank=6)  # all singular values equal (an orthogonal matrix): the bound is exact
    assert flat["tightness"] == pytest.approx(1.0, rel=1e-4)
    assert flat["bound"] == pytest.approx((1 - 6 / 20) * 20, rel=1e-4)


def test_theorem3_on_weights():
    gen = torch.Generator().manual_seed(0)
    weights = [("a", torch.randn(64, 32, generator=gen)), ("b", torch.randn(48, 96, generator=gen))]
    out = theory.theorem3_on_weights(weights, sparsity=0.5, rank_fraction=0.25)
    assert [r["rank"] for r in out["layers"]] == [8, 12]
    assert out["all_hold"] and 0.5 < out["tightness_min"] <= out["tightness_max"] < 1.0
    with pytest.raises(SALRError, match="2-D"):
        theory.theorem3_on_weights([("c", torch.randn(2, 3, 4))])


# ----------------------------------------------------------------------------------------------- Theorem 4


def test_power_iteration_matches_exact_spectral_norm():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 40, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    s = torch.linspace(7.0, 0.1, 40)
    s[1] = 5.0  # spectral gap 5/7
    x = (u @ torch.diag(s.double()) @ v.T).float()
    sigma = sigma_max_power_iteration(x, iters=200, seed=1)
    assert sigma == pytest.approx(float(torch.linalg.matrix_norm(x.double(), 2)), rel=1e-6)
    # [batch, seq, in] is flattened to [tokens, in]
    assert sigma_max_power_iteration(x.reshape(3, 100, 40), iters=200) == pytest.approx(sigma, rel=1e-6)
    assert theory.theorem4_learning_rate(x, iters=200) == pytest.approx(1 / sigma**2, rel=1e-6)
    check = theory.theorem4_check(x, iters=200)
    assert check["rel_error"] < 1e-6 and check["shape"] == [300, 40]


def test_power_iteration_estimate_rises_to_sigma_max_from_below():
    x = torch.randn(500, 100, generator=torch.Generator().manual_seed(2))
    exact = float(torch.linalg.matrix_norm(x.double(), 2))
    few, many = (sigma_max_power_iteration(x, iters=n, tol=0.0) for n in (3, 300))
    assert few <= many <= exact * (1 + 1e-9)
    assert many == pytest.approx(exact, rel=1e-3)


def test_theorem4_learning_rate_is_the_stable_step_for_least_squares():
    # ½‖X W − Y‖²: gradient descent with η* = 1/σ_max² decreases the loss; 2.2/σ_max² diverges.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=gen, dtype=torch.float64)
    y = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    eta = theory.theorem4_learning_rate(x, iters=500)

    def losses(step):
        w = torch.zeros(30, 5, dtype=torch.float64)
        out = []
        for _ in range(50):
            r = x @ w - y
            out.append(0.5 * float(r.pow(2).sum()))
            w = w - step * x.T @ r
        return out

    stable = losses(eta)
    assert all(b <= a + 1e-9 for a, b in zip(stable, stable[1:], strict=False))
    assert losses(2.2 * eta)[-1] > 10 * stable[0]


def test_theorem4_rejects_bad_input():
    with pytest.raises(SALRError, match="all zeros"):
        theory.theorem4_learning_rate(torch.zeros(10, 4))
    with pytest.raises(SALRError, match="at least 2 dims"):
        sigma_max_power_iteration(torch.ones(5))


# ------------------------------------------------------------------------------------------ report + CLI


def _run_command(tmp_path: Path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    theory_command.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "theory.json"
    args = parser.parse_args(
        ["theory", "--json", str(out), "--plot", str(tmp_path / "t.png"), "--samples", "6", "--recovery-samples", "2"]
        + ["--shape", "64", "96", "--rank", "8", "--delta-rank", "4", *extra]
    )
    assert args.func(args) == 0
    return json.loads(out.read_text())


def test_theory_command_writes_report_and_plot(tmp_path, capsys):
    report = _run_command(tmp_path, "--model", "none")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pruning MSE at p=0.5" in capsys.readouterr().out
    assert report["pruning_mse"]["closed_form"] == pytest.approx(0.0713, rel=0.01)
    assert report["checks"]["pruning_mse_p50_within_1pct"]
    assert report["checks"]["ordering_closed_form_matches_paper"]
    assert len(report["sweep"]) == 2 * 9 * 3
    assert report["theorem3"]["real"] == {"skipped": "no model weights given"}
    assert report["theorem4"]["random"]["rel_error"] < 0.01
    assert report["model"] is None


@pytest.mark.skipif(not STORIES.is_file(), reason="stories260K checkpoint not present")
def test_theory_command_on_stories260k(tmp_path):
    report = _run_command(tmp_path, "--model", str(STORIES))
    real3, real4 = report["theorem3"]["real"], report["theorem4"]["real"]
    assert len(real3["layers"]) == 5 * 7  # q, k, v, o, gate, up, down in 5 layers
    assert real3["all_hold"] and 0.3 < real3["tightness_min"] <= real3["tightness_max"] < 1.0
    assert real4["max_rel_error"] < 1e-4


def test_report_rejects_bad_rank():
    with pytest.raises(SALRError, match="rank"):
        theory.theory_report(shape=(16, 16), rank=17, samples=1)

"""The paper's MSE framework checked numerically: closed forms against Monte Carlo.

Everything is per entry and in units of σ², the variance of the Gaussian base weight W0 [d, k]. The derivations
and the definitions of the three placements are in docs/theory.md; in short, with Δ a fine-tuning update of
per-entry variance τ²σ² (iid Gaussian, or a LoRA-like product B A of rank ν) and M(X) the magnitude mask of X:

- E1 (SALR, static mask on W0 only):   error (1 − M(W0)) ⊙ W0                 = σ² g(z_p)
- E2 (static mask on the merged W0+Δ): error (1 − M(W0)) ⊙ (W0 + Δ)           = σ² [g(z_p) + p τ²]
- E3 (mask recomputed on W0 + Δ):      error (1 − M(W0+Δ)) ⊙ (W0 + Δ)         = σ² (1 + τ²) g(z_p)  (Gaussian Δ)

where z_p = Φ⁻¹((1+p)/2) and g(z) = E[x² 1{|x| ≤ z}] = (2Φ(z) − 1) − 2zφ(z) for x ~ N(0, 1), so
E1 ≤ E3 ≤ E2 because g(z_p) ≤ p. Theorem 3 (rank-r SVD recovery) and Theorem 4 (learning rate 1/σ_max(X)²) are
checked here too. Closed forms use only math/torch float64 (no scipy).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Sequence
from statistics import NormalDist

import torch

from salr.errors import SALRError
from salr.io import atomic_write_bytes
from salr.pruning import check_sparsity, magnitude_mask
from salr.residual import residual_svd
from salr.train.residual_lr import sigma_max_power_iteration

logger = logging.getLogger(__name__)

PAPER_MSE_P50 = 0.0713  # the paper's per-entry MSE of magnitude pruning at 50 % sparsity, in units of σ²
PLACEMENTS = ("E1", "E2", "E3")
DELTA_KINDS = ("gaussian", "low_rank")
_STD = NormalDist()


# ---------------------------------------------------------------------------------------------------- closed forms


def pruning_threshold(p: float) -> float:
    """z_p = t/σ: magnitude pruning at ratio p zeroes |w| <= z_p σ for w ~ N(0, σ²)."""
    check_sparsity(p)
    return 0.0 if p == 0.0 else _STD.inv_cdf((1.0 + p) / 2.0)


def truncated_second_moment(z: float) -> float:
    """g(z) = E[x² 1{|x| <= z}] for x ~ N(0, 1): integrate by parts, x²φ = x·(−φ)'."""
    return (2.0 * _STD.cdf(z) - 1.0) - 2.0 * z * _STD.pdf(z)


def pruning_mse(p: float, sigma: float = 1.0) -> float:
    """Per-entry MSE of magnitude pruning at ratio p for N(0, σ²): σ² [p − 2 z_p φ(z_p)] (≈ 0.0713 σ² at p = 0.5)."""
    return sigma**2 * truncated_second_moment(pruning_threshold(p))


def _chi2_scale_quadrature(nu: int, n: int = 4001) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes s and weights w (sum 1) for s = X/ν, X ~ χ²_ν, on a u = √X grid (smooth density for ν >= 1)."""
    u = torch.linspace(0.0, math.sqrt(nu + 40.0 * math.sqrt(nu) + 60.0), n, dtype=torch.float64)
    log_density = (nu - 1) * torch.log(u.clamp_min(1e-300)) - u**2 / 2
    w = torch.exp(log_density - log_density.max())
    return u**2 / nu, w / w.sum()


def _mixture_pruning_mse(p: float, scales: torch.Tensor, weights: torch.Tensor) -> float:
    """Per-entry MSE of magnitude pruning at ratio p when entries are N(0, v) with v drawn from (scales, weights)."""
    if p == 0.0:
        return 0.0
    sd = scales.sqrt()
    lo, hi = 0.0, 10.0 * float(sd.max())
    for _ in range(100):  # bisection on the threshold t: P(|y| <= t) = p
        t = (lo + hi) / 2
        kept_fraction = float((weights * (2 * torch.special.ndtr(t / sd) - 1)).sum())
        lo, hi = (t, hi) if kept_fraction < p else (lo, t)
    z = t / sd
    g = (2 * torch.special.ndtr(z) - 1) - 2 * z * torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    return float((weights * scales * g).sum())


def placement_mse(p: float, tau: float, delta: str = "gaussian", delta_rank: int = 16) -> dict[str, float]:
    """Closed-form E1, E2, E3 (units of σ²) at sparsity p for an update Δ of per-entry variance τ²σ².

    `delta='gaussian'`: iid N(0, τ²σ²). `delta='low_rank'`: Δ = B A, B [d, ν] ~ N(0, 1), A [ν, k] ~ N(0, τ²σ²/ν);
    its entries are Gaussian given the row of B, with variance τ²σ² χ²_ν/ν, so E3 is a scale-mixture integral.
    E1 and E2 only need Δ independent of W0 with mean 0 and variance τ²σ², so they are the same for both.
    """
    check_sparsity(p)
    if delta not in DELTA_KINDS:
        raise SALRError(f"delta must be one of {DELTA_KINDS}, got {delta!r}")
    e1 = pruning_mse(p)
    e2 = e1 + p * tau**2
    if delta == "gaussian":
        e3 = (1.0 + tau**2) * e1
    else:
        s, w = _chi2_scale_quadrature(delta_rank)
        e3 = _mixture_pruning_mse(p, 1.0 + tau**2 * s, w)
    return {"E1": e1, "E2": e2, "E3": e3}


def marchenko_pastur_tail_fraction(rank: int, d: int, k: int, grid: int = 20001) -> float:
    """Expected ‖E − E_r‖²_F / ‖E‖²_F for E [d, k] with iid zero-mean entries, in the Marchenko–Pastur limit.

    The squared singular values of E/√max(d,k) follow MP with ratio λ = min/max on [(1−√λ)², (1+√λ)²]; with
    x = (a+b)/2 − (b−a)/2 cos θ the density times dx is ((b−a)/2)² sin²θ / (2πλx) dθ, smooth on [0, π]. The top
    r = q·min(d, k) values hold the top-q mass; the tail keeps the rest of the energy (the MP mean is 1).
    """
    n, m = min(d, k), max(d, k)
    if not 0 <= rank <= n:
        raise SALRError(f"rank must be in [0, {n}] for a {d}x{k} matrix, got {rank}")
    if rank == 0:
        return 1.0
    lam = n / m
    a, b = (1 - math.sqrt(lam)) ** 2, (1 + math.sqrt(lam)) ** 2
    theta = torch.linspace(0.0, math.pi, grid, dtype=torch.float64)
    x = (a + b) / 2 - (b - a) / 2 * torch.cos(theta)
    sin2 = torch.sin(theta) ** 2
    # sin²θ / x has the finite limit 2(1 + cos θ)/b at θ = 0 when a = 0 (square matrices).
    ratio = torch.where(x > 0, sin2 / x.clamp_min(1e-300), 2 * (1 + torch.cos(theta)) / b)
    mass_density = ((b - a) / 2) ** 2 * ratio / (2 * math.pi * lam)
    energy_density = ((b - a) / 2) ** 2 * sin2 / (2 * math.pi * lam)
    h = math.pi / (grid - 1)

    def upper_cumulative(f: torch.Tensor) -> torch.Tensor:  # ∫_θ^π f, trapezoid
        pieces = (f[1:] + f[:-1]) * h / 2
        return torch.cat([pieces.flip(0).cumsum(0).flip(0), pieces.new_zeros(1)])

    mass_above, energy_above = upper_cumulative(mass_density), upper_cumulative(energy_density)
    q = rank / n
    i = int(torch.searchsorted(-mass_above, torch.tensor(-q, dtype=torch.float64)))  # first θ with mass <= q
    i = min(max(i, 1), grid - 1)
    # Linear interpolation between grid points i-1 and i for the θ where the mass above equals q.
    m0, m1 = float(mass_above[i - 1]), float(mass_above[i])
    frac = 0.0 if m0 == m1 else (m0 - q) / (m0 - m1)
    top_energy = float(energy_above[i - 1]) + frac * (float(energy_above[i]) - float(energy_above[i - 1]))
    return max(0.0, 1.0 - top_energy / float(energy_above[0]))


def theorem3_bound_fraction(rank: int, d: int, k: int) -> float:
    """The paper's Theorem 3 bound on ‖E − E_r‖²_F / ‖E‖²_F: 1 − r/min(d, k)."""
    return 1.0 - rank / min(d, k)


# ----------------------------------------------------------------------------------------------------- Monte Carlo


def sample_delta(d: int, k: int, tau: float, kind: str, rank: int, gen: torch.Generator) -> torch.Tensor:
    """A random update Δ [d, k] with per-entry variance τ² (see `placement_mse` for the two kinds)."""
    if kind == "gaussian":
        return tau * torch.randn(d, k, generator=gen)
    if kind == "low_rank":
        return (tau / math.sqrt(rank)) * (torch.randn(d, rank, generator=gen) @ torch.randn(rank, k, generator=gen))
    raise SALRError(f"delta must be one of {DELTA_KINDS}, got {kind!r}")


def placement_errors(w0: torch.Tensor, delta: torch.Tensor, sparsity: float) -> dict[str, torch.Tensor]:
    """Error matrices (deployed − intended W0 + Δ, up to sign) of the three placements for one W0 [d, k] and Δ."""
    merged = w0 + delta
    static = magnitude_mask(w0, sparsity)  # True = kept
    recomputed = magnitude_mask(merged, sparsity)
    return {
        "E1": torch.where(static, 0.0, w0),  # SALR: Δ stays dense beside the pruned base
        "E2": torch.where(static, 0.0, merged),  # W0's mask applied to the merged weight
        "E3": torch.where(recomputed, 0.0, merged),  # the merged weight pruned by its own magnitudes
    }


def monte_carlo_placements(
    sparsity: float,
    tau: float,
    delta: str = "gaussian",
    shape: tuple[int, int] = (256, 256),
    samples: int = 64,
    recovery_rank: int = 0,
    recovery_samples: int = 8,
    delta_rank: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Monte Carlo per-entry MSE of E1, E2, E3 over `samples` N(0, 1) matrices W0 [d, k] (units of σ²).

    Returns {placement: {"mse", "mse_stderr", "mse_recovered"}}: `mse_stderr` is the standard error over samples;
    `mse_recovered` (when recovery_rank > 0) is ‖E − E_r‖²_F / (d k) after the rank-r SVD recovery of each error
    matrix (SALR's residual adapter), averaged over the first `recovery_samples` samples because SVDs dominate the
    cost. The three placements share W0 and Δ in every sample (common random numbers).
    """
    check_sparsity(sparsity)
    if samples < 1:
        raise SALRError(f"samples must be >= 1, got {samples}")
    d, k = shape
    gen = torch.Generator().manual_seed(seed)
    per_sample: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    recovered: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    for i in range(samples):
        w0 = torch.randn(d, k, generator=gen)
        errors = placement_errors(w0, sample_delta(d, k, tau, delta, delta_rank, gen), sparsity)
        for name, err in errors.items():
            per_sample[name].append(float(err.double().pow(2).sum()) / (d * k))
            if recovery_rank > 0 and i < recovery_samples:
                # Eckart–Young: ‖E − E_r‖²_F = Σ_{i>r} σ_i²; theorem3_check measures ‖E − B A‖²_F directly.
                tail = float(torch.linalg.svdvals(err.double())[recovery_rank:].pow(2).sum())
                recovered[name].append(tail / (d * k))
    out = {}
    for name, values in per_sample.items():
        mean = sum(values) / samples
        var = sum((v - mean) ** 2 for v in values) / (samples - 1) if samples > 1 else 0.0
        out[name] = {"mse": mean, "mse_stderr": math.sqrt(var / samples)}
        if recovered[name]:
            out[name]["mse_recovered"] = sum(recovered[name]) / len(recovered[name])
    return out


def ordering(values: dict[str, float]) -> str:
    """The placements sorted by error, e.g. 'E1 <= E3 <= E2'."""
    return " <= ".join(sorted(values, key=values.__getitem__))


def sparsity_sweep(
    sparsities: Sequence[float],
    tau: float,
    shape: tuple[int, int],
    rank: int,
    samples: int,
    recovery_samples: int = 8,
    delta_rank: int = 16,
    seed: int = 0,
) -> list[dict]:
    """One row per (delta kind, sparsity, placement): closed form and Monte Carlo, before and after recovery.

    `closed_form_recovered` uses the Marchenko–Pastur tail fraction, valid when the error matrix has iid entries:
    always for Gaussian Δ, and for E1 with low-rank Δ (E1 does not see Δ); otherwise it is None.
    """
    d, k = shape
    mp_fraction = marchenko_pastur_tail_fraction(rank, d, k)
    bound_fraction = theorem3_bound_fraction(rank, d, k)
    rows = []
    for kind in DELTA_KINDS:
        for i, p in enumerate(sparsities):
            closed = placement_mse(p, tau, kind, delta_rank)
            mc = monte_carlo_placements(
                p, tau, kind, shape, samples, rank, recovery_samples, delta_rank, seed=seed + 1000 * i
            )
            for name in PLACEMENTS:
                iid = kind == "gaussian" or name == "E1"
                rows.append(
                    {
                        "delta": kind,
                        "sparsity": p,
                        "placement": name,
                        "closed_form": closed[name],
                        "monte_carlo": mc[name]["mse"],
                        "monte_carlo_stderr": mc[name]["mse_stderr"],
                        "rel_error": _rel(mc[name]["mse"], closed[name]),
                        "closed_form_recovered": closed[name] * mp_fraction if iid else None,
                        "monte_carlo_recovered": mc[name]["mse_recovered"],
                        "theorem3_bound_recovered": mc[name]["mse"] * bound_fraction,
                    }
                )
    return rows


def _rel(measured: float, reference: float) -> float:
    return abs(measured - reference) / abs(reference) if reference else abs(measured)


# ------------------------------------------------------------------------------------------------------- Theorem 3


def theorem3_check(error: torch.Tensor, rank: int) -> dict:
    """Theorem 3 on one error matrix [d, k]: measured ‖E − E_r‖²_F against (1 − r/min(d, k))·‖E‖²_F.

    `tightness` = tail / bound (1 means the bound is attained; Gaussian-like errors sit a little below 1).
    """
    d, k = error.shape
    factors = residual_svd(error, rank, method="exact")
    bound = theorem3_bound_fraction(rank, d, k) * factors.error_energy
    return {
        "shape": [d, k],
        "rank": rank,
        "error_energy": factors.error_energy,
        "tail_energy": factors.tail_energy,
        "bound": bound,
        "tightness": factors.tail_energy / bound if bound else 0.0,
        # float32 SVD: allow a relative rounding slack when comparing with the bound
        "holds": factors.tail_energy <= bound * (1 + 1e-5) + 1e-12,
        "marchenko_pastur_tightness": marchenko_pastur_tail_fraction(rank, d, k) / theorem3_bound_fraction(rank, d, k),
    }


def theorem3_on_weights(
    named_weights: Iterable[tuple[str, torch.Tensor]], sparsity: float = 0.5, rank_fraction: float = 0.125
) -> dict:
    """Theorem 3 on real weights: prune each 2-D weight by magnitude, SVD its error at r = rank_fraction·min(d, k).

    Also reports the Marchenko–Pastur prediction for a Gaussian matrix of the same shape, to see how much more
    low-rank structure real pruning errors have (tightness below the Gaussian value).
    """
    layers = []
    for name, weight in named_weights:
        if weight.dim() != 2:
            raise SALRError(f"{name}: Theorem 3 needs a 2-D weight, got shape {tuple(weight.shape)}")
        w = weight.detach().float()
        rank = max(1, round(rank_fraction * min(w.shape)))
        error = torch.where(magnitude_mask(w, sparsity), 0.0, w)
        layers.append({"name": name, **theorem3_check(error, rank)})
    if not layers:
        raise SALRError("no 2-D weights given for the Theorem 3 check")
    tight = [r["tightness"] for r in layers]
    return {
        "sparsity": sparsity,
        "rank_fraction": rank_fraction,
        "layers": layers,
        "all_hold": all(r["holds"] for r in layers),
        "tightness_min": min(tight),
        "tightness_mean": sum(tight) / len(tight),
        "tightness_max": max(tight),
    }


# ------------------------------------------------------------------------------------------------------- Theorem 4


def theorem4_learning_rate(x: torch.Tensor, iters: int = 100, seed: int = 0) -> float:
    """Theorem 4's residual-adapter learning rate η* = 1/σ_max(X)² for a layer input X [..., in].

    This is 1/L for the loss ½‖X Wᵀ − Y‖²_F summed over the rows of X; for a loss averaged over N rows multiply
    by N. σ_max comes from `sigma_max_power_iteration`.
    """
    sigma = sigma_max_power_iteration(x, iters, seed)
    if sigma == 0.0:
        raise SALRError("layer input X is all zeros: Theorem 4's learning rate 1/σ_max(X)² is undefined")
    return 1.0 / sigma**2


def theorem4_check(x: torch.Tensor, iters: int = 100, seed: int = 0) -> dict:
    """Power-iteration σ_max and η* against torch.linalg.matrix_norm(X, 2)."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    power = sigma_max_power_iteration(rows, iters, seed)
    exact = float(torch.linalg.matrix_norm(rows, 2))
    return {
        "shape": list(rows.shape),
        "iters": iters,
        "sigma_max_power": power,
        "sigma_max_exact": exact,
        "rel_error": _rel(power, exact),
        "learning_rate_power": 1.0 / power**2 if power else None,
        "learning_rate_exact": 1.0 / exact**2 if exact else None,
    }


@torch.no_grad()
def collect_linear_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run `model` once and return each nn.Linear's input, flattened to [tokens, in] (float32)."""
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def hook(_mod, args, name=name):
                inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

            handles.append(module.register_forward_pre_hook(hook))
    try:
        model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return inputs


# ---------------------------------------------------------------------------------------------------------- report

DEFAULT_SPARSITIES = tuple(round(0.1 * i, 10) for i in range(1, 10))
PAPER_ORDERING = "E1 <= E3 <= E2"
DEFINITIONS = {
    "E1": "SALR: static mask M(W0) on the frozen base only, Δ kept dense beside it; error (1 - M(W0)) * W0",
    "E2": "static mask M(W0) applied to the merged weight; error (1 - M(W0)) * (W0 + Δ)",
    "E3": "mask recomputed on the merged weight; error (1 - M(W0 + Δ)) * (W0 + Δ)",
}


def _orders(values: dict[str, float]) -> bool:
    return values["E1"] <= values["E3"] <= values["E2"]


def _ordering_summary(rows: list[dict]) -> dict:
    """Does E1 <= E3 <= E2 hold at every (delta kind, sparsity), for closed forms and Monte Carlo?"""
    result: dict = {"paper": PAPER_ORDERING, "exceptions": []}
    for key in ("closed_form", "monte_carlo", "closed_form_recovered", "monte_carlo_recovered"):
        holds = True
        for kind in DELTA_KINDS:
            for p in sorted({r["sparsity"] for r in rows}):
                values = {r["placement"]: r[key] for r in rows if r["delta"] == kind and r["sparsity"] == p}
                if any(v is None for v in values.values()):
                    continue
                if not _orders(values):
                    holds = False
                    result["exceptions"].append(
                        {"quantity": key, "delta": kind, "sparsity": p, "found": ordering(values)}
                    )
        result[f"{key}_holds"] = holds
    return result


def _theorem_checks(
    shape: tuple[int, int],
    rank: int,
    seed: int,
    named_weights: Iterable[tuple[str, torch.Tensor]] | None,
    layer_inputs: dict[str, torch.Tensor] | None,
    power_iters: int,
) -> tuple[list[dict], dict, dict, dict]:
    """Theorem 3 on Gaussian and real weights, Theorem 4 on a Gaussian and real layer inputs."""
    d, k = shape
    gen = torch.Generator().manual_seed(seed + 7)
    random_t3 = []
    for dd, kk in [(d, k), (d, 4 * k)]:
        w0 = torch.randn(dd, kk, generator=gen)
        random_t3.append(theorem3_check(torch.where(magnitude_mask(w0, 0.5), 0.0, w0), rank))
    real_t3 = (
        theorem3_on_weights(named_weights, 0.5, rank / min(d, k))
        if named_weights is not None
        else {"skipped": "no model weights given"}
    )
    x = torch.randn(4 * d, k, generator=gen)
    random_t4 = theorem4_check(x, power_iters, seed)
    if layer_inputs:
        layers = [{"name": n, **theorem4_check(xi, power_iters, seed)} for n, xi in layer_inputs.items()]
        real_t4 = {"layers": layers, "max_rel_error": max(r["rel_error"] for r in layers)}
    else:
        real_t4 = {"skipped": "no layer inputs given"}
    return random_t3, real_t3, random_t4, real_t4


def theory_report(
    tau: float = 0.5,
    shape: tuple[int, int] = (256, 256),
    rank: int = 32,
    samples: int = 64,
    recovery_samples: int = 8,
    delta_rank: int = 16,
    seed: int = 0,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    named_weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    layer_inputs: dict[str, torch.Tensor] | None = None,
    power_iters: int = 100,
) -> dict:
    """Everything `salr theory` reports (the JSON layout is documented in docs/theory.md).

    `named_weights` (2-D weights of a real model) feed the Theorem 3 check on real weights and `layer_inputs`
    (name -> layer input X) the Theorem 4 check on real activations; either may be None (reported as skipped).
    """
    d, k = shape
    if not 0 < rank <= min(d, k):
        raise SALRError(f"rank must be in [1, {min(d, k)}] for a {d}x{k} matrix, got {rank}")
    if 0.5 not in sparsities:
        raise SALRError("the sparsity sweep must include 0.5 (the paper's headline number)")
    rows = sparsity_sweep(sparsities, tau, shape, rank, samples, recovery_samples, delta_rank, seed)
    at = {(r["delta"], r["sparsity"], r["placement"]): r for r in rows}
    e1 = at[("gaussian", 0.5, "E1")]
    p50 = {
        kind: {
            key: {name: at[(kind, 0.5, name)][key] for name in PLACEMENTS}
            for key in ("closed_form", "monte_carlo", "closed_form_recovered", "monte_carlo_recovered")
        }
        for kind in DELTA_KINDS
    }
    for kind in DELTA_KINDS:
        p50[kind]["ordering_closed_form"] = ordering(p50[kind]["closed_form"])
        p50[kind]["ordering_monte_carlo"] = ordering(p50[kind]["monte_carlo"])
        p50[kind]["ordering_monte_carlo_recovered"] = ordering(p50[kind]["monte_carlo_recovered"])

    random_t3, real_t3, random_t4, real_t4 = _theorem_checks(
        shape, rank, seed, named_weights, layer_inputs, power_iters
    )

    no_recovery = [r["rel_error"] for r in rows]
    recovery = [
        _rel(r["monte_carlo_recovered"], r["closed_form_recovered"]) for r in rows if r["closed_form_recovered"]
    ]
    order = _ordering_summary(rows)
    t4_errors = [random_t4["rel_error"]] + ([real_t4["max_rel_error"]] if "max_rel_error" in real_t4 else [])
    checks = {
        "pruning_mse_p50_rel_error_vs_paper": _rel(e1["closed_form"], PAPER_MSE_P50),
        "pruning_mse_p50_within_1pct": _rel(e1["closed_form"], PAPER_MSE_P50) <= 0.01
        and _rel(e1["monte_carlo"], PAPER_MSE_P50) <= 0.01,
        "monte_carlo_max_rel_error": max(no_recovery),
        "monte_carlo_within_2pct": max(no_recovery) <= 0.02,
        "recovered_max_rel_error_vs_marchenko_pastur": max(recovery),
        "ordering_closed_form_matches_paper": order["closed_form_holds"],
        "ordering_monte_carlo_matches_paper": order["monte_carlo_holds"],
        "theorem3_holds": all(r["holds"] for r in random_t3) and real_t3.get("all_hold", True),
        "theorem4_max_rel_error": max(t4_errors),
    }
    return {
        "config": {
            "tau": tau,
            "shape": [d, k],
            "rank": rank,
            "delta_rank": delta_rank,
            "samples": samples,
            "recovery_samples": recovery_samples,
            "seed": seed,
            "sparsities": list(sparsities),
            "power_iters": power_iters,
        },
        "pruning_mse": {
            "sparsity": 0.5,
            "formula": "sigma^2 * (p - 2 z phi(z)), z = Phi^-1((1 + p) / 2)",
            "closed_form": e1["closed_form"],
            "monte_carlo": e1["monte_carlo"],
            "monte_carlo_stderr": e1["monte_carlo_stderr"],
            "paper": PAPER_MSE_P50,
        },
        "placements": {"definitions": DEFINITIONS, "p50": p50, "ordering": order},
        "sweep": rows,
        "theorem3": {"random": random_t3, "real": real_t3},
        "theorem4": {"random": random_t4, "real": real_t4},
        "checks": checks,
    }


# ------------------------------------------------------------------------------------------------------------ plot


def plot_sweep(rows: list[dict], path: str, rank: int, shape: tuple[int, int], tau: float) -> None:
    """MSE vs sparsity for E1/E2/E3, with and without rank-r SVD recovery, one panel per Δ kind (PNG, atomic)."""
    try:
        import matplotlib
    except ImportError:
        raise SALRError("plotting needs matplotlib: pip install 'salr[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"E1": "tab:green", "E2": "tab:red", "E3": "tab:blue"}
    labels = {"E1": "E1 static mask on W0 (SALR)", "E2": "E2 W0 mask on W0+Δ", "E3": "E3 mask recomputed on W0+Δ"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, kind in zip(axes, DELTA_KINDS, strict=True):
        for name in PLACEMENTS:
            sel = [r for r in rows if r["delta"] == kind and r["placement"] == name]
            p = [r["sparsity"] for r in sel]
            c = colors[name]
            ax.plot(p, [r["closed_form"] for r in sel], "-", color=c, label=f"{labels[name]}: closed form")
            ax.plot(p, [r["monte_carlo"] for r in sel], "o", color=c, ms=4, label="  Monte Carlo")
            if all(r["closed_form_recovered"] is not None for r in sel):
                ax.plot(p, [r["closed_form_recovered"] for r in sel], "--", color=c, label=f"  + rank-{rank} SVD (MP)")
            ax.plot(
                p, [r["monte_carlo_recovered"] for r in sel], "x:", color=c, ms=5, label=f"  + rank-{rank} SVD (MC)"
            )
        title = "Gaussian Δ" if kind == "gaussian" else "low-rank Δ = B A"
        ax.set_title(f"{title}, τ = {tau}, W0 {shape[0]}×{shape[1]} ~ N(0, σ²)")
        ax.set_xlabel("sparsity p")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("per-entry MSE / σ²")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

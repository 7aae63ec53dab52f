"""The residual block's own learning rate: a float, or Theorem 4's η* = N / σ_max(X)² per layer.

A_cat holds [A_res; A_lora] in one tensor, so AdamW sees one lr. The residual block's lr is applied by rescaling
its update after every step (`apply_residual_lr`): AdamW's update is lr * (adam direction + weight_decay * param)
and the direction does not depend on lr, so old + s * (new - old) is exactly a step with lr * s on that block.
Freezing the residual block is not done here: it is the layers' own `train_residual` (salr.layer.FusedAdapters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from salr.errors import SALRError
from salr.layer import FusedAdapters, SALRLinear
from salr.train.config import TrainConfig


def sigma_max_power_iteration(x: torch.Tensor, iters: int = 100, seed: int = 0, tol: float = 1e-9) -> float:
    """Largest singular value of a layer input X [..., in] (rows = tokens) by power iteration on XᵀX.

    XᵀX is never formed: each step is v ← Xᵀ(X v). The estimate ‖X v‖ (|v| = 1) is a lower bound that rises to
    σ_max; it stops early once the relative change is below `tol`. Computed in float64.
    """
    if x.dim() < 2:
        raise SALRError(f"layer input X must be [..., in] with at least 2 dims, got shape {tuple(x.shape)}")
    x = x.detach().reshape(-1, x.shape[-1]).double()
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape[1], generator=gen, dtype=torch.float64)
    v /= v.norm()
    sigma = 0.0
    for _ in range(max(1, iters)):
        u = x @ v
        new_sigma = float(u.norm())
        w = x.T @ u
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        v = w / norm
        if abs(new_sigma - sigma) <= tol * new_sigma:
            break
        sigma = new_sigma
    return float((x @ v).norm())


@torch.no_grad()
def theorem4_rates(
    model: nn.Module, examples: Sequence[dict[str, list[int]]], iters: int = 50, seed: int = 0
) -> dict[str, float]:
    """Theorem 4's residual learning rate per SALRLinear, η* = N / σ_max(X)² = 1 / λ_max(XᵀX / N).

    X [N tokens, in] is the layer's input on `examples` (one forward each, no padding), collected by forward
    pre-hooks as the Gram matrix XᵀX (so memory is in², not N·in). Because the training loss is a mean over
    tokens, the 1/L step of Theorem 4 (L = σ_max(X)² for a summed loss) is multiplied by N. σ_max(XᵀX) =
    σ_max(X)² comes from `sigma_max_power_iteration` run on the (symmetric PSD) Gram matrix. MoE expert
    projections see a different X per expert and keep the adapter lr.
    """
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, layer in model.named_modules():
        if not isinstance(layer, SALRLinear):
            continue

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        handles.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ex in examples:
            model(input_ids=torch.tensor([ex["input_ids"]], device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    rates = {}
    for name, gram in grams.items():
        lam = sigma_max_power_iteration(gram, iters=iters, seed=seed)
        if lam == 0.0:
            raise SALRError(f"{name}: calibration input is all zeros, Theorem 4's learning rate is undefined")
        rates[name] = counts[name] / lam
    return rates


def residual_lr_scales(model: nn.Module, cfg: TrainConfig, examples: Sequence) -> dict[str, float]:
    """Per adapter module: residual lr / adapter lr (empty: the same lr everywhere).

    A frozen residual block (train_residual False) gets no gradient from its layer; with weight decay it also gets
    scale 0 here, so AdamW's decay does not shrink it either."""
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, FusedAdapters) and m.residual_rank > 0]
    frozen = {n: 0.0 for n, m in modules if not m.train_residual} if cfg.weight_decay > 0 else {}
    modules = [(n, m) for n, m in modules if m.train_residual]
    factor, ratio = cfg.theorem4_factor(), cfg.residual_lr_ratio()
    if not modules or (factor is None and ratio is None):
        return frozen
    if factor is not None:
        rates = theorem4_rates(model, examples[: cfg.calib_examples], cfg.power_iters, cfg.seed)
        return {**frozen, **{n: factor * rates[n] / cfg.lr for n, _ in modules if n in rates}}
    return {**frozen, **{n: ratio for n, _ in modules}}


def residual_blocks(module: FusedAdapters) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the residual block: A_cat[..., :r, :] and B_cat[..., :r] (works for experts' leading axis)."""
    r = module.residual_rank
    return module.A_cat.data[..., :r, :], module.B_cat.data[..., :r]


class ResidualLR:
    """Applies per-module residual lr scales around `optimizer.step()`: `before()` snapshots, `after()` rescales."""

    def __init__(self, model: nn.Module, scales: dict[str, float]) -> None:
        modules = dict(model.named_modules())
        self.scales = {n: s for n, s in scales.items() if s != 1.0}
        self.modules = {n: modules[n] for n in self.scales}
        self._old: dict[str, list[torch.Tensor]] = {}

    def before(self) -> None:
        self._old = {n: [b.clone() for b in residual_blocks(m)] for n, m in self.modules.items()}

    @torch.no_grad()
    def after(self) -> None:
        for name, old_blocks in self._old.items():
            for new, old in zip(residual_blocks(self.modules[name]), old_blocks, strict=True):
                new.copy_(old + self.scales[name] * (new - old))
        self._old = {}


def frozen_residual_parameters(model: nn.Module) -> int:
    """Entries of A_cat / B_cat that never change: residual blocks of modules with train_residual False."""
    total = 0
    for module in model.modules():
        if isinstance(module, FusedAdapters) and not module.train_residual:
            A_res, B_res = residual_blocks(module)
            total += A_res.numel() + B_res.numel()
    return total

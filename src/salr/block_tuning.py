"""Block-wise reconstruction: after a transformer block is compressed, fit its residual factors to the block's *output*
on the calibration inputs, with a few Adam steps.

The per-layer fits of salr.decompose are exact for each linear alone, but a block is more than its linears: the
attention softmax and the gated MLP mix the layers' errors non-linearly, and in sequential calibration the inputs
already carry the earlier blocks' errors. Minimizing ‖block_compressed(X̃) − Y‖² over the block's own trainable
factors (EBFT / BESA-style block-wise tuning) accounts for both. The target Y is the dense model's output of the
block on the dense model's inputs, so each block also repairs what the blocks before it left.

Only the residual block (the first `residual_rank` rows of A_cat / columns of B_cat) moves: the LoRA block keeps its
zero-B init, so fine-tuning starts as before; the base (bf16 bitmap or QSALR) is never touched. Tuning the base too
(a dense base's kept values; a QSALR base's block scales, OmniQuant-style) was tried on the default model and gained
nothing at init (docs/quality.md, "Block tuning"), so it was left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from salr.bases.qbitmap import QBitmapBase
from salr.calibration import block_output
from salr.layer import SALRLinear

logger = logging.getLogger(__name__)


@dataclass
class _Tunable:
    """One SALRLinear's trainable copy during block tuning: fp32 residual factors A [r, in], B [out, r] beside its
    frozen base, dense in fp32 (what the base computes: the dequantized values of a quantized base)."""

    layer: SALRLinear
    A: torch.Tensor
    B: torch.Tensor
    base: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.float(), self.base) + F.linear(F.linear(x.float(), self.A), self.B)
        if self.layer.bias is not None:
            y = y + self.layer.bias.float()
        return y.to(x.dtype)

    @torch.no_grad()
    def write_back(self) -> None:
        r, layer = self.layer.residual_rank, self.layer
        layer.A_cat[:r] = self.A.to(layer.A_cat.dtype)
        layer.B_cat[:, :r] = self.B.to(layer.B_cat.dtype)


def _tunables(block: nn.Module) -> list[_Tunable]:
    tunables = []
    for layer in block.modules():
        if not isinstance(layer, SALRLinear) or layer.residual_rank == 0:
            continue
        r = layer.residual_rank
        base = layer.base.dequantize() if isinstance(layer.base, QBitmapBase) else layer.base.to_dense().float()
        A = layer.A_cat.detach()[:r].float().clone().requires_grad_()
        B = layer.B_cat.detach()[:, :r].float().clone().requires_grad_()
        tunables.append(_Tunable(layer, A, B, base.detach()))
    return tunables


def _block_error(
    block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict], targets: list[torch.Tensor]
) -> float:
    """‖block(X) − Y‖² / ‖Y‖² over all calibration batches."""
    num = den = 0.0
    with torch.no_grad():
        for x, kw, y in zip(inputs, kwargs, targets, strict=True):
            num += float((block_output(block, x, kw).float() - y.float()).pow(2).sum())
            den += float(y.float().pow(2).sum())
    return num / max(den, 1e-30)


def tune_block(
    block: nn.Module,
    inputs: list[torch.Tensor],
    kwargs: list[dict[str, Any]],
    targets: list[torch.Tensor],
    steps: int,
    lr: float,
) -> dict[str, float]:
    """Adam on the block's residual factors for `steps` mini-batches, cycling through the
    calibration batches; returns the relative block output error before and after. The block is updated in place."""
    tunables = _tunables(block)
    if not tunables or steps <= 0:
        return {}
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:  # norms and the layers' own A_cat / B_cat need no gradient here
        p.requires_grad_(False)
    for t in tunables:
        t.layer.forward = t.forward  # an instance attribute: shadows SALRLinear.forward during tuning
    try:
        before = _block_error(block, inputs, kwargs, targets)
        optimizer = torch.optim.Adam([p for t in tunables for p in (t.A, t.B)], lr=lr)
        scales = [float(y.float().pow(2).mean()) for y in targets]
        for step in range(steps):
            i = step % len(inputs)
            out = block_output(block, inputs[i], kwargs[i])
            loss = (out.float() - targets[i].float()).pow(2).mean() / max(scales[i], 1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        after = _block_error(block, inputs, kwargs, targets)
        if after < before:
            for t in tunables:
                t.write_back()
        else:
            logger.info(
                "block tuning did not lower the block's output error (%.4g -> %.4g): block left as it was",
                before,
                after,
            )
    finally:
        for t in tunables:
            del t.layer.forward
        for p in frozen:
            p.requires_grad_(True)
    return {"block_error_before": before, "block_error_after": min(after, before)}

"""LoSALinear: a frozen sparse base with a LoRA update that is masked by the base's own sparsity pattern,

    y = W x + b + ((M ⊙ (B_k diag(s) A_k)) x),        M = (W != 0),

so merging it (`merged_weight`, `merge`) never writes a pruned position: the merged model is a plain sparse model.
With `masked_training = False` (an ablation, not LoSA) the forward uses the unmasked B A, as a plain LoRA on the
pruned base, and only the merge masks it, as `salr merge --mode sparse` masks a prune-LoRA run.
Only the first k = `active_rank` LoRA components take part (LoSA changes k every round); the others stay in A_cat /
B_cat with scale 0 and receive no gradient. The LoRA scale s = lora_alpha / r is fixed, whatever k is.

It is a SALRLinear without a residual block, so everything that handles SALRLinear (mark_trainable, salr_modules,
merge_and_unload, the trainer) handles it: `base.to_dense()` is the pruned base (zeros = pruned) and
`merged_weight()` = base + M ⊙ (scaled B A), hence M ⊙ merged_weight() == merged_weight() exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from salr.bases import DenseBase
from salr.layer import SALRLinear


class LoSALinear(SALRLinear):
    """SALRLinear with residual_rank 0, a keep-mask buffer `mask` (= base != 0) and an active rank."""

    def __init__(
        self, base: nn.Module, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, lora_scale: float,
        lora_dropout: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(base, bias, A, B, residual_rank=0, lora_scale=lora_scale, lora_dropout=lora_dropout)
        self.register_buffer("mask", base.to_dense() != 0, persistent=False)
        self.merged = False  # True while the delta is folded into the base (pruning time): forward skips it
        self.masked_training = True  # False: the forward uses the unmasked B A; merging still masks it
        self.active_rank = self.lora_rank

    @classmethod
    def from_salr(cls, layer: SALRLinear) -> LoSALinear:
        """The LoSA layer holding `layer`'s base, bias and LoRA block (a layer `convert` built without residual)."""
        if layer.residual_rank:
            raise ValueError("LoSA layers have no residual block: convert with residual_rank 0")
        return cls(layer.base, layer.bias, layer.A_cat.data, layer.B_cat.data, layer.lora_scale,
                   getattr(layer.lora_dropout, "p", 0.0))  # fmt: skip

    def set_rank(self, k: int) -> None:
        """Use the first k LoRA components (clipped to the capacity): scale 0 switches the others off."""
        k = max(0, min(int(k), self.lora_rank))
        self.active_rank = k
        self.rank_scale.zero_()
        self.rank_scale[:k] = self.lora_scale

    def delta_weight(self) -> torch.Tensor:
        """M ⊙ (B diag(scale) A), fp32 [out, in]: zero wherever the base is pruned."""
        return super().delta_weight() * self.mask

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """base + M ⊙ (B diag(scale) A) in the base dtype (the base itself while the delta is merged into it)."""
        return self.base.to_dense() if self.merged else super().merged_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in]. The masked product M ⊙ (B A) is dense [out, in]: it cannot be applied through the factors,
        # and its gradient (gᵀx) ⊙ M is one weight-sized GEMM per step, LoSA's cost over LoRA's. Without dropout it
        # is added to the base weight so the forward stays one GEMM.
        k = self.active_rank
        if k == 0 or self.merged:
            y = self.base(x)
            return y if self.bias is None else y + self.bias
        delta = (self.B_cat[:, :k] * self.rank_scale[:k].to(self.B_cat.dtype)) @ self.A_cat[:k]
        if self.masked_training:
            delta = delta * self.mask
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            y = F.linear(x, (self.base.to_dense().to(delta.dtype) + delta).to(x.dtype))
        else:
            y = self.base(x) + F.linear(self.lora_dropout(x.to(delta.dtype)), delta).to(x.dtype)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the masked delta into the base (W ← W + M ⊙ ΔW); the mask is unchanged by construction."""
        if not self.merged:
            self.base = DenseBase(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the delta back out after the merged base was pruned (by replacing `base`): the new mask is
        base != 0 and the base becomes W_pruned - M_new ⊙ ΔW, so the LoRA factors keep the whole learned update (the
        base keeps the original values on the survivors for Wanda; SparseGPT's reconstruction stays in the base).
        A survivor that lands on exactly 0 counts as pruned, so `mask == (base != 0)` always holds."""
        if not self.merged:
            return
        pruned = self.base.to_dense()
        self.mask = pruned != 0
        base = ((pruned.float() - self.delta_weight()) * self.mask).to(pruned.dtype)
        self.mask = base != 0
        self.base = DenseBase(base)
        self.merged = False

    def to_salr(self) -> SALRLinear:
        """A SALRLinear without adapters whose base is the merged sparse weight (what a LoSA run deploys)."""
        out_dim, in_dim = self.base.shape
        A = self.A_cat.new_zeros(0, in_dim)
        B = self.B_cat.new_zeros(out_dim, 0)
        return SALRLinear(DenseBase(self.merged_weight()), self.bias, A, B, residual_rank=0, lora_scale=0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_rank={self.active_rank}, merged={self.merged}"


def losa_layers(model: nn.Module) -> list[tuple[str, LoSALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoSALinear)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def to_losa(model: nn.Module) -> list[tuple[str, LoSALinear]]:
    """Swap every SALRLinear of `model` (converted without residual) for a LoSALinear, in place."""
    for name, module in list(model.named_modules()):
        if type(module) is SALRLinear:
            _set_submodule(model, name, LoSALinear.from_salr(module))
    return losa_layers(model)


def to_salr(model: nn.Module) -> None:
    """Merge every LoSALinear and replace it by an adapter-free SALRLinear holding the merged sparse weight."""
    for name, module in losa_layers(model):
        _set_submodule(model, name, module.to_salr())


@torch.no_grad()
def sparsity_by_layer(model: nn.Module) -> dict[str, float]:
    """Measured fraction of exact zeros of every LoSA layer's merged weight (SALRLinear's after `to_salr`)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SALRLinear):
            w = module.merged_weight()
            out[name] = float((w == 0).sum()) / w.numel()
    return out

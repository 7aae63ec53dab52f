"""SALR for mixture-of-experts blocks whose experts are fused 3-D parameters (transformers 5 Mixtral, Qwen-MoE).

Such a block holds `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] instead of nn.Linear modules. Each
expert is pruned on its own, stores its base in any salr.bases format (bitmap on disk, like linear layers), and gets
its own residual + LoRA blocks: A_cat [E, r, in], B_cat [E, out, r].
"""

from __future__ import annotations

import torch
from torch import nn

from salr.errors import SALRError
from salr.layer import FusedAdapters

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers-5 experts block with 3-D `gate_up_proj` and `down_proj` parameters."""
    params = dict(module.named_parameters(recurse=False))
    return all(name in params and params[name].dim() == 3 for name in EXPERT_PARAMS)


def check_supported(module: nn.Module, name: str) -> None:
    """Only the standard eager layout is re-implemented; refuse anything else instead of computing wrong outputs."""
    problems = []
    if getattr(module, "is_transposed", False):
        problems.append("transposed weights")
    if not getattr(module, "is_concatenated", True):
        problems.append("interleaved gate/up layout")
    if getattr(module, "has_bias", False) or hasattr(module, "gate_up_proj_bias"):
        problems.append("expert biases")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("post-expert norms")
    if not hasattr(module, "act_fn"):
        problems.append("no act_fn")
    if problems:
        raise SALRError(
            f"experts block {name!r} ({type(module).__name__}) uses {', '.join(problems)}, which salr does not "
            "support yet: exclude it with exclude_modules"
        )


class SALRExpertsProjection(FusedAdapters):
    """One fused expert projection: a frozen base per expert (any salr.bases format, [out, in] each) plus
    per-expert fused adapters A_cat [E, r, in], B_cat [E, out, r]."""

    def __init__(
        self,
        bases: list[nn.Module],
        A_cat: torch.Tensor,
        B_cat: torch.Tensor,
        residual_rank: int,
        lora_scale: float,
        lora_dropout: float = 0.0,
        train_residual: bool = True,
    ) -> None:
        super().__init__(A_cat, B_cat, residual_rank, lora_scale, lora_dropout, train_residual)
        self.bases = nn.ModuleList(bases)
        self.num_experts = len(bases)
        self.out_features, self.in_features = bases[0].shape

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        # x: [T, in] tokens routed to `expert` -> [T, out]
        y = self.bases[expert](x)
        if self.rank > 0:
            y = y + self.adapter_forward(x, self.A_cat[expert], self.B_cat[expert]).to(y.dtype)
        return y

    @property
    def dtype(self) -> torch.dtype:
        return self.bases[0].dtype

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """[E, out, in]: M ⊙ W0 + B diag(s) A per expert, in the base dtype."""
        dense = torch.stack([base.to_dense().float() for base in self.bases])
        return (dense + self.delta_weight()).to(self.dtype)


class SALRExperts(nn.Module):
    """Replaces a fused experts block; same forward signature (hidden_states, top_k_index, top_k_weights)."""

    def __init__(self, original: nn.Module, gate_up_proj: SALRExpertsProjection, down_proj: SALRExpertsProjection):
        super().__init__()
        self.num_experts = gate_up_proj.num_experts
        self.act_fn = original.act_fn
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        # Keep the original block (not as a submodule) with its dense weights released, so merging can hand back
        # the model's own experts class.
        for name in EXPERT_PARAMS:
            setattr(original, name, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))
        self._original = [original]

    @torch.no_grad()
    def to_original(self, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The model's own experts module with merged dense weights (M ⊙ W0 + B diag(s) A per expert), or with the
        3-D `weights` given per parameter name (salr.merge's sparse merges)."""
        original = self._original[0]
        for name in EXPERT_PARAMS:
            weight = weights[name] if weights is not None else getattr(self, name).merged_weight()
            setattr(original, name, nn.Parameter(weight, requires_grad=False))
        return original

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # hidden_states: [T, H]; top_k_index, top_k_weights: [T, k]
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < self.num_experts:
                continue  # padding index used by expert-parallel routing
            token_idx, k_pos = torch.where(top_k_index == expert)
            x = hidden_states[token_idx]
            gate, up = self.gate_up_proj(x, expert).chunk(2, dim=-1)
            y = self.down_proj(self.act_fn(gate) * up, expert)
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        return out

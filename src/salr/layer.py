"""SALRLinear: a frozen sparse base plus one fused low-rank branch holding the residual and LoRA blocks.

    y = base(x) + bias + B_cat @ (scale ⊙ (A_cat @ x))

A_cat = [A_res; A_lora] (r_res + r_lora, in) and B_cat = [B_res, B_lora] (out, r_res + r_lora), so the adapter
branch is two GEMMs however many blocks there are. scale is 1 on the residual block and lora_alpha / r on the
LoRA block. At init B_lora = 0, so the layer computes (M ⊙ W0) x + E_r x. The base is any salr.bases format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedAdapters(nn.Module):
    """The trainable part shared by SALRLinear and the MoE expert projections: A_cat [..., r, in] and
    B_cat [..., out, r] (a leading expert axis for experts), the per-rank scale, LoRA dropout, and the one
    mechanism that freezes the residual block (`train_residual = False`)."""

    def __init__(
        self,
        A_cat: torch.Tensor,
        B_cat: torch.Tensor,
        residual_rank: int,
        lora_scale: float,
        lora_dropout: float = 0.0,
        train_residual: bool = True,
    ) -> None:
        super().__init__()
        self.residual_rank = residual_rank
        self.lora_rank = A_cat.shape[-2] - residual_rank
        self.lora_scale = lora_scale
        self.A_cat = nn.Parameter(A_cat)
        self.B_cat = nn.Parameter(B_cat)
        scale = torch.cat([torch.ones(residual_rank), torch.full((self.lora_rank,), float(lora_scale))])
        # Derived from two numbers and never saved: made on the adapters' device (a conversion on a GPU needs it
        # there), but real even when they are on the meta device, as a checkpoint being loaded builds them.
        device = "cpu" if A_cat.is_meta else A_cat.device
        self.register_buffer("rank_scale", scale.to(device, A_cat.dtype), persistent=False)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._freeze_hooks: list = []
        self.train_residual = train_residual

    @property
    def train_residual(self) -> bool:
        return not self._freeze_hooks

    @train_residual.setter
    def train_residual(self, value: bool) -> None:
        # The paper's ablation: the residual block stays at its SVD init because its gradient is zero. Exact for any
        # optimizer without weight decay on these rows (salr.train refuses weight decay with a frozen residual).
        for handle in self._freeze_hooks:
            handle.remove()
        self._freeze_hooks = []
        if not value and self.residual_rank > 0:
            self._freeze_hooks = [
                self.A_cat.register_hook(self._zero_residual_rows),
                self.B_cat.register_hook(self._zero_residual_cols),
            ]

    def _zero_residual_rows(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[..., : self.residual_rank, :] = 0
        return grad

    def _zero_residual_cols(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[..., : self.residual_rank] = 0
        return grad

    @property
    def rank(self) -> int:
        return self.residual_rank + self.lora_rank

    def adapter_forward(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """((x A.T) * scale) B.T for one 2-D pair A [r, in], B [out, r]: x [..., in] -> [..., out], adapter dtype."""
        x = x.to(A.dtype)
        if self.training and self.lora_rank > 0 and not isinstance(self.lora_dropout, nn.Identity):
            # Dropout may only touch the LoRA input: the residual block must reconstruct E_r exactly.
            r = self.residual_rank
            h = torch.cat([F.linear(x, A[:r]), F.linear(self.lora_dropout(x), A[r:])], dim=-1)
        else:
            h = F.linear(x, A)
        # rank_scale in h's dtype: a non-persistent buffer is left as it was by casts that follow from_pretrained's
        # rule (salr.loaders.cast_weights keeps RoPE's inv_freq in fp32), while A and B are cast
        return F.linear(h * self.rank_scale.to(h.dtype), B)

    def delta_weight(self) -> torch.Tensor:
        """B_cat diag(scale) A_cat in fp32 ([out, in], or [E, out, in] for experts): what the adapters add."""
        return (self.B_cat.float() * self.rank_scale.float()) @ self.A_cat.float()


class SALRLinear(FusedAdapters):
    """Drop-in replacement for nn.Linear: frozen `base` (+ bias) and a trainable fused `A_cat` / `B_cat`."""

    def __init__(
        self,
        base: nn.Module,
        bias: torch.Tensor | None,
        A_cat: torch.Tensor,
        B_cat: torch.Tensor,
        residual_rank: int,
        lora_scale: float,
        lora_dropout: float = 0.0,
        train_residual: bool = True,
    ) -> None:
        super().__init__(A_cat, B_cat, residual_rank, lora_scale, lora_dropout, train_residual)
        self.base = base
        self.out_features, self.in_features = base.shape
        self.register_buffer("bias", None if bias is None else bias.detach())

    @property
    def weight(self) -> torch.Tensor:
        """The dense frozen base (masked W0), for code that inspects `.weight` of linear layers."""
        return self.base.to_dense()

    def _fused_decode(self, x: torch.Tensor) -> torch.Tensor | None:
        # Inference on a bitmap base: one native call for the whole layer (the CPU kernel of salr::salr_linear)
        # instead of ~6 small ops whose dispatch costs more than their arithmetic when decoding a token at a time.
        # Runs ~200 times per generated token, hence the direct dict lookups (nn.Module.__getattr__ costs ~1 us).
        fused = getattr(self._modules["base"], "fused_linear", None)
        if fused is None or not x.is_cpu or (self.training and self.lora_rank > 0):
            return None
        A, B = self._parameters["A_cat"], self._parameters["B_cat"]
        if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
            return None
        if torch.compiler.is_compiling():
            return None
        return fused(x, A, B, self.residual_rank, self.lora_scale, self._buffers["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._fused_decode(x)
        if y is not None:
            return y
        y = self.base(x)
        if self.bias is not None:
            y = y + self.bias
        if self.rank > 0:
            y = y + self.adapter_forward(x, self.A_cat, self.B_cat).to(y.dtype)
        # Row-major like nn.Linear's output: a base may compute [out, tokens] and return its transpose, which model
        # code that reinterprets the last dimension (DeepSeek-V2's view_as_complex for RoPE) cannot take.
        return y.contiguous()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """Dense M ⊙ W0 + B_cat diag(scale) A_cat, in the base dtype, for export."""
        return (self.base.to_dense().float() + self.delta_weight()).to(self.base.dtype)

    def to_linear(self) -> nn.Linear:
        """An nn.Linear with the merged weight (adapters folded in)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, residual_rank={self.residual_rank}, "
            f"lora_rank={self.lora_rank}, lora_scale={self.lora_scale:g}, train_residual={self.train_residual}"
        )

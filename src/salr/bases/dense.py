"""`DenseBase`: a frozen base weight stored dense, pruned entries as zeros (what `convert` builds first)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseBase(nn.Module):
    """Frozen base weight [out, in] as a dense buffer `weight`; forward(x) = x @ W.T (no bias)."""

    format = "dense"
    saved_names = ("weight",)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach())

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> DenseBase:
        return cls(weight)

    @classmethod
    def empty(cls, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str = "meta") -> DenseBase:
        return cls(torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    def empty_for_saved(cls, shape: tuple[int, int], tensors: dict[str, torch.Tensor], prefix: str) -> DenseBase:
        """A meta-device structure that `load_state_dict(assign=True)` fills with the saved `{prefix}weight`."""
        return cls.empty(shape, tensors[prefix + "weight"].dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def to_dense(self) -> torch.Tensor:
        return self.weight

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

"""Frozen-base formats: how a SALR layer stores and multiplies its pruned, frozen weight M ⊙ W0.

Every format is an nn.Module with the `FrozenBase` interface, so SALRLinear and the MoE expert projections hold
any of them and never branch on the format:
  dense.DenseBase                       dense tensor, zeros in place (what `convert` builds)
  bitmap.BitmapBase                     1 bit per weight + packed kept values, salr::bitmap_linear kernels
  qbitmap.QBitmapBase                   1 bit per weight + kept values quantized (NF4 / int8 blockwise, QSALR),
                                        salr::qbitmap_linear kernels
  semi_structured.SemiStructuredBase    2:4 on sparse tensor cores (CUDA, runtime only: saves as dense)
`pack` turns a base into another stored format; `base_for_saved` rebuilds the empty structure a checkpoint's tensors
fit, chosen by the tensor names the checkpoint holds (never by a string looked up in a config).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from salr.bases.bitmap import BitmapBase
from salr.bases.dense import DenseBase
from salr.bases.qbitmap import QBitmapBase
from salr.errors import SALRError

STORED_FORMATS: dict[str, type[nn.Module]] = {"dense": DenseBase, "bitmap": BitmapBase, "qbitmap": QBitmapBase}


@runtime_checkable
class FrozenBase(Protocol):
    """What a SALR layer needs from its base. `forward(x)`: x [..., in] -> x @ W.T [..., out] in x.dtype, no bias.
    Optional: `fused_linear(x, A, B, residual_rank, lora_scale, bias)` computing the whole layer in one call, or
    None where that path does not apply (see BitmapBase)."""

    format: str
    saved_names: tuple[str, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def to_dense(self) -> torch.Tensor: ...

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def nbytes(self) -> int: ...


def pack(base: nn.Module, fmt: str) -> nn.Module:
    """`base` stored in format `fmt` ("dense" or "bitmap"); the same weight, so outputs are unchanged.

    A quantized base is already a bitmap and stays as it is for "bitmap"; "dense" stores its dequantized weight.
    Quantizing is a conversion choice (SALRConfig.quant), so "qbitmap" accepts only bases that are quantized."""
    if fmt not in STORED_FORMATS:
        raise SALRError(f"unknown base format {fmt!r}: choose one of {', '.join(STORED_FORMATS)}")
    if base.format == fmt or (base.format == "qbitmap" and fmt == "bitmap"):
        return base
    if fmt == "qbitmap":
        raise SALRError("a base is quantized when it is converted: use SALRConfig(quant='nf4' or 'int8')")
    return STORED_FORMATS[fmt].from_dense(base.to_dense())


def base_for_saved(shape: tuple[int, int], tensors: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """The empty (meta) base whose tensors `{prefix}<name>` are in `tensors`, for `load_state_dict(assign=True)`."""
    for cls in (QBitmapBase, BitmapBase, DenseBase):
        if all(prefix + name in tensors for name in cls.saved_names):
            return cls.empty_for_saved(shape, tensors, prefix)
    raise SALRError(f"no saved base weight under {prefix!r}: the checkpoint is incomplete or from another version")


__all__ = ["BitmapBase", "DenseBase", "FrozenBase", "QBitmapBase", "STORED_FORMATS", "base_for_saved", "pack"]

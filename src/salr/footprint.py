"""Bytes of a model as deployed, so methods that compress differently are read against the same size measure.

Every value counts at one dtype (bf16 by default). A 2-D weight is stored dense or as a bitmap (1 bit per weight,
rows padded to bytes, plus the kept values: salr.bitmap_format), whichever is smaller, so a dense weight costs its
dense bytes and a 50 % sparse one 9 bits per weight. A SALR layer deploys as its base plus its adapters, or merged
into one dense weight when that is smaller (a dense LoRA merges for free; merging into a sparse base fills it).
A LoSA model is merged by construction: plain sparse weights, no adapters. A quantized base (QSALR, QLoRA) deploys
as what it stores: the format's payload (bitmap + 4- or 8-bit codes + block scales, `ideal_nbytes`); merging its
adapters would dequantize it, so it is never counted merged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from salr.bases.qbitmap import QBitmapBase
from salr.layer import SALRLinear


def tensor_bytes(tensor: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one tensor at `dtype`: a 2-D weight dense or as a bitmap, whichever is smaller."""
    value = torch.finfo(dtype).bits // 8
    dense = tensor.numel() * value
    if tensor.dim() != 2:
        return dense
    bitmap = tensor.shape[0] * math.ceil(tensor.shape[1] / 8) + int(torch.count_nonzero(tensor)) * value
    return min(dense, bitmap)


@torch.no_grad()
def deployed_bytes(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """{"total", "adapters", "dense": the same model's dense bytes (no adapters)} at `dtype` (module docstring).

    Parameters shared by several modules (tied embeddings) count once; non-persistent buffers (RoPE tables) not at
    all."""
    value = torch.finfo(dtype).bits // 8
    layers = [m for m in model.modules() if isinstance(m, SALRLinear)]
    inside = {id(t) for m in layers for t in (*m.parameters(), *m.buffers())}
    total = adapters = dense = 0
    for layer in layers:
        quantized = isinstance(layer.base, QBitmapBase)  # counted as stored: no need to dequantize it
        stored = layer.base.ideal_nbytes() if quantized else tensor_bytes(layer.base.to_dense(), dtype)
        extra = (layer.A_cat.numel() + layer.B_cat.numel()) * value if layer.rank else 0
        merged = math.prod(layer.base.shape) * value
        if extra and not quantized and merged <= stored + extra:
            total += merged
        else:
            total, adapters = total + stored + extra, adapters + extra
        dense += merged
        if layer.bias is not None:
            total, dense = total + layer.bias.numel() * value, dense + layer.bias.numel() * value
    for param in model.parameters():
        if id(param) not in inside:
            total += tensor_bytes(param, dtype)
            dense += param.numel() * value
    return {"total": total, "adapters": adapters, "dense": dense}

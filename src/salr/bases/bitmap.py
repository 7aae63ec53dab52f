"""`BitmapBase`: the frozen, pruned base weight of one linear layer, stored as a bitmap (salr.bitmap_format)."""

from __future__ import annotations

import math

import torch
from torch import nn

from salr import bitmap_format
from salr.errors import SALRError
from salr.ops import bitmap_linear
from salr.ops import cpu as cpu_kernel


class BitmapBase(nn.Module):
    """Frozen base weight W (out, in) in bitmap form; `forward(x) = x @ W.T` (no bias) via `salr::bitmap_linear`.

    Buffers (persistent, so they are in the state_dict): `bitmask` uint8 [out, ceil(in/8)], `values` 1-D
    (bf16/fp16/fp32), `row_offsets` int64 [out]. `.to(dtype)` casts only `values`; `.to(device)` moves all three.
    """

    format = "bitmap"
    saved_names = ("bitmask", "values", "row_offsets")

    def __init__(self, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, shape: tuple[int, int]):
        super().__init__()
        self.rows, self.cols = (int(s) for s in shape)
        if tuple(bitmask.shape) != (self.rows, math.ceil(self.cols / 8)):
            raise SALRError(f"bitmask shape {list(bitmask.shape)} does not match weight shape {list(shape)}")
        self.register_buffer("bitmask", bitmask)
        self.register_buffer("values", values)
        self.register_buffer("row_offsets", row_offsets)
        self.register_load_state_dict_post_hook(_validate_after_load)

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> BitmapBase:
        """Compress a dense (out, in) weight; its zeros are the pruned entries. Values keep the weight's dtype."""
        bw = bitmap_format.encode(weight)
        return cls(bw.bitmask, bw.values, bw.row_offsets, bw.shape)

    @classmethod
    def from_bitmap(cls, bw: bitmap_format.BitmapWeight) -> BitmapBase:
        return cls(bw.bitmask, bw.values, bw.row_offsets, bw.shape)

    @classmethod
    def empty(
        cls, shape: tuple[int, int], nnz: int, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
    ) -> BitmapBase:
        """Uninitialised structure for `load_state_dict` (or meta tensors for `load_state_dict(assign=True)`)."""
        rows, cols = shape
        return cls(
            torch.empty(rows, math.ceil(cols / 8), dtype=torch.uint8, device=device),
            torch.empty(nnz, dtype=dtype, device=device),
            torch.empty(rows, dtype=torch.int64, device=device),
            shape,
        )

    @classmethod
    def empty_for_saved(cls, shape: tuple[int, int], tensors: dict[str, torch.Tensor], prefix: str) -> BitmapBase:
        """A meta-device structure that `load_state_dict(assign=True)` fills with the saved `{prefix}values` etc."""
        values = tensors[prefix + "values"]
        return cls.empty(shape, values.numel(), values.dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out], in x.dtype
        return bitmap_linear(x, self.bitmask, self.values, self.row_offsets, self.rows, self.cols)

    def fused_linear(
        self,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        residual_rank: int,
        lora_scale: float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The whole SALR layer `base(x) + ((x A.T) * scale) B.T + bias` in one native call for a few tokens on the
        CPU (decode), or None where that path does not apply. No autograd: call it only when no gradient is needed.
        This is the CPU kernel of `salr::salr_linear` called without the dispatcher (30-45 us a call, measured)."""
        buffers = self._buffers  # hot path: skip nn.Module.__getattr__
        return cpu_kernel.salr_linear_decode(
            x, buffers["bitmask"], buffers["values"], buffers["row_offsets"], self.rows, self.cols, A, B,
            residual_rank, lora_scale, bias,
        )  # fmt: skip

    def to_dense(self) -> torch.Tensor:
        """Dense (out, in) weight in the values' dtype."""
        return bitmap_format.decode(self.bitmap())

    def bitmap(self) -> bitmap_format.BitmapWeight:
        return bitmap_format.BitmapWeight(self.bitmask, self.values, self.row_offsets, self.shape)

    def validate(self) -> None:
        """Raise SALRError unless the buffers are a consistent bitmap weight (one pass over the bitmap)."""
        bitmap_format.validate(self.bitmask, self.values, self.row_offsets, self.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored buffers (bitmap + values + row offsets)."""
        return sum(b.numel() * b.element_size() for b in (self.bitmask, self.values, self.row_offsets))

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.rows * self.cols)
        return f"shape=({self.rows}, {self.cols}), dtype={self.dtype}, density={density:.3f}"


def _validate_after_load(module: BitmapBase, incompatible_keys) -> None:
    # Loading fills the buffers in place; a checkpoint whose tensors disagree must fail here, not in a kernel.
    if module.values.device.type != "meta":
        module.validate()

"""The bitmap sparse format of a frozen base weight: the only encoder, decoder and validator.

The layout is the compressed-tensors "sparse-bitmask" layout (docs/format.md), for a 2-D weight W [rows, cols]:
  bitmask      uint8 [rows, ceil(cols/8)]: bit (c % 8) of byte [r, c // 8] is set iff W[r, c] != 0 (LSB first,
               numpy.packbits(..., axis=-1, bitorder="little"); the padding bits of a row's last byte are 0)
  compressed   1-D, the weight dtype (bf16, fp16 or fp32): the nonzeros in row-major order
  row_offsets  int64 [rows]: index in `compressed` of each row's first nonzero
  shape        int64 [2]: (rows, cols)
Entries equal to zero (including -0.0) are the pruned ones; they are not stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from salr.errors import SALRError

VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TENSOR_NAMES = ("bitmask", "compressed", "row_offsets", "shape")

_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


@dataclass(frozen=True)
class BitmapWeight:
    """A 2-D weight in bitmap form; `values` is the format's `compressed` tensor."""

    bitmask: torch.Tensor
    values: torch.Tensor
    row_offsets: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the three tensors (bitmap + values + row offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.bitmask, self.values, self.row_offsets))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], LSB first (numpy.packbits(bitorder="little") per row)."""
    rows, cols = mask.shape
    nbytes = math.ceil(cols / 8)
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, nbytes * 8 - cols))
    bits = padded.reshape(rows, nbytes, 8) * _BIT_WEIGHTS.to(mask.device)
    return bits.sum(-1, dtype=torch.uint8)  # distinct bits: the sum never exceeds 255


def unpack_mask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, ceil(cols/8)] -> bool [rows, cols]; the inverse of `pack_mask`."""
    rows, nbytes = bitmask.shape
    bits = (bitmask.unsqueeze(-1) & _BIT_WEIGHTS.to(bitmask.device)) != 0
    return bits.reshape(rows, nbytes * 8)[:, :cols]


def encode(weight: torch.Tensor) -> BitmapWeight:
    """Bitmap form of a 2-D weight; its zeros are the pruned entries. Values keep the weight's dtype."""
    if weight.dim() != 2:
        raise SALRError(f"bitmap encoding needs a 2-D weight (out, in), got shape {list(weight.shape)}")
    if weight.dtype not in VALUE_DTYPES:
        raise SALRError(f"bitmap values must be bf16, fp16 or fp32, got {weight.dtype}: cast the weight first")
    weight = weight.detach()
    mask = weight != 0
    counts = mask.sum(1)
    row_offsets = (torch.cumsum(counts, 0) - counts).to(torch.int64)
    return BitmapWeight(pack_mask(mask), weight[mask].contiguous(), row_offsets, tuple(weight.shape))


def decode(bw: BitmapWeight) -> torch.Tensor:
    """Dense [rows, cols] weight in the values' dtype, zeros where the bitmap is clear."""
    return decode_dense(bw.bitmask, bw.values, *bw.shape)


def decode_dense(bitmask: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Dense [rows, cols] from the raw tensors (row offsets are implied by the bitmap and not needed)."""
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense[unpack_mask(bitmask, cols)] = values
    return dense


def byte_popcounts(bitmask: torch.Tensor) -> torch.Tensor:
    """int64, the bitmask's shape: number of set bits of each byte."""
    return _POPCOUNT.to(bitmask.device)[bitmask.long()]


def row_counts(bitmask: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: number of set bits in each row of a bitmap."""
    return byte_popcounts(bitmask).sum(1)


def check_operands(
    bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, rows: int, cols: int
) -> None:
    """Cheap checks of dtypes, shapes and devices (no pass over the data; `validate` does that once at load).

    Every kernel calls this before touching raw pointers."""
    if values.dtype not in VALUE_DTYPES:
        raise SALRError(f"bitmap values must be bf16, fp16 or fp32, got {values.dtype}")
    if bitmask.dtype != torch.uint8:
        raise SALRError(f"bitmask must be uint8, got {bitmask.dtype}")
    if tuple(bitmask.shape) != (rows, math.ceil(cols / 8)):
        raise SALRError(
            f"bitmask shape {list(bitmask.shape)} does not match weight shape {[rows, cols]}: "
            f"expected {[rows, math.ceil(cols / 8)]}"
        )
    if row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (rows,):
        raise SALRError(f"row_offsets must be int64 [{rows}], got {row_offsets.dtype} {list(row_offsets.shape)}")
    if values.dim() != 1:
        raise SALRError(f"values must be 1-D (the packed nonzeros), got shape {list(values.shape)}")
    if not bitmask.device == values.device == row_offsets.device:
        raise SALRError(
            f"bitmask, values and row_offsets must be on one device, got {bitmask.device}, {values.device}, "
            f"{row_offsets.device}"
        )


def validate(bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, shape: tuple[int, int]) -> None:
    """Raise SALRError unless the three tensors are a consistent bitmap weight of `shape`. Costs one bitmap pass."""
    if len(shape) != 2 or min(shape) < 0:
        raise SALRError(f"bitmap shape must be (rows, cols), got {shape}")
    rows, cols = (int(s) for s in shape)
    check_operands(bitmask, values, row_offsets, rows, cols)
    if cols % 8 and rows and bool((bitmask[:, -1] >> (cols % 8)).any()):
        raise SALRError(f"bitmask has bits set beyond column {cols} (row padding must be zero): the file is corrupt")
    counts = row_counts(bitmask)
    total = int(counts.sum())
    if total != values.numel():
        raise SALRError(
            f"bitmask marks {total} nonzeros but there are {values.numel()} values: the file is corrupt "
            "or the tensors come from different weights"
        )
    expected = torch.cumsum(counts, 0) - counts
    if not torch.equal(row_offsets.cpu(), expected.cpu()):
        bad = int((row_offsets.cpu() != expected.cpu()).nonzero()[0, 0])
        raise SALRError(
            f"row_offsets disagree with the bitmask (first at row {bad}: {int(row_offsets[bad])} != "
            f"{int(expected[bad])}): the file is corrupt"
        )


def to_tensors(bw: BitmapWeight, prefix: str = "") -> dict[str, torch.Tensor]:
    """Named tensors for safetensors: `{prefix}bitmask`, `compressed`, `row_offsets`, `shape` (compressed-tensors
    names; use prefix "model.layers.0.mlp.up_proj.weight." for its per-weight naming)."""
    return {
        f"{prefix}bitmask": bw.bitmask.contiguous(),
        f"{prefix}compressed": bw.values.contiguous(),
        f"{prefix}row_offsets": bw.row_offsets.contiguous(),
        f"{prefix}shape": torch.tensor(bw.shape, dtype=torch.int64),
    }


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str = "") -> BitmapWeight:
    """Inverse of `to_tensors`, validated: raises SALRError for missing names or inconsistent tensors."""
    missing = [f"{prefix}{n}" for n in TENSOR_NAMES if f"{prefix}{n}" not in tensors]
    if missing:
        raise SALRError(f"bitmap weight is missing tensors {missing}")
    shape_t = tensors[f"{prefix}shape"]
    if shape_t.dtype not in (torch.int32, torch.int64) or shape_t.numel() != 2:
        raise SALRError(f"{prefix}shape must hold 2 integers (rows, cols), got {shape_t.dtype} {list(shape_t.shape)}")
    shape = (int(shape_t[0]), int(shape_t[1]))
    bitmask, values, offsets = (tensors[f"{prefix}{n}"] for n in ("bitmask", "compressed", "row_offsets"))
    validate(bitmask, values, offsets, shape)
    return BitmapWeight(bitmask, values, offsets, shape)


def dense_nbytes(shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the dense weight."""
    return shape[0] * shape[1] * torch.finfo(dtype).bits // 8


def ideal_bitmap_nbytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the format's payload: the bitmap (1 bit/weight, rows padded to bytes) plus the kept values.
    Row offsets (8 bytes/row) are excluded: they can be rebuilt from the bitmap."""
    return shape[0] * math.ceil(shape[1] / 8) + nnz * torch.finfo(dtype).bits // 8

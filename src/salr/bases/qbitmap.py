"""`QBitmapBase`: a frozen, pruned base weight whose kept values are quantized (QSALR: NF4 or int8 blockwise), stored
as a bitmap + codes + block scales (salr.bitmap_format, docs/format.md)."""

from __future__ import annotations

import torch
from torch import nn

from salr import bitmap_format
from salr.bitmap_format import QBitmapWeight, QuantizedValues
from salr.errors import SALRError
from salr.ops import cpu as cpu_kernel
from salr.ops import qbitmap_linear


class QBitmapBase(nn.Module):
    """Frozen base weight W (out, in) with quantized kept values; `forward(x) = x @ W.T` (no bias) through
    `salr::qbitmap_linear`. W is the exact fp32 dequantization (NF4[code] * absmax); `dtype` is the weight's own
    dtype, what `to_dense` returns.

    Buffers (all persistent, so they are in the state_dict): `bitmask` uint8, `row_offsets` int64, `codes` (uint8 NF4
    or int8), `quant_meta` int64 [4], and either `absmax` fp32 or, with double quantization, `qabsmax` uint8,
    `nested_absmax` fp32 and `offset` fp32 [1]. Moves (`.to(device)`) move them all; dtype casts (`.to(dtype)`,
    `.half()`) change only `dtype`: codes and scales are the format and never change.
    """

    format = "qbitmap"
    saved_names = bitmap_format.QUANT_TENSOR_NAMES

    def __init__(self, qw: QBitmapWeight):
        super().__init__()
        self.rows, self.cols = (int(s) for s in qw.shape)
        self.register_buffer("bitmask", qw.bitmask)
        self.register_buffer("row_offsets", qw.row_offsets)
        self.register_buffer("codes", qw.q.codes)
        self.register_buffer("quant_meta", bitmap_format.quant_meta(qw.q, qw.dtype).to(qw.bitmask.device))
        for name in bitmap_format.SCALE_NAMES:
            self.register_buffer(name, getattr(qw.q, name))
        self._set_meta(qw.q.kind, qw.q.blocksize, qw.dtype, qw.q.n)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _set_meta(self, kind: str, blocksize: int, dtype: torch.dtype, n: int) -> None:
        self.kind, self.blocksize, self._dtype, self.n = kind, blocksize, dtype, n
        # the effective fp32 block scales the kernels use: absmax itself, or double quantization undone once
        real = self.codes.device.type != "meta"
        self._dq_scales = self.quantized().scales() if self.qabsmax is not None and real else None

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        kind: str = "nf4",
        blocksize: int = bitmap_format.QUANT_BLOCKSIZE,
        double_quant: bool = False,
    ) -> QBitmapBase:
        """Quantize the kept values (`mask`, default weight != 0) of a dense (out, in) weight."""
        return cls(bitmap_format.encode_quantized(weight, mask, kind, blocksize, double_quant))

    @classmethod
    def empty_for_saved(cls, shape: tuple[int, int], tensors: dict[str, torch.Tensor], prefix: str) -> QBitmapBase:
        """A meta-device structure that `load_state_dict(assign=True)` fills with the saved `{prefix}codes` etc."""
        named = {
            n: tensors[prefix + n] for n in (*cls.saved_names, *bitmap_format.SCALE_NAMES) if prefix + n in tensors
        }
        meta = {n: torch.empty_like(t, device="meta") for n, t in named.items() if n != "quant_meta"}
        kind, blocksize, double_quant, dtype = bitmap_format.parse_quant_meta(named["quant_meta"])
        scales = {n: meta.get(n) for n in bitmap_format.SCALE_NAMES}
        q = QuantizedValues(kind, meta["codes"], 0, blocksize, **scales)
        return cls(QBitmapWeight(meta["bitmask"], meta["row_offsets"], shape, q, dtype))

    def quantized(self) -> QuantizedValues:
        """The quantized kept values as a bitmap_format.QuantizedValues (views of the buffers)."""
        scales = {name: getattr(self, name) for name in bitmap_format.SCALE_NAMES}
        return QuantizedValues(self.kind, self.codes, self.n, self.blocksize, **scales)

    def qweight(self) -> QBitmapWeight:
        return QBitmapWeight(self.bitmask, self.row_offsets, self.shape, self.quantized(), self._dtype)

    @property
    def scales(self) -> torch.Tensor:
        """fp32 [nblocks]: the block scales dequantization uses (double quantization undone)."""
        return self._dq_scales if self._dq_scales is not None else self.absmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out], in x.dtype
        return qbitmap_linear(
            x, self.bitmask, self.codes, self.scales, self.row_offsets, self.rows, self.cols, self.blocksize
        )

    def fused_linear(
        self,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        residual_rank: int,
        lora_scale: float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The whole SALR layer in one native call for a few tokens on the CPU (see BitmapBase.fused_linear), or None
        where that path does not apply. No autograd."""
        buffers = self._buffers  # hot path: skip nn.Module.__getattr__
        scales = self._dq_scales if self._dq_scales is not None else buffers["absmax"]
        return cpu_kernel.qsalr_linear_decode(
            x, buffers["bitmask"], buffers["codes"], scales, buffers["row_offsets"], self.rows, self.cols,
            self.blocksize, self.n, A, B, residual_rank, lora_scale, bias,
        )  # fmt: skip

    def dequantize(self) -> torch.Tensor:
        """Dense (out, in) fp32 weight: the exact dequantized values, zeros where pruned."""
        return bitmap_format.decode_quantized(self.qweight(), torch.float32)

    def to_dense(self) -> torch.Tensor:
        """Dense (out, in) weight in `dtype` (the fp32 dequantization rounded once)."""
        return self.dequantize().to(self._dtype)

    def validate(self) -> None:
        """Raise SALRError unless the buffers are a consistent quantized bitmap weight."""
        bitmap_format.validate_quantized(self.bitmask, self.row_offsets, self.shape, self.quantized())

    def _apply(self, fn, recurse: bool = True):
        # Device moves apply to every buffer; dtype casts would corrupt the fp32 scales, so floating buffers travel
        # as their int32 bit patterns (casts leave integer tensors alone) and only `dtype` follows the cast.
        probe = fn(torch.empty(0, dtype=self._dtype))
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = fn(buf.view(torch.int32)).view(buf.dtype) if buf.is_floating_point() else fn(buf)
        if self._dq_scales is not None:
            self._dq_scales = fn(self._dq_scales.view(torch.int32)).view(torch.float32)
        if probe.is_floating_point() and probe.dtype != self._dtype:
            self._dtype = probe.dtype
            self.quant_meta[3] = bitmap_format.DTYPE_CODES[probe.dtype]
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def nnz(self) -> int:
        """Kept weights (the bitmap's popcount), including any whose value quantized to 0."""
        return self.n

    @property
    def nbytes(self) -> int:
        """Bytes of the stored buffers (bitmap + row offsets + codes + scales + metadata)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)

    def ideal_nbytes(self) -> int:
        """The format's payload: bitmap + codes + scales (row offsets and metadata excluded)."""
        return bitmap_format.ideal_quantized_nbytes(self.shape, self.n, self.kind, self.blocksize, self.double_quant)

    def extra_repr(self) -> str:
        density = self.n / max(1, self.rows * self.cols)
        dq = ", double_quant" if self.double_quant else ""
        return f"shape=({self.rows}, {self.cols}), {self.kind}, blocksize={self.blocksize}{dq}, density={density:.3f}"


def _refresh_after_load(module: QBitmapBase, incompatible_keys) -> None:
    # Loading replaces the buffers: re-read the metadata, count the kept values, check the tensors, and undo the
    # double quantization once; a checkpoint whose tensors disagree fails here, not in a kernel.
    if module.codes.device.type == "meta":
        return
    kind, blocksize, double_quant, dtype = bitmap_format.parse_quant_meta(module.quant_meta)
    if double_quant != (module.qabsmax is not None):
        raise SALRError("quant_meta disagrees with the saved scale tensors: the checkpoint is corrupt")
    module.kind, module.blocksize = kind, blocksize
    module.n = int(bitmap_format.row_counts(module.bitmask).sum())
    module.validate()
    module._set_meta(kind, blocksize, dtype, module.n)

"""2:4 sparse base on GPU through PyTorch semi-structured sparse tensors (cuSPARSELt, else CUTLASS).

A 2:4 weight (at most 2 nonzeros in every group of 4 consecutive input columns) stored this way runs on the
sparse tensor cores of Ampere and newer GPUs (compute capability >= 8.0) in fp16/bf16. Anywhere else
`SemiStructuredBase` falls back to a plain dense F.linear and logs why, so callers never need to branch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from salr.errors import SALRError

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
# weight [rows, cols] must be a positive multiple of these (torch.sparse.semi_structured, sparse_min_rows/cols)
SHAPE_MULTIPLE = {"cusparselt": (16, 16), "cutlass": (32, 64)}


def check_2to4(weight: torch.Tensor) -> None:
    """Raise SALRError unless every group of 4 consecutive columns of weight [rows, cols] has at most 2 nonzeros."""
    if weight.dim() != 2:
        raise SALRError(f"a 2:4 weight must be 2-D [out, in], got shape {list(weight.shape)}")
    rows, cols = weight.shape
    if cols % 4:
        raise SALRError(f"a 2:4 weight needs in_features divisible by 4, got {cols}; prune with --pattern 2:4")
    per_group = (weight != 0).reshape(rows, cols // 4, 4).sum(-1)
    bad = int((per_group > 2).sum())
    if bad:
        raise SALRError(
            f"weight is not 2:4 sparse: {bad} of {per_group.numel()} groups of 4 columns have more than 2 nonzeros; "
            "prune it with the 2:4 pattern first"
        )


def support_reason(
    shape: tuple[int, int],
    dtype: torch.dtype,
    device_type: str,
    capability: tuple[int, int] | None,
    backend: str,
) -> str | None:
    """Why a weight of this shape/dtype cannot use semi-structured sparsity here, or None when it can.

    Pure function of its arguments (the hardware facts are passed in) so it can be tested without a GPU.
    `capability` is the CUDA compute capability, None without CUDA; `backend` is "cusparselt" or "cutlass".
    """
    if device_type != "cuda" or capability is None:
        return "semi-structured sparsity needs a CUDA device"
    if tuple(capability) < MIN_CAPABILITY:
        return f"semi-structured sparsity needs compute capability >= 8.0, this GPU is {capability[0]}.{capability[1]}"
    if dtype not in SUPPORTED_DTYPES:
        return f"semi-structured sparsity here supports fp16/bf16, got {dtype}"
    if len(shape) != 2:
        return f"semi-structured sparsity needs a 2-D weight, got shape {list(shape)}"
    mr, mc = SHAPE_MULTIPLE[backend]
    rows, cols = shape
    if rows < mr or rows % mr or cols < mc or cols % mc:
        return f"{backend} needs a weight whose [rows, cols] are multiples of [{mr}, {mc}], got [{rows}, {cols}]"
    return None


def _backend() -> str:
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"


def semi_structured_available(weight: torch.Tensor) -> tuple[bool, str]:
    """(True, backend) if `weight` can run as a semi-structured sparse tensor on its device, else (False, reason)."""
    capability = torch.cuda.get_device_capability(weight.device) if weight.is_cuda else None
    backend = _backend()
    reason = support_reason(tuple(weight.shape), weight.dtype, weight.device.type, capability, backend)
    return (reason is None, backend if reason is None else reason)


def compress_2to4(weight: torch.Tensor) -> tuple[torch.Tensor, str, str | None]:
    """(weight as a semi-structured sparse tensor, backend, None) where the hardware allows, else
    (the dense weight, "dense", why). Raises SALRError unless `weight` is 2:4."""
    check_2to4(weight)
    weight = weight.detach().contiguous()
    ok, info = semi_structured_available(weight)
    if ok:
        try:
            if info == "cutlass":  # no cuSPARSELt in this build: pick CUTLASS without touching global flags
                return torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense(weight), info, None
            return torch.sparse.to_sparse_semi_structured(weight), info, None
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a torch build without the kernels
            info = f"to_sparse_semi_structured failed: {exc}"
    log.info("2:4 weight %s runs dense: %s", list(weight.shape), info)
    return weight, "dense", info


class SemiStructuredBase(nn.Module):
    """The frozen 2:4 base of a SALRLinear on sparse tensor cores (a FrozenBase, see salr.bases).

    `backend` is "cusparselt", "cutlass" or "dense" (the hardware does not allow it); `reason` says why dense was
    chosen (None otherwise). Its state_dict holds the dense `weight`, exactly like DenseBase's, so a model that uses
    it saves as usual and loads back with dense bases (call `salr.use_semi_structured` after moving it to a GPU).
    """

    format = "semi_structured"
    saved_names = ("weight",)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.rows, self.cols = (int(n) for n in weight.shape)
        self._dtype = weight.dtype
        weight, self.backend, self.reason = compress_2to4(weight)
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cols).to(self._dtype)
        weight = self.weight
        if self.backend != "dense" and torch.is_grad_enabled() and x2.requires_grad:
            # torch's semi-structured matmul has no backward to its dense operand: decompress for this call, so
            # adapters can still be trained over a base converted for inference.
            weight = weight.to_dense()
        return F.linear(x2.contiguous(), weight).reshape(*lead, self.rows)

    def to_dense(self) -> torch.Tensor:
        return self.weight if self.backend == "dense" else self.weight.to_dense()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.to_dense() if keep_vars else self.to_dense().detach()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: the dense weight, or the compressed values + metadata."""
        w = self.weight
        if self.backend == "dense":
            return w.numel() * w.element_size()
        names, _ = w.__tensor_flatten__()
        parts = [getattr(w, n) for n in names]
        return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))

    def extra_repr(self) -> str:
        return f"shape=({self.rows}, {self.cols}), dtype={self._dtype}, backend={self.backend}"

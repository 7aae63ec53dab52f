"""The compressed sparse base: bitmap format (`format`), the `salr::bitmap_linear` op (`ops`), `BitmapBase`.

Names are imported lazily so the kernels can import `salr.sparse.format` without pulling in the op.
"""

import importlib

_EXPORTS = {
    "BitmapBase": "salr.sparse.base",
    "BitmapWeight": "salr.sparse.format",
    "decode": "salr.sparse.format",
    "encode": "salr.sparse.format",
    "from_tensors": "salr.sparse.format",
    "to_tensors": "salr.sparse.format",
    "validate": "salr.sparse.format",
    "bitmap_linear": "salr.sparse.ops",
    "register_cuda_backend": "salr.sparse.ops",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'salr.sparse' has no attribute {name!r}")

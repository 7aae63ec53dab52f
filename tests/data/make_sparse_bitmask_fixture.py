"""How tests/data/sparse_bitmask_ct014.safetensors was made (once; the file is committed and never regenerated).

It was written by compressed-tensors 0.14.0's own sparse-bitmask compressor (the last release that had one), with
the wheel unpacked on PYTHONPATH, not installed:

    pip download --no-deps compressed-tensors==0.14.0 -d /tmp/ct014
    python -m zipfile -e /tmp/ct014/compressed_tensors-0.14.0-py3-none-any.whl /tmp/ct014/x
    cd tests/data && PYTHONPATH=/tmp/ct014/x python make_sparse_bitmask_fixture.py sparse_bitmask_ct014.safetensors

For each weight NAME it holds the dense input `NAME.dense` and the compressor's four tensors `NAME.weight.{shape,
compressed, bitmask, row_offsets}`. tests/test_bitmap_format.py checks salr's encoder against these bytes.
"""

import sys

import compressed_tensors
import torch
from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import BitmaskTensor
from safetensors.torch import save_file


def main(path: str) -> None:
    g = torch.Generator().manual_seed(16)
    out = {}
    weights = {
        "layer.bf16": (5, 19, 0.5, torch.bfloat16),
        "layer.fp16": (4, 8, 0.7, torch.float16),
        "layer.fp32": (3, 33, 0.3, torch.float32),
    }
    for name, (rows, cols, sparsity, dtype) in weights.items():
        w = torch.randn(rows, cols, generator=g) + 0.01
        w[torch.rand(rows, cols, generator=g) < sparsity] = 0
        w[0] = 0  # an empty row
        w[-1, 1] = -0.0  # a negative zero is pruned too
        w = w.to(dtype)
        out[f"{name}.dense"] = w
        out.update(BitmaskTensor.from_dense(w).dict(name_prefix=f"{name}.weight", device="cpu"))
    producer = f"compressed-tensors {compressed_tensors.__version__} BitmaskCompressor"
    save_file(out, path, metadata={"producer": producer})


if __name__ == "__main__":
    main(sys.argv[1])

"""Where the GPU bitmap kernel's time goes, side by side on one CUDA GPU, as JSON:

    python benchmarks/gpu_kernel_paths.py --json out/gpu_kernel_paths.json

For each shape and token count, median ms (triton.testing.do_bench) of y = x @ W.T in bf16 at 50 % sparsity:
  dense           cuBLAS F.linear on the unpruned weight;
  fused           the Triton decode + GEMM kernel (`triton_bitmap_linear` below DENSE_DECODE_MIN_M);
  decode_cublas   W decoded once by `triton_bitmap_decode`, then cuBLAS (the path from DENSE_DECODE_MIN_M up);
  decode_only     `triton_bitmap_decode` alone;
  2to4_<backend>  the 2:4-pruned weight as a torch semi-structured tensor, cuSPARSELt and CUTLASS;
each eagerly (what one Python call costs, host overhead included: do_bench records its events around the call)
and replayed from a CUDA graph (`_graph`: the GPU work alone). Ratios are dense / path: above 1 is faster.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (14336, 4096)]
TOKENS = [1, 16, 32, 64, 128, 2048]  # 32 and 64 bracket the fused vs decode + cuBLAS crossover (DENSE_DECODE_MIN_M)


def _ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _graph_ms(fn: Callable[[], object]) -> float | None:
    """Median ms of `fn` replayed from a CUDA graph (after eager warm-up runs, which also autotune), or None if it
    cannot be captured."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - a path that cannot be captured is reported as such
        return None
    return _ms(graph.replay)


def _semi_structured(w24: torch.Tensor, backend: str) -> torch.Tensor | None:
    try:
        if backend == "cutlass":
            return torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense(w24)
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT.from_dense(w24)
    except Exception:  # noqa: BLE001 - a backend this torch build lacks is left out of the table
        return None


def case(shape: tuple[int, int], tokens: int) -> dict[str, Any]:
    from salr import bitmap_format
    from salr.ops import triton as tb
    from salr.pruning import nm_mask

    torch.manual_seed(0)
    rows, cols = shape
    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
    w_sparse = w * (torch.rand_like(w, dtype=torch.float32) >= 0.5)
    bw = bitmap_format.encode(w_sparse)
    prefix = tb.bitmap_block_prefix(bw.bitmask, cols)
    operands = (bw.bitmask, bw.values, bw.row_offsets, rows, cols, prefix)

    def with_threshold(threshold: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            saved, tb.DENSE_DECODE_MIN_M = tb.DENSE_DECODE_MIN_M, threshold
            try:
                return tb.triton_bitmap_linear(x, *operands[:5], block_prefix=prefix)
            finally:
                tb.DENSE_DECODE_MIN_M = saved

        return run

    paths: dict[str, Callable[[], object]] = {
        "dense": lambda: F.linear(x, w),
        "fused": with_threshold(10**9),
        "decode_cublas": with_threshold(1),
        "decode_only": lambda: tb.triton_bitmap_decode(*operands),
    }
    w24 = (w.float() * nm_mask(w, 2, 4)).to(torch.bfloat16)
    for backend in ("cusparselt", "cutlass"):
        sparse = _semi_structured(w24, backend)
        if sparse is not None:
            paths[f"2to4_{backend}"] = lambda sparse=sparse: F.linear(x, sparse)
    result: dict[str, Any] = {"shape": list(shape), "tokens": tokens}
    for name, fn in paths.items():
        try:
            result[f"{name}_ms"] = _ms(fn)
            result[f"{name}_graph_ms"] = _graph_ms(fn)
        except Exception as exc:  # noqa: BLE001 - keep the other paths' numbers
            result[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
    for name in list(paths)[1:]:  # every path but dense itself
        for suffix in ("_ms", "_graph_ms"):
            if result.get(name + suffix) and result.get("dense" + suffix):
                result[f"{name}{suffix.removesuffix('_ms')}_vs_dense"] = (
                    result["dense" + suffix] / result[name + suffix]
                )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_kernel_paths.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from salr.bench.timing import environment
    from salr.io import atomic_write_json

    cases = []
    for shape in SHAPES:
        for tokens in TOKENS:
            cases.append(case(shape, tokens))
            c = cases[-1]
            print(shape, tokens, {k: round(v, 4) for k, v in c.items() if isinstance(v, float)}, flush=True)
    atomic_write_json(args.json, {"benchmark": "gpu_kernel_paths", "gpu": torch.cuda.get_device_name(),
                                  "cases": cases, "environment": environment()})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compile every Triton kernel of salr for a GPU architecture on a machine without one, and report the shared
memory each compiled variant needs:

    python benchmarks/triton_compile_check.py --json out/compile_sm90.json              # every autotune config
    python benchmarks/triton_compile_check.py --arch 80 --one-config --json OUT         # A100, one config per kernel

Triton lowers a kernel to PTX and runs its own `ptxas` without a GPU; only the launch needs one. This script puts a
stub driver in place (target `cuda:<arch>`, launches do nothing, a compiled kernel above the architecture's shared
memory is refused as Triton refuses it on the device) and calls salr's Triton host wrappers on small CPU tensors,
so every path (few-token split-K, prefill, input gradient, dense decode; bf16/fp16/fp32; bitmap, NF4, int8) is
compiled the way a GPU run would compile it, autotuning included: the autotuner compiles each config and drops the
ones that do not fit. A case none of whose configs fits fails the check (exit code 1). This catches source that does
not compile for the target and configs that outgrow its shared memory before any device time is spent; it says
nothing about speed. It relies on Triton's runtime internals (tested with the pinned Triton 3.9).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

# Compile for the GPU, never interpret: set before triton is imported (the autotune switch is read at import too).
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

# Shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _Utils:
    def __init__(self, max_shared: int) -> None:
        self.max_shared = max_shared

    def get_device_properties(self, device: int) -> dict[str, int]:
        clocks = {"sm_clock_rate": 1980000, "mem_clock_rate": 3201000, "mem_bus_width": 6144}
        return {"max_shared_mem": self.max_shared, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, **clocks}  # fmt: skip

    def load_binary(self, name, kernel, shared, device):  # noqa: ANN001 - Triton's driver interface
        return None, None, 0, 0, 1024

    def unload_module(self, module) -> None:  # noqa: ANN001
        pass


class _StubDriver:
    """Triton's active driver for a GPU that is not there: the target, device 0, stream 0, and a benchmarker that
    runs a kernel call once (which compiles it) and reports 1 ms, so autotuning compiles every config."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(MAX_SHARED[arch])

    def get_current_target(self):  # noqa: ANN201
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_benchmarker(self):  # noqa: ANN201
        def bench(fn, quantiles=None, **kwargs):  # noqa: ANN001, ANN202
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    def get_empty_cache_for_benchmark(self) -> torch.Tensor:
        return torch.empty(16)

    def clear_cache(self, cache: torch.Tensor) -> None:
        pass

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def launcher_cls(src, metadata):  # noqa: ANN001, ANN205
        return lambda *args, **kwargs: None


def install_stub(arch: int) -> list[dict[str, Any]]:
    """Make Triton compile for `arch` with launches as no-ops; returns the list every compiled variant is recorded
    in (name, warps, stages, shared bytes, fits)."""
    from triton.compiler import compiler
    from triton.runtime.driver import driver
    from triton.runtime.errors import OutOfResources

    import salr.ops.triton as tb

    driver.set_active(_StubDriver(arch))
    compiled: list[dict[str, Any]] = []
    limit = MAX_SHARED[arch]

    def init_handles(self) -> None:  # CompiledKernel._init_handles without loading anything on a device
        if self._run is not None:
            return
        md = self.metadata
        fits = md.shared <= limit
        compiled.append({"kernel": self.name, "num_warps": md.num_warps, "num_stages": md.num_stages,
                         "shared_bytes": md.shared, "fits": fits})  # fmt: skip
        if not fits:
            raise OutOfResources(md.shared, limit, "shared memory")
        self._run = lambda *args, **kwargs: None
        self.module = self.function = None
        self.n_regs = self.n_spills = 0

    compiler.CompiledKernel._init_handles = init_handles
    tb.require_kernel_device = lambda t: None  # CPU tensors stand in for CUDA ones: nothing is launched
    return compiled


def _cases(dtypes: list[torch.dtype]) -> list[tuple[str, Any]]:
    """(label, thunk) for every host wrapper path on small operands (one shape divisible by 16, one not)."""
    import salr.ops.triton as tb
    import salr.ops.triton_qbitmap as tq
    from salr import bitmap_format as fm

    g = torch.Generator().manual_seed(0)
    cases = []
    for n, k in ((96, 256), (33, 130)):
        w = torch.randn(n, k, generator=g)
        mask = torch.rand(n, k, generator=g) >= 0.5
        for dt in dtypes:
            bw = fm.encode((w * mask).to(dt))
            ops = (bw.bitmask, bw.values, bw.row_offsets, n, k)
            a, b = torch.randn(8, k, dtype=dt), torch.randn(n, 8, dtype=dt)
            for m in (1, 17, 300):  # split-K few-token, prefill, dense decode + cuBLAS
                x, grad = torch.randn(m, k, dtype=dt), torch.randn(m, n, dtype=dt)
                tag = f"bitmap {n}x{k} {str(dt)[6:]} M={m}"
                cases.append((f"{tag} forward", lambda x=x, ops=ops: tb.triton_bitmap_linear(x, *ops)))

                def adapter(x=x, ops=ops, a=a, b=b):  # noqa: ANN202
                    return tb.triton_bitmap_linear(x, *ops, a_cat=a, b_cat=b)

                cases.append((f"{tag} forward+adapter", adapter))
                cases.append((f"{tag} grad_input", lambda grad=grad, ops=ops: tb.triton_bitmap_grad_input(grad, *ops)))
        for kind in ("nf4", "int8"):
            qw = fm.encode_quantized(w * mask, mask, kind, 64, False)
            qops = (qw.bitmask, qw.q.codes, qw.q.scales(), qw.row_offsets, n, k, 64)
            for dt in dtypes:
                for m in (1, 17, 300):
                    x, grad = torch.randn(m, k, dtype=dt), torch.randn(m, n, dtype=dt)
                    tag = f"{kind} {n}x{k} {str(dt)[6:]} M={m}"
                    cases.append((f"{tag} forward", lambda x=x, q=qops: tq.triton_qbitmap_linear(x, *q)))
                    cases.append(
                        (f"{tag} grad_input", lambda grad=grad, q=qops: tq.triton_qbitmap_grad_input(grad, *q))
                    )
    return cases


def run(arch: int, dtypes: list[torch.dtype], only: str | None = None) -> dict[str, Any]:
    """Compile every case (those whose label contains `only`, if given); per case, the variants compiled for it and
    whether one fitted. Needs triton; no GPU."""
    compiled = install_stub(arch)
    results = []
    for label, call in _cases(dtypes):
        if only and only not in label:
            continue
        start, t0 = len(compiled), time.perf_counter()
        try:
            call()
            error = None
        except Exception as exc:  # noqa: BLE001 - a case that does not compile is reported, the others still run
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
        variants = compiled[start:]
        results.append({"case": label, "seconds": time.perf_counter() - t0, "error": error, "new_variants": variants})
        print(f"{label}: {'FAILED ' + error if error else 'ok'} ({len(variants)} new variants)", flush=True)
    kernels: dict[str, int] = {}
    for v in compiled:
        if v["fits"]:
            kernels[v["kernel"]] = max(kernels.get(v["kernel"], 0), v["shared_bytes"])
    return {"benchmark": "triton_compile_check", "arch": arch, "max_shared_bytes": MAX_SHARED[arch],
            "cases": results, "failed_cases": [r["case"] for r in results if r["error"]],
            "variants_compiled": len(compiled), "variants_over_shared_memory": sum(not v["fits"] for v in compiled),
            "max_shared_bytes_used": kernels}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED), help="compute capability x10")
    p.add_argument("--one-config", action="store_true", help="one config per kernel (SALR_TRITON_AUTOTUNE=0)")
    p.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "float32"], help="default: all")
    p.add_argument("--only", help="only the cases whose label contains this text (e.g. 'nf4', 'M=1 ')")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if args.one_config:
        os.environ["SALR_TRITON_AUTOTUNE"] = "0"
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    dtypes = [getattr(torch, d) for d in (args.dtype or ["bfloat16", "float16", "float32"])]
    report = run(args.arch, dtypes, args.only)
    if args.json:
        from salr.io import atomic_write_json

        atomic_write_json(args.json, report)
    print(f"sm_{args.arch}: {report['variants_compiled']} variants compiled, "
          f"{report['variants_over_shared_memory']} over {MAX_SHARED[args.arch]} B of shared memory (dropped), "
          f"{len(report['failed_cases'])} failed cases; most shared memory used per kernel: "
          f"{report['max_shared_bytes_used']}")  # fmt: skip
    return 1 if report["failed_cases"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Layer kernels timed in CPU time of one thread, for a shared, oversubscribed machine.

`salr bench --kernel` reports wall-clock medians; when other processes keep the cores busy (load average well
above the core count) a process gets a fraction of a core and wall time measures the scheduler more than the
kernel. This script runs everything on one thread and times each call with `time.thread_time()` (CPU time of the
calling thread, which excludes the time it waits for a core), interleaved (A B C ... then reversed), and reports
the minimum and the median of each. Caches and memory bandwidth are still shared with the other processes, so
ratios measured side by side in one run are what to compare.

    python benchmarks/kernel_cpu_time.py --shape 4096x4096 --shape 14336x4096 --tokens 1 --tokens 128 --json OUT
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from salr import bitmap_format, ops
from salr.bench.kernel import parse_shape, pruned_weight
from salr.io import atomic_write_json


def timings(fns: dict, rounds: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for i in range(rounds):
        for name in list(fns) if i % 2 == 0 else list(reversed(fns)):
            t0 = time.thread_time()
            fns[name]()
            samples[name].append(1e3 * (time.thread_time() - t0))
    return {name: {"min_ms": min(s), "median_ms": statistics.median(s)} for name, s in samples.items()}


def case(shape: tuple[int, int], tokens: int, sparsity: float, rounds: int) -> dict:
    rows, cols = shape
    w32 = pruned_weight(rows, cols, sparsity)
    w16 = w32.to(torch.bfloat16)
    bw = bitmap_format.encode(w16)
    x32 = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(1))
    x16 = x32.to(torch.bfloat16)
    fns = {
        "dense_bf16": lambda: F.linear(x16, w16),
        "dense_fp32": lambda: F.linear(x32, w32),
        "bitmap_bf16": lambda: ops.bitmap_linear(x16, bw.bitmask, bw.values, bw.row_offsets, rows, cols),
    }
    for kind in ("nf4", "int8"):
        qw = bitmap_format.encode_quantized(w16, w16 != 0, kind)
        args = (qw.bitmask, qw.q.codes, qw.q.scales(), qw.row_offsets, rows, cols, qw.q.blocksize)
        fns[kind] = lambda args=args: ops.qbitmap_linear(x16, *args)
    with torch.inference_mode():
        ms = timings(fns, rounds)
    ratios = {
        f"{k}_vs_dense_bf16": ms["dense_bf16"]["min_ms"] / ms[k]["min_ms"] for k in ("bitmap_bf16", "nf4", "int8")
    }
    ratios.update({f"{k}_vs_dense_fp32": ms["dense_fp32"]["min_ms"] / ms[k]["min_ms"] for k in ("nf4", "int8")})
    return {"shape": list(shape), "tokens": tokens, "sparsity": sparsity, "ms": ms, "ratios_of_min": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", type=parse_shape)
    p.add_argument("--tokens", action="append", type=int)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = [
        case(shape, m, args.sparsity, args.rounds)
        for shape in args.shape or [(4096, 4096)]
        for m in args.tokens or [1]
    ]
    report = {
        "timing": "time.thread_time() per call, one thread, interleaved rounds; min and median ms",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_isa": ops.cpu.isa(),
        "results": results,
    }
    for r in results:
        line = " ".join(f"{k} {v['min_ms']:.2f}" for k, v in r["ms"].items())
        ratios = " ".join(f"{k} {v:.2f}x" for k, v in r["ratios_of_min"].items())
        print(f"{'x'.join(map(str, r['shape']))} M={r['tokens']}: min ms {line} | {ratios}", flush=True)
    if args.json:
        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()

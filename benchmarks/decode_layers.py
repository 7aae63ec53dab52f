"""Decode-time cost of the converted linears alone: every SALR layer of the default model vs its dense bf16 layer.

One token (M = 1) goes through all converted layers in model order, so the weights stream from memory as they
do when decoding (the model's layers do not fit in cache), with no attention or HF code in between. SALR and
dense sweeps alternate; the ratio is taken per adjacent pair and its median reported, which cancels slow drifts
of a shared machine. Bytes per sweep give the effective bandwidth of each. The dense sweep runs through both of
torch's bf16 paths (oneDNN and its own kernels, `salr.bench.timing.onednn`) and the faster is the baseline.

    python benchmarks/decode_layers.py --json OUT.json                        # rank 64 + 16
    python benchmarks/decode_layers.py --model tinyllama-shape --threads 1 --json OUT.json
    python benchmarks/decode_layers.py --residual-rank 16 --lora-rank 8 --json OUT.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from salr.bench.models import bench_model, salr_copy
from salr.bench.timing import ONEDNN_PATHS, environment, onednn_contexts
from salr.config import SALRConfig
from salr.hugepages import place_on_huge_pages
from salr.io import atomic_write_json
from salr.layer import SALRLinear


def layer_pairs(model_spec: str, residual_rank: int, lora_rank: int) -> list[tuple[SALRLinear, torch.nn.Linear]]:
    """(SALR layer, the dense bf16 nn.Linear it replaces) for every converted layer, in model order."""
    dense, _ = bench_model(model_spec, "bfloat16")
    dense.eval()
    salr_model, _ = salr_copy(dense, SALRConfig(sparsity=0.5, residual_rank=residual_rank, r=lora_rank))
    for model in (dense, salr_model):  # both on huge pages where the system offers them, as a loaded model is
        place_on_huge_pages(model)
    return [(s, dense.get_submodule(n)) for n, s in salr_model.named_modules() if isinstance(s, SALRLinear)]


def sweep_bytes(pairs: list[tuple[SALRLinear, torch.nn.Linear]]) -> dict[str, int]:
    salr = sum(s.base.nbytes + (s.A_cat.numel() + s.B_cat.numel()) * s.A_cat.element_size() for s, _ in pairs)
    dense = sum(d.weight.numel() * d.weight.element_size() for _, d in pairs)
    return {"salr": salr, "dense_bf16": dense}


def time_sweeps(pairs: list[tuple[SALRLinear, torch.nn.Linear]], rounds: int, reps: int) -> dict[str, list[float]]:
    """Milliseconds per sweep over all layers, `rounds` samples each (mean of `reps` sweeps), order alternating."""
    inputs = {d.in_features: torch.randn(1, 1, d.in_features, dtype=torch.bfloat16) for _, d in pairs}

    def salr_sweep() -> None:
        for s, _ in pairs:
            s(inputs[s.in_features])

    def dense_sweep() -> None:
        for _, d in pairs:
            d(inputs[d.in_features])

    dense = onednn_contexts({f"dense_bf16_{name}": enabled for name, enabled in ONEDNN_PATHS.items()})
    contexts = {"salr": contextlib.nullcontext, **dense}
    sweeps = {"salr": salr_sweep, **dict.fromkeys(dense, dense_sweep)}
    samples: dict[str, list[float]] = {name: [] for name in sweeps}
    with torch.inference_mode():
        for name, fn in sweeps.items():  # warm-up
            with contexts[name]():
                fn()
        for i in range(rounds):
            for name in list(sweeps) if i % 2 == 0 else list(reversed(sweeps)):
                with contexts[name]():
                    started = time.perf_counter()
                    for _ in range(reps):
                        sweeps[name]()
                    samples[name].append((time.perf_counter() - started) / reps * 1e3)
    # the baseline: the faster of torch's two bf16 paths
    samples["dense_bf16"] = min((samples[name] for name in dense), key=statistics.median)
    return samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="default", help="model spec, or 'tinyllama-shape' (random, TinyLlama-1.1B shapes)"
    )
    p.add_argument("--residual-rank", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch and kernel threads (default: torch's)")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = layer_pairs(args.model, args.residual_rank, args.lora_rank)
    samples = time_sweeps(pairs, args.rounds, args.reps)
    nbytes = sweep_bytes(pairs)
    ms = {name: statistics.median(v) for name, v in samples.items()}
    dense_path = "onednn" if samples["dense_bf16"] is samples["dense_bf16_onednn"] else "native"
    paired = [d / s for d, s in zip(samples["dense_bf16"], samples["salr"], strict=True)]
    report = {
        "benchmark": "decode_layers",
        "model": args.model,
        "layers": len(pairs),
        "ranks": [args.residual_rank, args.lora_rank],
        "ms_per_sweep": ms,
        "dense_bf16_path": dense_path,
        "ms_per_sweep_samples": samples,
        "bytes_per_sweep": nbytes,
        "gb_per_s": {name: nbytes["salr" if name == "salr" else "dense_bf16"] / ms[name] / 1e6 for name in ms},
        "salr_speedup_paired_median": statistics.median(paired),
        "salr_speedup_paired_quartiles": statistics.quantiles(paired, n=4),
        "byte_ratio": nbytes["dense_bf16"] / nbytes["salr"],
        "fraction_of_byte_ratio": statistics.median(paired) / (nbytes["dense_bf16"] / nbytes["salr"]),
        "environment": environment(),
    }
    print(
        f"{len(pairs)} layers, M=1: dense bf16 ({dense_path}) {ms['dense_bf16']:.2f} ms/sweep "
        f"({report['gb_per_s']['dense_bf16']:.1f} GB/s), SALR {ms['salr']:.2f} ms/sweep "
        f"({report['gb_per_s']['salr']:.1f} GB/s); SALR speedup (paired median) "
        f"{report['salr_speedup_paired_median']:.2f}x, byte ratio {report['byte_ratio']:.2f}x"
    )
    if args.json:
        atomic_write_json(Path(args.json), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

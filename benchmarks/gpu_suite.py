"""The GPU suite: everything issue 17 asks of one NVIDIA GPU, in one run, written as one JSON report and one markdown
table. Designed for < 8 minutes on an H100/H200-class card; measured on an H200 (2026-12-04) per stage: kernels
45-62 s, train 24 s, qkernels 108 s; the whole suite has not run to its end yet (docs/benchmarks.md section 10).

    python benchmarks/gpu_suite.py --out results/gpu            # -> results/gpu/gpu_suite.json, gpu_suite.md
    python benchmarks/gpu_suite.py --out results/gpu --only kernels --only tests

Stages, in this order, each in its own process under --stage-timeout (a stage that fails, crashes or runs out of
time is recorded in the report with the end of its output, and the next one runs on a clean GPU). The report is
rewritten after every stage, so a suite stopped from outside keeps what it measured.
  kernels   the Triton bitmap kernel and PyTorch 2:4 vs cuBLAS dense bf16, 50 % sparsity, at 4096x4096,
            14336x4096, 4096x14336 and M = 1, 16, 128, 2048 (`salr.bench.kernel.bench_gpu_kernel`);
  decode    greedy decoding on a random Llama-3-8B-shaped model: dense bf16, SALR (bitmap), SALR 2:4
            (`salr.bench.generation.cuda_generation_compare`);
  decode_graph the same decoding with a static KV cache and each step replayed from a CUDA graph, for all three
            models (no host overhead in the timed loop; `salr.bench.generation.graph_generation_bench`);
  train     fine-tuning peak memory and step time, SALR vs LoRA of the same trainable rank, 8B-shaped model
            (`salr.bench.training.train_memory`, torch.cuda.max_memory_allocated);
  train_ckpt the same with gradient checkpointing for both methods (activations recomputed in the backward);
  tests     the CUDA-only tests (pytest on the Triton and 2:4 test files, spread over up to 16 workers when
            pytest-xdist is installed, one fixed config per kernel: SALR_TRITON_AUTOTUNE=0);
  qkernels  the Triton QSALR (NF4 bitmap) kernel vs cuBLAS dense bf16 and the bf16 bitmap kernel on the same grid
            (`salr.bench.kernel.bench_gpu_qkernel`).
Without CUDA the suite stops at once with exit code 2 and one line on stderr. The targets in the table are the
issue's; the JSON holds only the measurements.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGES = ("kernels", "decode", "decode_graph", "train", "train_ckpt", "tests", "qkernels")
KERNEL_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
KERNEL_TOKENS = [1, 16, 128, 2048]
CUDA_TEST_FILES = [
    "tests/test_kernels_triton.py",
    "tests/test_kernels_triton_qbitmap.py",
    "tests/test_semi_structured.py",
]
REPO = Path(__file__).resolve().parent.parent
# The tests run each Triton kernel with one fixed config (salr.ops.triton.AUTOTUNE): autotuning every config for
# every dtype and shape class they touch took over 3 minutes of compiling on an H200 machine (2026-12-04).
TEST_ENV = {**os.environ, "SALR_TRITON_AUTOTUNE": "0"}


class SuiteError(Exception):
    """Something the user can fix (no GPU, no triton, a bad argument): one line, exit code 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for gpu_suite.json and gpu_suite.md")
    p.add_argument("--only", action="append", choices=STAGES, help="run only these stages (repeatable)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode: tokens per round")
    p.add_argument("--rounds", type=int, default=3, help="decode: interleaved rounds")
    p.add_argument("--batch", type=int, default=4, help="train: sequences per step")
    p.add_argument("--seq", type=int, default=256, help="train: tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="train: optimizer steps (first is warm-up)")
    p.add_argument("--stage-timeout", type=int, default=300, help="seconds each stage may run before it is stopped")
    p.add_argument("--child", metavar="JSON", type=Path, help=argparse.SUPPRESS)  # internal: run one stage, write JSON
    args = p.parse_args(argv)
    if min(args.new_tokens, args.rounds, args.batch, args.seq, args.steps, args.stage_timeout) <= 0:
        raise SuiteError("--new-tokens, --rounds, --batch, --seq, --steps and --stage-timeout must be positive")
    args.stages = [s for s in STAGES if s in (args.only or STAGES)]
    return args


def require_cuda() -> str:
    """The GPU's name, or SuiteError with what is missing (checked before anything is built)."""
    import torch

    if not torch.cuda.is_available():
        raise SuiteError(
            "gpu_suite.py needs an NVIDIA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}; a CPU-only wheel or no driver). Run it on a machine with one CUDA GPU."
        )
    from salr.ops import triton as kernels

    if not kernels.HAS_TRITON or kernels.interpreting():
        raise SuiteError("gpu_suite.py needs the compiled Triton kernels: pip install triton; unset TRITON_INTERPRET")
    return torch.cuda.get_device_name()


def stage_kernels(args: argparse.Namespace) -> dict[str, Any]:
    from salr.bench.kernel import bench_gpu_kernel

    return {"cases": [bench_gpu_kernel(shape, m, 0.5) for shape in KERNEL_SHAPES for m in KERNEL_TOKENS]}


def stage_decode(args: argparse.Namespace, cuda_graph: bool = False) -> dict[str, Any]:
    from salr.bench.generation import cuda_generation_compare

    return cuda_generation_compare(["llama3-8b"], args.new_tokens, 128, args.rounds, cuda_graph=cuda_graph)


def stage_train(args: argparse.Namespace, checkpointing: bool = False) -> dict[str, Any]:
    from salr.bench.training import train_memory

    return train_memory("llama3-8b", "cuda", args.batch, args.seq, args.steps, checkpointing=checkpointing)


def pytest_summary(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 skipped in 2.0s" -> {"passed": 3, "skipped": 1})."""
    lines = [line for line in output.strip().splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", lines[-1])}


def stage_qkernels(args: argparse.Namespace) -> dict[str, Any]:
    from salr.bench.kernel import bench_gpu_qkernel

    return {"cases": [bench_gpu_qkernel(shape, m, 0.5, "nf4") for shape in KERNEL_SHAPES for m in KERNEL_TOKENS]}


def failed_tests(output: str) -> list[str]:
    """The tests pytest -v reported as failed or errored so far (also from output cut short by a timeout)."""
    found = re.findall(r"(?:FAILED|ERROR) (tests/\S+::\S+)|(tests/\S+::\S+) (?:FAILED|ERROR)", output)
    return sorted({a or b for a, b in found})


def stage_tests(args: argparse.Namespace) -> dict[str, Any]:
    workers = ["-n", str(min(16, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
    # -v prints each test's outcome as it happens, so a failure is named even if the run is cut short
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *workers, *CUDA_TEST_FILES]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=TEST_ENV,
                              timeout=max(args.stage_timeout - 20, 10))  # fmt: skip
    except subprocess.TimeoutExpired as exc:  # keep what pytest printed: which tests passed or failed before
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"error": f"pytest did not finish in {exc.timeout:.0f} s", "command": " ".join(cmd[1:]),
                "failed": failed_tests(out), "passed_so_far": out.count(" PASSED"), "tail": out[-3000:]}  # fmt: skip
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "counts": pytest_summary(proc.stdout),
            "failed": failed_tests(proc.stdout), "tail": proc.stdout[-3000:]}  # fmt: skip


STAGE_FUNCTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "kernels": stage_kernels,
    "decode": stage_decode,
    "decode_graph": lambda args: stage_decode(args, cuda_graph=True),
    "train": stage_train,
    "train_ckpt": lambda args: stage_train(args, checkpointing=True),
    "tests": stage_tests,
    "qkernels": stage_qkernels,
}


def run_stage(name: str, args: argparse.Namespace, functions: dict[str, Callable] = STAGE_FUNCTIONS) -> dict[str, Any]:
    """One stage in this process: its result, or `error` and the end of the traceback if it raised."""
    try:
        return functions[name](args)
    except Exception as exc:  # noqa: BLE001 - a suite reports every stage; the error is kept, not hidden
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}


def run_child(name: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """One stage in a child process of this script under args.stage_timeout: its result, or `error` with the end
    of its output when it timed out or died without writing one (a crash, a CUDA fault)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", name, "--child", str(result_file)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stage_timeout)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"")[-3000:]
            tail = out.decode(errors="replace") if isinstance(out, bytes) else out
            return {"error": f"timed out after {args.stage_timeout} s (--stage-timeout)", "output_tail": tail}
        if result_file.is_file():
            return json.loads(result_file.read_text())
        return {"error": f"the stage's process exited with code {proc.returncode} without a result",
                "output_tail": (proc.stdout + proc.stderr)[-3000:]}  # fmt: skip


def run_stages(
    args: argparse.Namespace,
    runner: Callable[[str], dict[str, Any]],
    after_each: Callable[[dict[str, Any]], None] = lambda stages: None,
) -> dict[str, Any]:
    """Each chosen stage in order through `runner`, with its seconds; a failed stage is recorded and the next runs.
    `after_each` sees the stages so far after every stage (the suite rewrites its report there)."""
    stages: dict[str, Any] = {}
    for name in args.stages:
        started = time.perf_counter()
        result = runner(name)
        stages[name] = {**result, "seconds": time.perf_counter() - started}
        after_each(stages)
        print(f"{name}: {stages[name]['seconds']:.0f} s" + (f" ({result['error']})" if "error" in result else ""),
              flush=True)  # fmt: skip
    return stages


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _kernel_rows(kernels: dict[str, Any]) -> list[str]:
    columns = ["shape", "M", "cuBLAS bf16 ms", "bitmap ms", "path", "bitmap vs cuBLAS", "target", "2:4 ms",
               "2:4 vs cuBLAS", "target"]  # fmt: skip
    rows = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for c in kernels.get("cases", []):
        target = "≥ 1.50x" if c["tokens"] <= 16 else "≥ 0.90x" if c["tokens"] >= 2048 else "-"
        ss = c.get("semi_structured_ms")
        rows.append(
            f"| {c['shape'][0]}x{c['shape'][1]} | {c['tokens']} | {c['dense_ms']:.4f} | {c['bitmap_triton_ms']:.4f} "
            f"| {c.get('bitmap_path', '-')} | {_x(c['bitmap_speedup_vs_dense'])} | {target} "
            f"| {'n/a' if ss is None else f'{ss:.4f}'} | {_x(c.get('semi_structured_speedup_vs_dense'))} | ≥ 1.20x |"
        )
    return rows


def _decode_rows(decode: dict[str, Any]) -> list[str]:
    rows = ["| model | dense bf16 tok/s | SALR tok/s | SALR 2:4 tok/s | SALR vs dense | 2:4 vs dense |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for case in decode.get("cases", []):
        tps = {name: r["decode_tokens_per_s"] for name, r in case["results"].items()}
        rows.append(
            f"| {case['model']} | {tps['dense_bf16']:.1f} | {tps['salr']:.1f} | {tps['salr_2to4']:.1f} "
            f"| {_x(case['salr_speedup_vs_dense_bf16'])} | {_x(case['salr_2to4_speedup_vs_dense_bf16'])} |"
        )
    return rows


def _train_rows(train: dict[str, Any]) -> list[str]:
    r = train["results"]
    return [
        "| method | peak MiB | step ms |",
        "|---|---|---|",
        *(f"| {m} | {r[m]['peak_memory_mib']:.0f} | {r[m]['step_ms']:.0f} |" for m in ("lora", "salr")),
        f"\nSALR / LoRA peak memory: **{train['salr_over_lora_peak']:.2f}** (target ≤ 0.75), "
        f"batch {train['batch']} x {train['seq']}"
        + (", gradient checkpointing." if train.get("gradient_checkpointing") else "."),
    ]


def _qkernel_rows(qkernels: dict[str, Any]) -> list[str]:
    rows = ["| shape | M | cuBLAS bf16 ms | bf16 bitmap ms | NF4 bitmap ms | NF4 vs cuBLAS | NF4 SNR dB |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in qkernels.get("cases", []):
        rows.append(
            f"| {c['shape'][0]}x{c['shape'][1]} | {c['tokens']} | {c['dense_ms']:.4f} "
            f"| {c['bitmap_bf16_triton_ms']:.4f} | {c['qbitmap_triton_ms']:.4f} "
            f"| {_x(c['qbitmap_speedup_vs_dense'])} | {c['qbitmap_snr_db']:.1f} |"
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown section for docs/benchmarks.md."""
    lines = [f"### GPU suite: {report['gpu']} ({report['date']}, {report['seconds']:.0f} s)", ""]
    renderers = {"kernels": _kernel_rows, "decode": _decode_rows, "decode_graph": _decode_rows, "train": _train_rows,
                 "train_ckpt": _train_rows, "qkernels": _qkernel_rows}  # fmt: skip
    for name, stage in report["stages"].items():
        lines.append(f"**{name}** ({stage['seconds']:.0f} s)")
        lines.append("")
        if "error" in stage:
            lines.append(f"failed: `{stage['error']}`")
        elif name == "tests":
            lines.append(f"`{stage['command']}`: exit {stage['returncode']}, {stage['counts']}")
            lines.extend(f"- failed: `{name}`" for name in stage.get("failed", []))
        else:
            lines.extend(renderers[name](stage))
        lines.append("")
    return "\n".join(lines)


def _stage_argv(argv: list[str]) -> list[str]:
    """The command line without its --only choices, for a child that runs one stage."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--only":
            skip = True
        elif not item.startswith("--only="):
            kept.append(item)
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        gpu = require_cuda()
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from salr.bench.timing import environment
    from salr.io import atomic_write_bytes, atomic_write_json

    if args.child:  # a child of the suite: one stage, its result as JSON
        atomic_write_json(args.child, run_stage(args.stages[0], args))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def write(stages: dict[str, Any]) -> None:
        report = {"benchmark": "gpu_suite", "gpu": gpu, "date": date, "seconds": time.perf_counter() - started,
                  "stages": stages, "environment": environment()}  # fmt: skip
        atomic_write_json(args.out / "gpu_suite.json", report)
        atomic_write_bytes(args.out / "gpu_suite.md", markdown(report).encode())

    stages = run_stages(args, lambda name: run_child(name, args, _stage_argv(argv)), write)
    print(f"wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}")
    return 1 if any("error" in s for s in stages.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

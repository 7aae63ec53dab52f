"""`salr bench`: the bitmap kernel (--kernel), end-to-end generation (--generate), checkpoint bytes (--checkpoint)
and fine-tuning memory (--train-memory), on the CPU or a CUDA GPU (--device cuda); results as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from salr import bench
from salr.bench.models import RANDOM_SPECS
from salr.commands.common import add_dataclass_args, at_least, dataclass_from_args, non_negative_float
from salr.config import DEFAULT_SPARSITY, PRESETS, SALRConfig
from salr.errors import SALRError
from salr.io import atomic_write_json, check_writable_file
from salr.ops import BACKENDS

logger = logging.getLogger(__name__)

MODES = ("kernel", "generate", "checkpoint", "train_memory")
WHAT_CAN_RUN = (
    "choose a benchmark:\n"
    "  --kernel        bitmap kernel vs torch dense bf16/fp32 per layer shape and token count (--shape, --tokens);\n"
    "                  --backend triton: on --device cuda timings, on the CPU with TRITON_INTERPRET=1 correctness\n"
    "  --generate      greedy decoding tokens/s and peak memory: dense bf16, dense fp32, SALR bitmap (--model);\n"
    "                  with --device cuda: a random Llama-3-8B-shaped model and the default model, dense vs SALR\n"
    "  --checkpoint    checkpoint bytes on disk: dense bf16 vs SALR for --model and a Llama-3-8B-shaped layer\n"
    "  --train-memory  fine-tuning peak memory and step time, SALR vs LoRA (--device cpu: RSS of a child process)"
)


def shape_arg(text: str) -> tuple[int, int]:
    """argparse type for --shape: bench.parse_shape's message as the usage error."""
    try:
        return bench.parse_shape(text)
    except SALRError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark kernels, generation, checkpoint size and training memory",
        description=WHAT_CAN_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_argument_group("benchmark (one)")
    mode.add_argument("--kernel", action="store_true", help="layer-level kernel benchmark")
    mode.add_argument("--generate", action="store_true", help="end-to-end greedy generation tokens/s and memory")
    mode.add_argument("--checkpoint", action="store_true", help="checkpoint bytes: dense bf16 vs SALR")
    mode.add_argument("--train-memory", action="store_true", help="fine-tuning peak memory: SALR vs LoRA")
    p.add_argument("--shape", action="append", type=shape_arg, metavar="OUTxIN",
                   help="--kernel: weight shape, repeatable (default: the whole grid)")  # fmt: skip
    p.add_argument("--tokens", action="append", type=at_least(1), metavar="M",
                   help="--kernel: tokens per call, repeatable")  # fmt: skip
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="--kernel: bitmap backend (auto: the op's)")
    p.add_argument("--budget", type=non_negative_float, default=1.0,
                   help="--kernel: seconds of timing per case (>= 5 rounds)")  # fmt: skip
    p.add_argument(
        "--model",
        help="model spec (default: 'default'; --device cuda --generate runs 'llama3-8b' and 'default'; "
        "'llama3-8b' = random Llama-3-8B-shaped weights built on the GPU)",
    )
    salr = p.add_argument_group("SALR (the LoRA baseline of --train-memory gets rank residual + LoRA rank)")
    add_dataclass_args(
        salr,
        SALRConfig,
        only=["sparsity", "residual_rank", "r", "quant", "quant_double"],
        defaults={"sparsity": DEFAULT_SPARSITY},
    )
    p.add_argument("--new-tokens", type=at_least(1), default=32, help="--generate: tokens to decode per round")
    p.add_argument("--prompt-tokens", type=at_least(1),
                   help="--generate: prompt length (default: the built-in prompt)")  # fmt: skip
    p.add_argument("--rounds", type=at_least(1), default=3, help="--generate: interleaved rounds (median reported)")
    p.add_argument("--no-memory", action="store_true", help="--generate on CPU: skip the child-process RSS runs")
    p.add_argument("--static-cache", action="store_true",
                   help="--generate: every model decodes with a static KV cache (transformers' StaticCache); on "
                        "CUDA each decode step is also replayed from a CUDA graph")  # fmt: skip
    p.add_argument("--batch", type=at_least(1), default=4, help="--train-memory: sequences per step")
    p.add_argument("--seq", type=at_least(2), default=256, help="--train-memory: tokens per sequence")
    p.add_argument("--steps", type=at_least(1), default=2, help="--train-memory: optimizer steps (first is warm-up)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="--train-memory: gradient checkpointing of the decoder layers, for both methods")  # fmt: skip
    p.add_argument("--layers", type=at_least(1), metavar="N",
                   help="--train-memory, tinyllama-shape or llama3-8b: keep only N decoder layers")  # fmt: skip
    p.add_argument("--attention", choices=("salr", "sdpa"), default="salr",
                   help="CPU --generate: every model's one-token attention through salr.attention (what salr's "
                   "loaders set) or transformers' SDPA (torch's kernel, slow for one bf16 query)")  # fmt: skip
    p.add_argument("--onednn", choices=bench.ONEDNN_CHOICES, default="auto",
                   help="CPU: torch's bf16 matmuls through oneDNN (on) or torch's own kernels (off); auto: --kernel "
                   "times dense bf16 both ways and compares against the faster, --generate runs every model on the "
                   "path that is faster for the model's largest linear")  # fmt: skip
    p.add_argument("--cache", choices=bench.CACHE_CHOICES, default="cold",
                   help="--kernel on the CPU: push the weights out of the caches before every timed call (cold, as "
                   "when decoding a model larger than the cache) or time calls back to back (warm)")  # fmt: skip
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=at_least(1), help="torch / kernel threads (default: torch's)")
    p.add_argument("--json", metavar="OUT", help="write the results here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    chosen = [m for m in MODES if getattr(args, m)]
    if len(chosen) != 1:
        if not chosen:  # one line; the list with what each one measures is `salr bench --help`
            raise SALRError(
                "choose a benchmark: --kernel, --generate, --checkpoint or --train-memory (salr bench --help)"
            )
        raise SALRError("choose one benchmark per run, got --" + ", --".join(chosen))
    if args.json:  # before the benchmark runs, not after
        check_writable_file(args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SALRError("--device cuda but no CUDA device is available (torch.cuda.is_available() is False)")
    handlers = {"kernel": _kernel, "generate": _generate, "checkpoint": _checkpoint, "train_memory": _train}
    report = handlers[chosen[0]](args)
    if args.json:
        atomic_write_json(args.json, report)
        logger.info("wrote %s", args.json)
    sys.stdout.flush()
    return 0


def _kernel(args: argparse.Namespace) -> dict:
    sparsity = _ranks(args)["sparsity"]
    shapes = args.shape or bench.SHAPES
    tokens = args.tokens or bench.TOKENS
    if any(m <= 0 for m in tokens):
        raise SALRError("--tokens must be positive")
    quant = _quant(args)
    if args.backend == "triton" or (args.device == "cuda" and args.backend == "auto"):
        report = bench.triton_kernel_grid(shapes, tokens, sparsity, args.device, quant=quant["quant"])
        for case in report["results"]:
            print(json.dumps(case), flush=True)
    else:
        print(bench.TABLE_HEADER, flush=True)
        report = bench.kernel_grid(
            shapes, tokens, sparsity, args.backend, args.device, args.budget,
            progress=lambda case: print(bench.format_row(case), flush=True),
            quant=quant["quant"], quant_double=quant["quant_double"], onednn_choice=args.onednn, cache=args.cache,
        )  # fmt: skip
    if len(report["results"]) == 1:  # one case: its fields at the top level (the checks read them there)
        report = {**report["results"][0], "environment": report["environment"]}
    return report


def _ranks(args: argparse.Namespace) -> dict:
    """--sparsity, --residual-rank, --lora-rank as the library's SALRConfig reads them (its defaults when unset).

    Speed, size and memory do not depend on how the mask was chosen, so the benchmarks convert with the data-free
    paper recipe (magnitude + plain SVD): random-weight models have no meaningful text to calibrate on."""
    config = dataclass_from_args(args, SALRConfig, **PRESETS["paper"])  # salr_copy converts with it too
    return {"sparsity": config.sparsity, "residual_rank": config.residual_rank, "lora_rank": config.r}


def _quant(args: argparse.Namespace, supported: bool = True) -> dict:
    """--quant and --quant-double as SALRConfig reads them; SALRError where this benchmark has no quantized case."""
    config = dataclass_from_args(args, SALRConfig)
    if config.quant != "none" and not supported:
        raise SALRError("--quant applies to --kernel, --checkpoint and CPU --generate")
    return {"quant": config.quant, "quant_double": config.quant_double}


def _generate(args: argparse.Namespace) -> dict:
    if args.device == "cuda":
        specs = [args.model] if args.model else ["llama3-8b", "default"]
        _quant(args, supported=False)
        report = bench.cuda_generation_compare(
            specs,
            args.new_tokens,
            args.prompt_tokens or 128,
            args.rounds,
            **_ranks(args),
            cuda_graph=args.static_cache,
        )
        for case in report["cases"]:
            print(
                f"{case['model']}: SALR / dense bf16 decode = {case['salr_speedup_vs_dense_bf16']:.2f}x; "
                f"SALR 2:4 ({case['salr_2to4_semi_structured_layers']} layers on sparse tensor cores) = "
                f"{case['salr_2to4_speedup_vs_dense_bf16']:.2f}x"
            )
        return report
    report = bench.generation_report(
        args.model or "default", args.new_tokens, args.rounds, prompt_tokens=args.prompt_tokens,
        memory=not args.no_memory, **_ranks(args), **_quant(args), static_cache=args.static_cache,
        onednn_choice=args.onednn, attention=args.attention,
    )  # fmt: skip
    pick = report["onednn"]
    probe = f" ({pick['probe_ms']['onednn']:.3f} vs {pick['probe_ms']['native']:.3f} ms)" if "probe_ms" in pick else ""
    path = "oneDNN" if pick["enabled"] else "native kernels"
    print(f"torch's bf16 matmuls: {path}, --onednn {pick['choice']}{probe}; attention: {report['attention']['salr']}")
    for name, r in report["results"].items():
        mem = f"  peak RSS {r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else ""
        print(f"{name:>11}: prefill {r['prefill_ms']:8.1f} ms  decode {r['decode_tokens_per_s']:6.2f} tok/s{mem}")
    b = report["breakdown"]
    print(
        f"per token: {b['outside_linears_ms']:.1f} ms outside the converted linears; linears "
        f"{b['linears_ms']['dense_bf16']:.1f} ms dense bf16 vs {b['linears_ms']['salr']:.1f} ms SALR "
        f"({b['linears_speedup']:.2f}x; byte ratio {b['linears_byte_ratio']:.2f}x, so end-to-end <= "
        f"{b['speedup_ceiling_at_byte_ratio']:.2f}x)"
    )
    if "timed" in b:
        dense, salr = b["timed"]["dense_bf16"], b["timed"]["salr"]
        print(
            f"hooked run of each (linears timed inside decoding): dense bf16 {dense['linears_ms']:.1f} of "
            f"{dense['step_ms']:.1f} ms per token, SALR {salr['linears_ms']:.1f} of {salr['step_ms']:.1f} ms "
            f"(linears {b['timed_linears_speedup']:.2f}x)"
        )
    print(f"SALR / dense bf16 decode: {report['salr_speedup_vs_dense_bf16']:.2f}x")
    if "qsalr_speedup_vs_dense_bf16" in report:
        print(f"QSALR ({report['qsalr_config']['quant']}) / dense bf16 decode: "
              f"{report['qsalr_speedup_vs_dense_bf16']:.2f}x")  # fmt: skip
    return report


def _checkpoint(args: argparse.Namespace) -> dict:
    if args.device != "cpu":
        raise SALRError("--checkpoint measures files on disk; it runs on the CPU (drop --device cuda)")
    report = bench.checkpoint_sizes(args.model or "default", **_ranks(args), **_quant(args))
    for c in report["cases"]:
        dense, salr_bytes = c["dense_checkpoint_bytes"] / 2**20, c["salr_checkpoint_bytes"] / 2**20
        print(
            f"{c['name']}: dense {dense:.1f} MiB, SALR {salr_bytes:.1f} MiB "
            f"({c['compression_vs_dense']:.2f}x smaller, {100 * c['over_ideal']:+.2f}% vs ideal); frozen bases "
            f"{c['base_compression_vs_dense_bf16']:.2f}x smaller than dense bf16"
        )
    return report


def _train(args: argparse.Namespace) -> dict:
    _quant(args, supported=False)
    spec = args.model or ("llama3-8b" if args.device == "cuda" else "default")
    if min(args.batch, args.seq, args.steps) <= 0:
        raise SALRError("--batch, --seq and --steps must be positive")
    if args.layers is not None and (args.layers <= 0 or spec not in RANDOM_SPECS):
        raise SALRError(
            f"--layers needs a positive count and a random benchmark model ({', '.join(RANDOM_SPECS)}), "
            f"got {args.layers} layers of {spec!r}"
        )
    report = bench.train_memory(
        spec, args.device, args.batch, args.seq, args.steps, checkpointing=args.grad_checkpoint, layers=args.layers,
        **_ranks(args),
    )  # fmt: skip
    for method, r in report["results"].items():
        print(f"{method:>5}: peak {r[report['peak_metric']]:.0f} MiB, step {r['step_ms']:.0f} ms")
    print(f"SALR / LoRA peak memory: {report['salr_over_lora_peak']:.2f}")
    return report

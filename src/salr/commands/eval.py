"""`salr eval`: perplexity (WikiText-2 or any text), zero-shot GSM8K, k-shot MMLU; optional on-the-fly pruning."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from salr.commands.common import add_dataclass_args, add_model_arg, at_least, config_from_args
from salr.config import PRESETS, SALRConfig
from salr.errors import SALRError
from salr.evaluate import TASKS, run_task
from salr.io import atomic_write_json, check_writable_file

logger = logging.getLogger(__name__)
# SALRConfig fields `salr eval` accepts for pruning on the fly (LoRA rank is 0: nothing is trained).
PRUNING_FIELDS = (
    "sparsity", "pattern", "granularity", "residual_rank", "criterion", "residual_init", "alternating_rounds",
    "alternating_momentum", "calibration", "calibration_samples", "calibration_length", "sequential", "damping",
    "block_tuning_steps", "block_tuning_lr", "quant", "quant_double", "quant_blocksize", "quant_rounding",
    "quant_scales",
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model: wikitext2 perplexity, GSM8K, MMLU")
    add_model_arg(p)
    p.add_argument("--task", choices=TASKS, help="salr's own evaluation of one task")
    p.add_argument(
        "--harness",
        metavar="TASKS",
        help="run lm-evaluation-harness instead (offline, salr/lm_eval_tasks): gsm8k, mmlu or gsm8k,mmlu; needs "
        "pip install 'salr[harness]'",
    )
    p.add_argument(
        "--cross-check",
        action="store_true",
        help="--harness: also run salr's own evaluation on the same items and report item-by-item agreement",
    )
    p.add_argument(
        "--data",
        help="wikitext2: a text file; gsm8k: a jsonl; answer-nll: a GSM8K or Alpaca JSON/JSONL; mmlu: a csv or a "
        "directory (--harness with one task: default the task YAML's file under ../shared/data)",
    )
    p.add_argument("--dev", help="mmlu: the dev split (few-shot examples); default: a 'dev' directory beside --data")
    p.add_argument("--shots", type=at_least(0), default=5, help="mmlu: number of few-shot examples (default 5)")
    p.add_argument("--limit", type=at_least(1), help="evaluate only the first N questions (wikitext2: N windows)")
    p.add_argument("--batch-size", type=at_least(1), default=4)
    p.add_argument("--max-length", type=at_least(2), help="wikitext2: window length (default min(context, 1024))")
    p.add_argument("--stride", type=at_least(1), help="wikitext2: new tokens per window (default max-length // 2)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256, help="gsm8k: generation budget per question")
    p.add_argument("--json", help="write the report (metrics + settings) to this file")
    g = p.add_argument_group("on-the-fly pruning (any of these converts the loaded model before evaluation)")
    g.add_argument(
        "--preset", choices=sorted(PRESETS), help="a named recipe ('paper': magnitude + plain SVD, no data)"
    )
    add_dataclass_args(g, SALRConfig, only=list(PRUNING_FIELDS))
    p.set_defaults(func=run)


def default_dev(data_path: str) -> Path | None:
    """MMLU layout `<root>/{dev,val,test}`: the dev directory beside `data_path` (a directory or a csv in one)."""
    path = Path(data_path)
    for candidate in (path.parent / "dev", path.parent.parent / "dev"):
        if candidate.is_dir() and candidate.resolve() != path.resolve():
            return candidate
    return None


def run_harness_cli(args: argparse.Namespace) -> int:
    """`salr eval --harness TASKS [--cross-check]`: lm-eval's numbers, and salr's on the same items."""
    from salr.harness import DEFAULT_DATA, cross_check, parse_tasks, run_harness
    from salr.loaders import load_model

    tasks = parse_tasks(args.harness)
    if args.data is not None and len(tasks) > 1:
        raise SALRError("--data names one file: with several --harness tasks, each uses its task YAML's file")
    for task in tasks:
        path = args.data if args.data is not None else DEFAULT_DATA[task][0]
        if not Path(path).exists():
            raise SALRError(f"{task} data {path}: no such file or directory (pass --data)")
    if args.json:
        check_writable_file(args.json, "--json")
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    report: dict[str, Any] = {"model": args.model, "limit": args.limit, "batch_size": args.batch_size, "tasks": {}}
    for task in tasks:
        data_path, dev = (args.data, None) if args.data is not None else DEFAULT_DATA[task]
        dev = args.dev or dev
        if task == "mmlu" and dev is None and args.shots > 0:
            found = default_dev(data_path)
            dev = str(found) if found is not None else None
        kwargs = dict(dev=dev, shots=args.shots, limit=args.limit, batch_size=args.batch_size)
        harness = run_harness(model, tokenizer, task, data_path, max_new_tokens=args.max_new_tokens, **kwargs)
        entry: dict[str, Any] = {"data": data_path, "dev": dev, "harness": harness}
        print(f"{harness['task']} ({harness['harness']}): accuracy {harness['accuracy']:.4f} "
              f"({harness['correct']}/{harness['n']}) in {harness['seconds']:.1f} s")  # fmt: skip
        if args.cross_check:
            entry["cross_check"] = check = cross_check(model, tokenizer, task, data_path, harness, **kwargs,
                                                       max_new_tokens=args.max_new_tokens)  # fmt: skip
            print(f"  salr eval on the same {check['n']} items: accuracy {check['salr_accuracy']:.4f} in "
                  f"{check['salr_seconds']:.1f} s; {check['agree']}/{check['n']} items agree "
                  f"({check['what']}); lm-eval took {check['overhead']:.2f}x salr's time")  # fmt: skip
        report["tasks"][task] = entry
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def prune(model: Any, config: SALRConfig, tokenizer: Any) -> dict[str, Any]:
    """Convert `model` in place to SALR layers (no LoRA) and return the settings plus the conversion totals."""
    from salr.convert import convert  # heavy imports only when pruning

    report = convert(model, config, tokenizer=tokenizer)
    settings = {name: getattr(config, name) for name in PRUNING_FIELDS}
    settings["block_tuning_steps"] = config.tuning_steps  # what ran, where the default left it unset
    return {**settings, "totals": report.get("totals")}


def summary(task: str, m: dict[str, Any]) -> str:
    if task == "wikitext2":
        return (
            f"perplexity {m['perplexity']:.4f} (nll {m['nll']:.4f} over {m['tokens']} tokens, "
            f"{m['windows']} windows of {m['max_length']}, stride {m['stride']})"
        )
    if task == "gsm8k":
        return f"accuracy {m['accuracy']:.4f} ({m['correct']}/{m['n']}), answer nll {m['answer_nll']:.4f}"
    if task == "answer-nll":
        return f"answer nll {m['answer_nll']:.4f} over {m['answer_tokens']} answer tokens of {m['n']} records"
    return (
        f"accuracy {m['accuracy']:.4f} ({m['correct']}/{m['n']}), macro {m['macro_accuracy']:.4f} "
        f"over {len(m['subjects'])} subjects, {m['k']}-shot"
    )


def run(args: argparse.Namespace) -> int:
    from salr.loaders import load_model

    if (args.task is None) == (args.harness is None):
        raise SALRError("pass exactly one of --task TASK (salr eval) or --harness TASKS (lm-evaluation-harness)")
    if args.harness is not None:
        return run_harness_cli(args)
    if args.data is None:
        raise SALRError(f"--task {args.task} needs --data")
    if args.json:  # before the model is loaded and evaluated, not after
        check_writable_file(args.json, "--json")
    if args.max_length is not None and args.stride is not None and args.stride > args.max_length:
        raise SALRError(f"--stride {args.stride} must not exceed --max-length {args.max_length}")
    data_path = Path(args.data)
    if args.task != "mmlu" and not data_path.is_file():
        raise SALRError(f"--data {args.data}: no such file")
    if args.task == "mmlu" and not data_path.exists():
        raise SALRError(f"--data {args.data}: no such file or directory")
    dev = args.dev
    if args.task == "mmlu" and args.shots > 0 and dev is None:
        found = default_dev(args.data)
        if found is None:
            raise SALRError("MMLU few-shot examples need --dev DIR (the dev split), or pass --shots 0")
        dev = str(found)
        logger.info("using few-shot examples from %s", dev)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    pruning = None
    if args.preset or any(hasattr(args, name) for name in PRUNING_FIELDS):
        pruning = prune(model, config_from_args(args, r=0), tokenizer)
    metrics = run_task(
        model,
        tokenizer,
        args.task,
        args.data,
        dev=dev,
        k=args.shots,
        limit=args.limit,
        batch_size=args.batch_size,
        max_length=args.max_length,
        stride=args.stride,
        max_new_tokens=args.max_new_tokens,
    )
    examples = metrics.pop("examples", None)
    report = {
        "task": args.task,
        "model": args.model,
        "data": args.data,
        "dev": dev if args.task == "mmlu" else None,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "pruning": pruning,
        "metrics": metrics,
        "seconds": time.perf_counter() - started,
        "examples": examples,
    }
    print(f"{args.task}: {summary(args.task, metrics)}")
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0

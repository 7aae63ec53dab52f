"""`salr demo`: the README's main job. Compress a model, compare dense / naively pruned / SALR side by side,
save the SALR checkpoint, reload it and check the reload is exact."""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch

from salr.checkpoint import load, save
from salr.commands.common import add_model_arg, add_salr_args, config_from_args
from salr.commands.compress import REPORT_NAME, format_report
from salr.config import SALRConfig
from salr.generation import greedy_complete
from salr.io import atomic_write_json
from salr.model import convert
from salr.models import load_model

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "What is 12 plus 7?",
]
STORY_PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="compress the default model and compare dense / naive / SALR")
    add_model_arg(p)
    add_salr_args(p)
    p.add_argument("--text", help="plain-text file (e.g. wiki.test.raw) for a perplexity comparison")
    p.add_argument("--limit", type=int, default=40, help="perplexity windows to evaluate (with --text)")
    p.add_argument("--prompt", action="append", help="prompt to complete (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--output", default="salr-demo", help="where to save the SALR checkpoint")
    p.add_argument("--json", help="write the summary here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    started = time.perf_counter()
    dense, tokenizer = load_model(args.model, dtype=args.dtype)
    print(f"loaded {args.model} in {time.perf_counter() - started:.1f} s")

    naive = copy.deepcopy(dense)
    naive_config = SALRConfig(**{**config.to_dict(), "residual_rank": 0, "r": 0})
    convert(naive, naive_config, progress=False)
    salr_model = copy.deepcopy(dense)
    report = convert(salr_model, config)
    report["model"] = args.model
    print(format_report(report, max_rows=14))

    variants = {"dense": dense, f"naive {config.pattern} pruned": naive, "SALR (init)": salr_model}
    prompts = args.prompt or (DEFAULT_PROMPTS if getattr(tokenizer, "chat_template", None) else STORY_PROMPTS)
    completions = {name: greedy_complete(m, tokenizer, prompts, args.max_new_tokens) for name, m in variants.items()}
    for i, prompt in enumerate(prompts):
        print(f"\n### {prompt}")
        for name in variants:
            print(f"  {name:>28}: {completions[name][i]!r}")

    summary = {
        "model": args.model,
        "config": config.to_dict(),
        "totals": report["totals"],
        "completions": {name: dict(zip(prompts, outs, strict=True)) for name, outs in completions.items()},
    }
    if args.text:
        from salr.evaluate import perplexity

        text = Path(args.text).read_text(encoding="utf-8")
        summary["perplexity"] = {}
        print(f"\nperplexity on {args.text} (first {args.limit} windows):")
        for name, m in variants.items():
            result = perplexity(m, tokenizer, text, limit=args.limit)
            summary["perplexity"][name] = result["perplexity"]
            print(f"  {name:>28}: {result['perplexity']:.3f} ({result['tokens']} tokens)")

    save(
        salr_model, args.output, config, tokenizer=tokenizer, base_model=args.model, extra_files={REPORT_NAME: report}
    )
    reloaded, _ = load(args.output)
    probe = tokenizer(prompts[0], return_tensors="pt").input_ids
    with torch.inference_mode():
        diff = float((reloaded(probe).logits - salr_model(probe).logits).abs().max())
    summary["reload_max_abs_logit_diff"] = diff
    print(f"\nsaved {args.output}; reloaded, max |logit difference| = {diff:.3g}")
    summary["seconds"] = time.perf_counter() - started
    if args.json:
        atomic_write_json(args.json, summary)
    print(f"done in {summary['seconds']:.1f} s")
    return 0

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
from salr.compress import REPORT_NAME, format_report
from salr.config import PRESETS, SALRConfig
from salr.convert import convert
from salr.errors import SALRError
from salr.evaluate import complete, continue_text
from salr.io import atomic_write_json
from salr.loaders import load_model

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
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--data", help="GSM8K or Alpaca JSON/JSONL (default: synthetic arithmetic problems)")
    g.add_argument("--train-examples", type=int, default=256, help="training records")
    g.add_argument("--eval-examples", type=int, default=40, help="held-out records evaluated before and after")
    g.add_argument("--accuracy-examples", type=int, default=16, help="of those, how many are answered by generation")
    g.add_argument("--train-steps", type=int, default=40, help="optimizer steps (0 skips fine-tuning)")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--max-length", type=int, default=256)
    p.set_defaults(func=run)


def demo_records(path: str | None, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict], str]:
    """(train, held-out, source): the last n_eval records are held out."""
    from salr import data

    if path is None:
        records, source = data.synthetic_arithmetic(n_train + n_eval, seed=seed), "synthetic arithmetic"
    else:
        records, source = data.load_sft_records(path), path
    if len(records) < n_eval + 1:
        raise SALRError(f"{source}: {len(records)} records, need more than --eval-examples {n_eval}")
    return records[:-n_eval][:n_train], records[-n_eval:], source


def score(model, tokenizer, records: list[dict], n_accuracy: int) -> dict[str, float | None]:
    """Held-out answer NLL (teacher forced, answer tokens only) and, for GSM8K-format records, accuracy."""
    from salr.evaluate import answer_nll, gsm8k

    nll = answer_nll(model, tokenizer, records)["answer_nll"]
    out: dict[str, float | None] = {"answer_nll": nll, "accuracy": None}
    if n_accuracy > 0 and "question" in records[0]:
        out["accuracy"] = gsm8k(model, tokenizer, records[:n_accuracy], max_new_tokens=96)["accuracy"]
    return out


def summary_table(rows: dict[str, dict[str, float | None]], n_eval: int, n_accuracy: int) -> str:
    lines = [f"{'model':<24} {f'answer NLL ({n_eval})':>18} {f'accuracy ({n_accuracy})':>15}"]
    for name, m in rows.items():
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
        lines.append(f"{name:<24} {m['answer_nll']:>18.4f} {acc:>15}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    # read (and check) the fine-tuning data before anything slow
    train_records, held_out, source = demo_records(args.data, args.train_examples, args.eval_examples, config.seed)
    started = time.perf_counter()
    dense, tokenizer = load_model(args.model, dtype=args.dtype)
    print(f"loaded {args.model} in {time.perf_counter() - started:.1f} s")

    naive = copy.deepcopy(dense)
    naive_config = SALRConfig(**{**config.to_dict(), **PRESETS["paper"], "residual_rank": 0, "r": 0})
    convert(naive, naive_config, progress=False)
    salr_model = copy.deepcopy(dense)
    report = convert(salr_model, config, tokenizer=tokenizer)
    report["model"] = args.model
    print(format_report(report, max_rows=14))

    variants = {"dense": dense, f"naive {config.pattern} pruned": naive, "SALR (init)": salr_model}
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = args.prompt or (DEFAULT_PROMPTS if chat else STORY_PROMPTS)
    generate = complete if chat or args.prompt else continue_text  # story prompts are continued, not answered
    completions = {name: generate(m, tokenizer, prompts, args.max_new_tokens) for name, m in variants.items()}
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

    n_acc = min(args.accuracy_examples, len(held_out))
    print(f"\nfine-tuning data: {source} ({len(train_records)} train, {len(held_out)} held out)")
    before = [("dense (no tuning)", dense), ("SALR (init)", salr_model)]
    scores = {name: score(m, tokenizer, held_out, n_acc) for name, m in before}
    run_report = None
    if args.train_steps > 0:
        from salr.train import TrainConfig, load_examples, train

        examples = load_examples(None, tokenizer, args.max_length, records=train_records)
        cfg = TrainConfig(
            lr=args.lr,
            max_steps=args.train_steps,
            batch_size=min(args.batch_size, len(examples)),
            max_length=args.max_length,
            seed=config.seed,
        )
        run_report = train(
            salr_model, tokenizer, examples, config, cfg, args.output, args.model, extra_report={"demo": True}
        )
        scores["SALR (fine-tuned)"] = score(salr_model, tokenizer, held_out, n_acc)
        tuned = generate(salr_model, tokenizer, prompts, args.max_new_tokens)
        summary["completions"]["SALR (fine-tuned)"] = dict(zip(prompts, tuned, strict=True))
        for prompt, out in zip(prompts, tuned, strict=True):
            print(f"  {'SALR (fine-tuned)':>28} on {prompt!r}: {out!r}")
        summary["training"] = {k: v for k, v in run_report.items() if k != "history"}
        summary["loss_curve"] = [h["loss"] for h in run_report["history"]]
    else:
        extra = {REPORT_NAME: report}
        save(salr_model, args.output, config, tokenizer=tokenizer, base_model=args.model, extra_files=extra)
    summary["held_out"] = {"source": source, "examples": len(held_out), "accuracy_examples": n_acc, "scores": scores}
    reloaded, _ = load(args.output)
    probe = tokenizer(prompts[0], return_tensors="pt").input_ids
    salr_model.eval()
    with torch.inference_mode():
        diff = float((reloaded(probe).logits - salr_model(probe).logits).abs().max())
    summary["reload_max_abs_logit_diff"] = diff
    print(f"\nsaved {args.output}; reloaded, max |logit difference| = {diff:.3g}")
    print("\n" + summary_table(scores, len(held_out), n_acc))
    if run_report is not None:
        print(
            f"fine-tuning: {run_report['steps']} steps, loss {summary['loss_curve'][0]:.3f} -> "
            f"{summary['loss_curve'][-1]:.3f}, {run_report['trainable_parameters']:,} trainable parameters, "
            f"{run_report['seconds']:.0f} s"
        )
    summary["seconds"] = time.perf_counter() - started
    if args.json:
        atomic_write_json(args.json, summary)
    print(f"done in {summary['seconds']:.1f} s")
    return 0

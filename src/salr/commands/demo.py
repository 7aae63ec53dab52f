"""`salr demo`: the README's main job, in four stages on the default model (or --model):

1. compress: the paper's recipe and salr's default (salr+) side by side with naive pruning, completions compared;
2. recover: data-free distillation of the salr+ model towards the dense one, on the calibration text (sampled
   from the dense model unless --calibration FILE);
3. fine-tune: a short task fine-tune (synthetic arithmetic, or --data) with salr train's defaults (prompt
   distillation towards the dense model keeps general ability), scored before and after;
4. save, reload, check the reload is exact.
General ability is tracked all along as perplexity on held-out text sampled from the dense model (and on --text).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from salr.calibration import SELF, calibration_ids, self_generated_ids
from salr.checkpoint import load, prepare_output
from salr.commands.common import add_model_arg, add_salr_args, config_from_args
from salr.compress import format_report
from salr.config import NO_CALIBRATION, PRESETS, SALRConfig
from salr.convert import convert
from salr.errors import SALRError
from salr.evaluate import complete, continue_text, perplexity, score_tokens
from salr.io import atomic_write_json, check_writable_dir, check_writable_file
from salr.loaders import load_model
from salr.train.config import LR_TASK

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "What is 12 plus 7?",
]
STORY_PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to"]
HELD_OUT_SEED = 12345  # held-out text sampled from the dense model: never the calibration or distillation text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="compress, recover and fine-tune the default model, side by side")
    add_model_arg(p)
    add_salr_args(p)
    p.add_argument("--text", help="plain-text file (e.g. wiki.test.raw) for a perplexity comparison")
    p.add_argument("--limit", type=int, default=20, help="perplexity windows to evaluate (with --text)")
    p.add_argument("--prompt", action="append", help="prompt to complete (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--output", default="salr-demo", help="where to save the SALR checkpoint")
    p.add_argument("--json", help="write the summary here")
    g = p.add_argument_group("recovery and fine-tuning")
    g.add_argument("--recovery-steps", type=int, default=20, help="distillation steps (0 skips recovery)")
    g.add_argument("--recovery-lr", type=float, default=1e-4, help="distillation learning rate (at 1e-3 the held-out "
                   "perplexity of the default model rose 19.15 -> 24.64; at 1e-4 it fell to 18.11)")  # fmt: skip
    g.add_argument("--sample-length", type=int, default=256, help="tokens per held-out sequence sampled from the "
                   "dense model (8 sequences)")  # fmt: skip
    g.add_argument("--data", help="GSM8K or Alpaca JSON/JSONL (default: synthetic arithmetic problems)")
    g.add_argument("--train-examples", type=int, default=256, help="training records")
    g.add_argument("--eval-examples", type=int, default=40, help="held-out records evaluated before and after")
    g.add_argument("--accuracy-examples", type=int, default=16, help="of those, how many are answered by generation")
    g.add_argument("--train-steps", type=int, default=40, help="optimizer steps (0 skips fine-tuning; --output then "
                   "holds the recovered model)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--lr", type=float, default=LR_TASK, help="fine-tuning learning rate of the LoRA block, "
                   "%(default)g (the residual block moves at a tenth of it, with prompt distillation towards the "
                   "dense model: salr train's defaults; on the default model they gave held-out perplexity 20.91 and "
                   "answer NLL 0.0771 where lr 1e-4 for both blocks without prompt distillation gave 22.60 and "
                   "0.0876)")  # fmt: skip
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


def held_out_perplexity(model: torch.nn.Module, held_out: torch.Tensor) -> float:
    """Perplexity of every next token of each row of `held_out` (text the dense model sampled)."""
    requests = [(row, [[(t - 1, row[t]) for t in range(1, len(row))]]) for row in held_out.tolist()]
    model.eval()
    with torch.inference_mode():
        scores = score_tokens(model, requests, 4, 0, desc="held-out text")
    tokens = sum(len(r[1][0]) for r in requests)
    return float(torch.tensor(-sum(s[0] for s in scores) / tokens).exp())


class Demo:
    """The models compared, the prompts, and everything measured (the JSON summary)."""

    def __init__(self, args: argparse.Namespace, dense: torch.nn.Module, tokenizer: Any, config: SALRConfig):
        self.args, self.dense, self.tokenizer, self.config = args, dense, tokenizer, config
        chat = bool(getattr(tokenizer, "chat_template", None))
        self.prompts = args.prompt or (DEFAULT_PROMPTS if chat else STORY_PROMPTS)
        self.generate = complete if chat or args.prompt else continue_text  # story prompts are continued
        self.sample_length = min(args.sample_length, getattr(dense.config, "max_position_embeddings", 1 << 30))
        self.held_out = self_generated_ids(dense, 8, self.sample_length, seed=HELD_OUT_SEED)
        # One set of text serves calibration (salr+) and recovery: the calibration windows (self-sampled unless
        # --calibration FILE), sampled once; sampling from a 135M model on 2 cores costs ~10 ms a token.
        source = config.calibration if config.calibration != NO_CALIBRATION else SELF
        self.calibration = calibration_ids(dense, tokenizer, source, config.calibration_samples,
                                           config.calibration_length, config.seed)  # fmt: skip
        self.text = Path(args.text).read_text(encoding="utf-8") if args.text else None
        self.summary: dict[str, Any] = {"model": args.model, "config": config.to_dict(), "completions": {},
                                        "held_out_text_perplexity": {}, "text_perplexity": {}}  # fmt: skip

    def look(self, name: str, model: torch.nn.Module) -> None:
        """Completions of the prompts and the perplexities of `model`, printed and recorded under `name`."""
        answers = self.generate(model, self.tokenizer, self.prompts, self.args.max_new_tokens)
        self.summary["completions"][name] = dict(zip(self.prompts, answers, strict=True))
        ppl = held_out_perplexity(model, self.held_out)
        self.summary["held_out_text_perplexity"][name] = ppl
        line = f"  {name:<28} held-out text perplexity {ppl:8.2f}"
        if self.text is not None:
            text_ppl = perplexity(model, self.tokenizer, self.text, limit=self.args.limit)["perplexity"]
            self.summary["text_perplexity"][name] = text_ppl
            line += f", {Path(self.args.text).name} perplexity {text_ppl:8.2f}"
        print(line)
        for prompt, answer in zip(self.prompts, answers, strict=True):
            print(f"      {prompt!r}: {answer!r}")


def compress_stage(demo: Demo) -> torch.nn.Module:
    """Naive pruning, the paper's SALR and salr+ at init; returns the salr+ model."""
    print("\n== 1. compress ==")
    dense, config = demo.dense, demo.config
    demo.look("dense", dense)
    variants = {
        f"naive {config.pattern} pruning": SALRConfig(
            **{**config.to_dict(), **PRESETS["paper"], "residual_rank": 0, "residual_rank_pattern": None}
        ),
        "SALR, paper recipe": SALRConfig(**{**config.to_dict(), **PRESETS["paper"]}),
    }
    for name, variant in variants.items():
        model = copy.deepcopy(dense)
        convert(model, variant, progress=False)
        demo.look(name, model)
        del model
    salr_model = copy.deepcopy(dense)
    started = time.perf_counter()
    report = convert(salr_model, config, calibration=demo.calibration if config.needs_calibration else None)
    report["model"] = demo.args.model
    print(format_report(report, max_rows=7))
    print(f"compressed with {config.criterion} + {config.residual_init} in {time.perf_counter() - started:.0f} s")
    demo.summary["totals"] = report["totals"]
    demo.look("SALR+ (init)", salr_model)
    return salr_model


def recovery_stage(demo: Demo, model: torch.nn.Module) -> None:
    """Data-free distillation towards the dense model (salr train --distill)."""
    from salr.train import TrainConfig, every_position_examples, train

    args = demo.args
    if args.recovery_steps <= 0:
        return
    print(
        f"\n== 2. recover: {args.recovery_steps} steps of distillation towards the dense model on the calibration "
        "text =="
    )
    examples = every_position_examples(demo.calibration.tolist())
    cfg = TrainConfig(lr=args.recovery_lr, max_steps=args.recovery_steps, batch_size=min(8, len(examples)),
                      warmup_steps=2, seed=demo.config.seed, distill=True, progress=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="salr-recovery-") as run_dir:  # only the model in memory is kept
        report = train(model, demo.tokenizer, examples, demo.config, cfg, run_dir, args.model, teacher=demo.dense)
    demo.summary["recovery"] = {"steps": report["steps"], "kl_first": report["history"][0]["loss"],
                                "kl_last": report["history"][-1]["loss"], "seconds": report["seconds"]}  # fmt: skip
    print(f"KL to the dense model {report['history'][0]['loss']:.3f} -> {report['history'][-1]['loss']:.3f}")
    demo.look("SALR+ (recovered)", model)


def score(model: torch.nn.Module, tokenizer: Any, records: list[dict], n_accuracy: int) -> dict[str, float | None]:
    """Held-out answer NLL (teacher forced, answer tokens only) and, for GSM8K-format records, accuracy."""
    from salr.evaluate import answer_nll, gsm8k

    out: dict[str, float | None] = {
        "answer_nll": answer_nll(model, tokenizer, records)["answer_nll"],
        "accuracy": None,
    }
    if n_accuracy > 0 and "question" in records[0]:
        out["accuracy"] = gsm8k(model, tokenizer, records[:n_accuracy], max_new_tokens=96)["accuracy"]
    return out


def finetune_stage(demo: Demo, model: torch.nn.Module, records: tuple[list[dict], list[dict], str]) -> None:
    """A short task fine-tune of the recovered model, scored on held-out records before and after."""
    from salr.train import TrainConfig, load_examples, train

    args, (train_records, held_out, source) = demo.args, records
    n_acc = min(args.accuracy_examples, len(held_out))
    print(f"\n== 3. fine-tune on {source} ({len(train_records)} records, {len(held_out)} held out) ==")
    scores = {"dense (no tuning)": score(demo.dense, demo.tokenizer, held_out, n_acc)}
    scores["SALR+ (before fine-tuning)"] = score(model, demo.tokenizer, held_out, n_acc)
    if args.train_steps > 0:
        examples = load_examples(None, demo.tokenizer, args.max_length, records=train_records)
        # salr train's defaults: residual block at a tenth of --lr, prompt distillation towards the dense model
        cfg = TrainConfig(lr=args.lr, max_steps=args.train_steps, batch_size=min(args.batch_size, len(examples)),
                          max_length=args.max_length, seed=demo.config.seed)  # fmt: skip
        report = train(model, demo.tokenizer, examples, demo.config, cfg, args.output, args.model,
                       teacher=demo.dense, extra_report={"demo": True})  # fmt: skip
        scores["SALR+ (fine-tuned)"] = score(model, demo.tokenizer, held_out, n_acc)
        demo.summary["training"] = {k: v for k, v in report.items() if k != "history"}
        demo.summary["loss_curve"] = [h["loss"] for h in report["history"]]
        demo.look("SALR+ (fine-tuned)", model)
    demo.summary["held_out"] = {"source": source, "examples": len(held_out), "accuracy_examples": n_acc,
                                "scores": scores}  # fmt: skip
    print(f"\n{'model':<28} {f'answer NLL ({len(held_out)})':>18} {f'accuracy ({n_acc})':>15}")
    for name, m in scores.items():
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
        print(f"{name:<28} {m['answer_nll']:>18.4f} {acc:>15}")


@contextlib.contextmanager
def timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - started


def check_outputs(args: argparse.Namespace) -> None:
    """--output and --json, before the first stage rather than after minutes of work: fine-tuning makes --output a
    run directory, --train-steps 0 a checkpoint."""
    from salr.train.state import check_fresh_output

    if args.json:
        check_writable_file(args.json, "--json")
    if args.train_steps > 0:
        check_fresh_output(check_writable_dir(args.output, "--output"))
    else:
        prepare_output(args.output)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_outputs(args)
    records = demo_records(args.data, args.train_examples, args.eval_examples, config.seed)  # check data first
    started = time.perf_counter()
    dense, tokenizer = load_model(args.model, dtype=args.dtype)
    demo = Demo(args, dense, tokenizer, config)
    stages = demo.summary["stage_seconds"] = {"load": time.perf_counter() - started}
    with timed(stages, "compress"):
        model = compress_stage(demo)
    with timed(stages, "recover"):
        recovery_stage(demo, model)
    with timed(stages, "fine-tune"):
        finetune_stage(demo, model, records)
    if args.train_steps <= 0:  # fine-tuning saves its run directory; otherwise the model in memory is saved here
        from salr.checkpoint import save

        save(model, args.output, config, tokenizer=tokenizer, base_model=args.model)
    reloaded, _ = load(args.output)
    probe = tokenizer(demo.prompts[0], return_tensors="pt").input_ids
    model.eval()
    with torch.inference_mode():
        diff = float((reloaded(probe).logits - model(probe).logits).abs().max())
    demo.summary["reload_max_abs_logit_diff"] = diff
    print(f"\n== 4. saved {args.output}; reloaded, max |logit difference| = {diff:.3g} ==")
    ppl = demo.summary["held_out_text_perplexity"]
    print("held-out text perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    demo.summary["seconds"] = time.perf_counter() - started
    if args.json:
        atomic_write_json(args.json, demo.summary)
    print(f"done in {demo.summary['seconds']:.1f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + ")")
    return 0

"""`salr train`: fine-tune SALR (or LoRA / prune+LoRA / frozen-residual) adapters on GSM8K or Alpaca data.

Single process: `salr train ...`; several: `torchrun --nproc_per_node N -m salr.cli train ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from salr.commands.common import add_model_arg, add_salr_args, config_from_args
from salr.errors import SALRError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from salr.train import METHODS

    p = subparsers.add_parser("train", help="fine-tune adapters (salr, lora, prune-lora, salr-frozen-residual)")
    add_model_arg(p)
    p.add_argument("--method", default="salr", choices=METHODS, help="what is pruned and what is trained")
    p.add_argument("--data", required=True, help="GSM8K (question, answer) or Alpaca JSON/JSONL file")
    p.add_argument("--limit", type=int, help="use only the first N records of --data")
    p.add_argument("--output", required=True, help="run directory: final SALR checkpoint, metrics.jsonl, checkpoints/")
    add_salr_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    g.add_argument(
        "--residual-lr",
        default=None,
        help="residual block lr: a number, 'theorem4' (per layer N/σ_max(X)², Theorem 4) or 'theorem4*F'",
    )
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch, over all processes")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--warmup-steps", type=int, help="default: 3%% of the steps")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--max-length", type=int, default=512, help="tokens per example (prompt + answer)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (needed for --resume)")
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/latest.json")
    g.add_argument("--eval-data", help="GSM8K/Alpaca file: answer NLL logged every --eval-every steps")
    g.add_argument("--eval-every", type=int, default=0)
    g.add_argument("--eval-limit", type=int, default=64, help="records of --eval-data to score")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=run)


def train_config_from_args(args: argparse.Namespace):
    from salr.train import TrainConfig

    return TrainConfig(
        lr=args.lr,
        residual_lr=args.residual_lr,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        max_length=args.max_length,
        seed=args.seed,
        save_every=args.save_every,
        eval_every=args.eval_every,
        log_every=args.log_every,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from salr import data
    from salr.train import run_training

    if not Path(args.data).is_file():
        raise SALRError(f"--data {args.data}: no such file; pass a GSM8K or Alpaca JSON/JSONL file")
    eval_fn = None
    if args.eval_data and args.eval_every:
        from salr.evaluate import answer_nll

        eval_records = data.load_sft_records(args.eval_data, args.eval_limit)

        def eval_fn(model, tokenizer):
            return {"answer_nll": answer_nll(model, tokenizer, eval_records)["answer_nll"]}

    report = run_training(
        args.model,
        args.method,
        config_from_args(args),
        train_config_from_args(args),
        args.output,
        data_path=args.data,
        limit=args.limit,
        resume=args.resume,
        dtype=args.dtype,
        eval_fn=eval_fn,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(
        f"{args.method}: {report['steps']} steps, final loss {report['final_loss']:.4f}, "
        f"{report['trainable_parameters']:,} trainable parameters, {report['tokens']:,} tokens in "
        f"{report['seconds']:.1f} s, peak memory {report['peak_memory_mib']:.0f} MiB; wrote {args.output}"
    )
    return 0

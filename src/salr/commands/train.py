"""`salr train`: fine-tune SALR (or LoRA / prune+LoRA / frozen-residual / QSALR / QLoRA) adapters on GSM8K or Alpaca
data.

Single process: `salr train ...`; several: `torchrun --nproc_per_node N -m salr.cli train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from salr.commands.common import (
    add_dataclass_args,
    add_model_arg,
    add_salr_args,
    at_least,
    config_from_args,
    dataclass_from_args,
    flag,
)
from salr.config import TRAINING_DATA, SALRConfig
from salr.errors import SALRError
from salr.io import check_writable_dir
from salr.losa.config import LoSAConfig
from salr.train.config import METHODS, TRAINING_CONVERSION, TrainConfig

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune adapters (salr, lora, prune-lora, salr-frozen-residual, qsalr, qlora, losa)"
    )
    add_model_arg(p)
    p.add_argument("--method", default="salr", choices=METHODS, help="what is pruned and what is trained")
    p.add_argument("--data", help="GSM8K (question, answer) or Alpaca JSON/JSONL file (optional with --distill)")
    p.add_argument("--limit", type=at_least(1), help="use only the first N records of --data")
    p.add_argument("--output", required=True, help="run directory: final SALR checkpoint, metrics.jsonl, checkpoints/")
    # its --seed also seeds the data order and dropout; a dense model is converted with TRAINING_CONVERSION
    add_salr_args(p, defaults={**TRAINING_CONVERSION, "calibration": f"{TRAINING_DATA} (with --data, else self)"})
    add_dataclass_args(p.add_argument_group("training"), TrainConfig, skip=("seed", "progress"))
    add_dataclass_args(p.add_argument_group("LoSA (--method losa; docs/losa.md)"), LoSAConfig)
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/latest.json")
    g.add_argument("--eval-data", help="GSM8K/Alpaca file: answer NLL logged every --eval-every steps")
    g.add_argument("--eval-limit", type=at_least(1), default=64, help="records of --eval-data to score")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=run)


LOSA_LR = 2e-4  # LoSA's own rate (docs/losa.md): TrainConfig's task default was measured for SALR and LoRA only


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    seed = getattr(args, "seed", None)
    extra = {"progress": not args.no_progress, **({"seed": seed} if seed is not None else {})}
    if getattr(args, "method", None) == "losa" and not hasattr(args, "lr"):
        extra["lr"] = LOSA_LR
    return dataclass_from_args(args, TrainConfig, **extra)


def training_conversion(args: argparse.Namespace) -> dict[str, Any]:
    """TRAINING_CONVERSION's settings the user left unset, where they apply: not under the paper's preset (no
    calibration), not for LoSA (its own rounds), and calibration on the training data only when there is some."""
    if args.preset == "paper" or args.method == "losa":
        return {}
    unset = {k: v for k, v in TRAINING_CONVERSION.items() if not hasattr(args, k)}
    if args.data is None:
        unset.pop("calibration", None)
    return unset


# Methods that train a SALR checkpoint as saved: the others describe a conversion of a dense model.
CHECKPOINT_METHODS = ("salr", "salr-frozen-residual", "qsalr")


def refuse_conversion_of_a_checkpoint(args: argparse.Namespace) -> None:
    """A SALR checkpoint is trained as saved (its mask, ranks and adapters): a conversion flag or a method that would
    build another model is refused, not silently ignored."""
    from salr.checkpoint import CONFIG_NAME, read_salr_config

    if not (Path(args.model) / CONFIG_NAME).is_file():
        return
    saved = read_salr_config(args.model)["salr"]
    quantized = saved.get("quant", "none") != "none"
    what = (
        f"--model {args.model} is a SALR checkpoint, trained as saved (sparsity {saved.get('sparsity')}, residual "
        f"rank {saved.get('residual_rank')}, LoRA rank {saved.get('r')}, {'quantized' if quantized else 'unquantized'}"
        " base)"
    )
    given = [flag(f.name) for f in dataclasses.fields(SALRConfig) if f.name != "seed" and hasattr(args, f.name)]
    given += ["--preset"] if getattr(args, "preset", None) else []
    if given:
        raise SALRError(
            f"{what}: {', '.join(given)} would change nothing; drop them, or pass the dense model to convert it "
            "with them"
        )
    if args.method not in CHECKPOINT_METHODS or (args.method == "qsalr" and not quantized):
        raise SALRError(
            f"{what}: --method {args.method} converts a dense model; pass the dense model for it, or --method salr "
            "(salr-frozen-residual freezes the residual block)"
        )


def run(args: argparse.Namespace) -> int:
    from salr import data
    from salr.integrity import sha256_file
    from salr.train import run_training

    cfg = train_config_from_args(args)
    if args.data is None and not cfg.distill:
        raise SALRError("no training data: pass --data PATH (GSM8K or Alpaca JSON/JSONL), or --distill")
    if args.data is not None and not Path(args.data).is_file():
        raise SALRError(f"--data {args.data}: no such file; pass a GSM8K or Alpaca JSON/JSONL file")
    check_writable_dir(args.output, "--output")
    refuse_conversion_of_a_checkpoint(args)
    config = config_from_args(args, **training_conversion(args))
    if bool(args.eval_data) != bool(cfg.eval_every):  # either alone would silently evaluate nothing
        raise SALRError(
            "--eval-data and --eval-every go together: pass both (--eval-every N scores --eval-data every N steps)"
        )
    eval_fn, eval_info = None, None
    if args.eval_data and cfg.eval_every:
        from salr.evaluate import answer_nll

        eval_records = data.load_sft_records(args.eval_data, args.eval_limit)
        eval_info = {"path": args.eval_data, "sha256": sha256_file(args.eval_data), "limit": args.eval_limit}

        def eval_fn(model, tokenizer):
            return {"answer_nll": answer_nll(model, tokenizer, eval_records)["answer_nll"]}

    report = run_training(
        args.model,
        args.method,
        config,
        cfg,
        args.output,
        data_path=args.data,
        limit=args.limit,
        resume=args.resume,
        dtype=args.dtype,
        eval_fn=eval_fn,
        eval_info=eval_info,
        losa=dataclass_from_args(args, LoSAConfig),
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if report.get("already_finished"):
        print(
            f"{args.output}: the run is already finished ({report['steps']} steps); nothing to do, nothing was "
            "changed (pass a larger --max-steps to train further)"
        )
        return 0
    final_loss = "n/a" if report["final_loss"] is None else f"{report['final_loss']:.4f}"
    print(
        f"{args.method}: {report['steps']} steps, final loss {final_loss}, "
        f"{report['trainable_parameters']:,} trainable parameters, {report['tokens']:,} tokens in "
        f"{report['seconds']:.1f} s, peak memory {report['peak_memory_mib']:.0f} MiB; wrote {args.output}"
    )
    return 0

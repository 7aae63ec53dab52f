"""Arguments shared by sub-commands that build a SALRConfig (compress, eval, train, demo)."""

from __future__ import annotations

import argparse

from salr.config import SALRConfig


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M-Instruct), a Hugging Face model dir or hub id, a llama2.c *.bin, "
        "or a SALR checkpoint dir",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the model weights")


def add_salr_args(parser: argparse.ArgumentParser, residual_rank: int = 64, lora_rank: int = 16) -> None:
    g = parser.add_argument_group("SALR")
    g.add_argument("--sparsity", type=float, default=None, help="fraction pruned, in [0, 1) (default 0.5)")
    g.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4, 4:8")
    g.add_argument("--granularity", default="layer", choices=["layer", "row", "global"], help="unstructured only")
    g.add_argument("--residual-rank", type=int, default=residual_rank, help="SVD residual rank (0 = naive pruning)")
    g.add_argument("--lora-rank", type=int, default=lora_rank, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * r)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--target-modules", default="all-linear", help="comma-separated names, a regex, or all-linear")
    g.add_argument("--exclude-modules", default=None, help="comma-separated names or a regex")
    g.add_argument("--svd-method", default="auto", choices=["auto", "exact", "randomized"])
    g.add_argument("--freeze-residual", action="store_true", help="keep the residual block at its SVD init")
    g.add_argument(
        "--adapter-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of A_cat/B_cat"
    )
    g.add_argument("--seed", type=int, default=0)


def _modules(value: str | None) -> list[str] | str | None:
    if value is None or value == "all-linear":
        return value
    if any(c in value for c in "*()[]|^$\\+?"):
        return value  # a regex
    return [v.strip() for v in value.split(",") if v.strip()]


def config_from_args(args: argparse.Namespace) -> SALRConfig:
    sparsity = args.sparsity
    if sparsity is None and args.pattern == "unstructured":
        sparsity = 0.5
    return SALRConfig(
        sparsity=sparsity,
        pattern=args.pattern,
        granularity=args.granularity,
        residual_rank=args.residual_rank,
        r=args.lora_rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * max(args.lora_rank, 1),
        lora_dropout=args.lora_dropout,
        target_modules=_modules(args.target_modules),
        exclude_modules=_modules(args.exclude_modules),
        svd_method=args.svd_method,
        train_residual=not args.freeze_residual,
        adapter_dtype=args.adapter_dtype,
        seed=args.seed,
    )

"""`salr compress`: prune a model's frozen base, initialise SVD residual + LoRA adapters, save a checkpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from salr.checkpoint import prepare_output
from salr.commands.common import add_model_arg, add_salr_args, config_from_args
from salr.compress import REPORT_NAME, compress, format_report

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compress", help="prune + residual SVD + LoRA init; writes DIR and DIR/salr_report.json")
    add_model_arg(p)
    add_salr_args(p)
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument(
        "--base-format",
        choices=["bitmap", "dense"],
        default="bitmap",
        help="store frozen bases as bitmaps (1 bit/weight + nonzeros; default) or as dense masked tensors",
    )
    p.add_argument("--quiet", action="store_true", help="do not print the per-layer table")
    p.add_argument(
        "--from-peft",
        metavar="DIR",
        help="import instead of compressing: a pair from `salr export --to peft` or a PEFT LoRA adapter directory; "
        "its base (OUT/base, a 'base' dir beside the adapter, the adapter's base_model_name_or_path, or --model when "
        "given) is the frozen sparse base",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.output = str(prepare_output(args.output))  # writable, not someone else's directory: checked before any work
    if args.from_peft:
        from salr.peft_adapter import import_peft

        base = None if args.model == "default" else args.model
        report = import_peft(args.from_peft, args.output, base=base, base_format=args.base_format)
        t = report["totals"]
        print(
            f"imported {report['from_peft']} on {report['model']}: {t['target_layers']} layers, base sparsity "
            f"{t['sparsity']:.4f}, residual rank {report['config']['residual_rank']}, "
            f"LoRA rank {report['config']['r']}"
        )
        print(f"wrote {args.output} and {Path(args.output) / REPORT_NAME}")
        return 0
    config = config_from_args(args)
    report = compress(args.model, config, args.output, dtype=args.dtype, base_format=args.base_format)
    if not args.quiet:
        print(format_report(report))
    print(f"wrote {args.output} and {Path(args.output) / REPORT_NAME}")
    return 0

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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    args.output = str(prepare_output(args.output))  # writable, not someone else's directory: checked before any work
    report = compress(args.model, config, args.output, dtype=args.dtype, base_format=args.base_format)
    if not args.quiet:
        print(format_report(report))
    print(f"wrote {args.output} and {Path(args.output) / REPORT_NAME}")
    return 0

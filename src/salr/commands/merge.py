"""`salr merge`: fold a run's adapters into a plain transformers checkpoint, dense or keeping the base's mask."""

from __future__ import annotations

import argparse
from pathlib import Path

from salr.io import check_output_dir
from salr.merge import MODES, REPORT_NAME, SPARSE_RULES, format_report, merge_checkpoint


def add_merge_args(parser: argparse.ArgumentParser) -> None:
    """--mode, --rule and the accuracy-check flags, shared with `salr export --to merged`."""
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="dense",
        help="dense: M⊙W0 + ΔW (exact, loses sparsity); sparse: keep the base's zeros (default: dense)",
    )
    parser.add_argument(
        "--rule",
        choices=SPARSE_RULES,
        default="mask",
        help="sparse mode: 'mask' = M ⊙ (M⊙W0 + ΔW), the base's own mask (E2); 'reprune' = a new magnitude mask "
        "on the merged weight with the same zeros per row, or N:M (E3) (default: mask)",
    )
    parser.add_argument(
        "--check-windows",
        type=int,
        default=4,
        help="token windows on which the merged model is compared with the unmerged one (0: skip; default 4)",
    )
    parser.add_argument("--check-length", type=int, default=128, help="tokens per check window (default 128)")
    parser.add_argument(
        "--check-text", default="self", help="text for the check windows: 'self' (sampled from the model) or a file"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge", help="merge adapters into a plain transformers checkpoint (dense, or sparse keeping the mask)"
    )
    p.add_argument("run", help="a SALR checkpoint or a salr train run directory")
    p.add_argument("--out", required=True, help="directory for the merged transformers checkpoint")
    add_merge_args(p)
    p.add_argument("--quiet", action="store_true", help="print the totals only, not the per-layer table")
    p.set_defaults(func=run)


def run_merge(args: argparse.Namespace, out: str) -> dict:
    check_output_dir(out, REPORT_NAME, "model directory")  # before loading and merging, not after
    report = merge_checkpoint(
        args.run, out, args.mode, args.rule, args.check_windows, args.check_length, args.check_text
    )
    print(format_report(report, max_rows=0 if args.quiet else None))
    print(f"wrote {out} and {Path(out) / REPORT_NAME}")
    return report


def run(args: argparse.Namespace) -> int:
    run_merge(args, args.out)
    return 0

"""`salr export`: leave salr with standard files: a pruned base + PEFT LoRA adapter, or a merged transformers model."""

from __future__ import annotations

import argparse
import logging

from salr.commands.merge import add_merge_args, run_merge
from salr.io import check_output_dir

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write OUT/base + OUT/adapter (PEFT LoRA) or a merged transformers checkpoint"
    )
    p.add_argument("run", help="a SALR checkpoint or a salr train run directory")
    p.add_argument(
        "--to",
        required=True,
        choices=["peft", "merged"],
        help="peft: OUT/base (pruned transformers model) + OUT/adapter (PEFT LoRA); merged: one transformers model",
    )
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_argument_group("--to merged")
    add_merge_args(g)
    p.add_argument("--quiet", action="store_true", help="merged: print the totals only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.to == "merged":
        run_merge(args, args.out)
        return 0
    from salr.checkpoint import load, read_salr_config
    from salr.config import SALRConfig
    from salr.merge import resolve_run
    from salr.peft_adapter import ADAPTER_DIR, BASE_DIR, export_peft

    check_output_dir(args.out, ADAPTER_DIR, "export", entries={BASE_DIR})
    source = resolve_run(args.run)
    model, tokenizer = load(source, huge_pages=False)  # rewritten, not decoded
    summary = export_peft(model, tokenizer, SALRConfig.from_dict(read_salr_config(source)["salr"]), args.out)
    print(
        f"exported {summary['targets']} adapted weights ({summary['expert_targets']} fused expert parameters), "
        f"rank {'/'.join(map(str, summary['ranks']))}: base {summary['bytes']['base']:,} bytes, adapter "
        f"{summary['bytes']['adapter']:,} bytes"
    )
    print(f"wrote {summary['base']} (transformers) and {summary['adapter']} (PEFT)")
    return 0

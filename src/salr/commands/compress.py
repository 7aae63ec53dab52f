"""`salr compress`: prune a model's frozen base, initialise SVD residual + LoRA adapters, save a checkpoint."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from salr.checkpoint import save, size_report
from salr.commands.common import add_model_arg, add_salr_args, config_from_args
from salr.config import SALRConfig
from salr.io import atomic_write_json
from salr.model import convert, pack_bases
from salr.models import load_model

logger = logging.getLogger(__name__)
REPORT_NAME = "salr_report.json"


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


def format_report(report: dict, max_rows: int | None = None) -> str:
    """A human-readable per-layer table plus totals."""
    lines = [f"{'layer':<48} {'shape':>11} {'sparsity':>8} {'pruned ‖E‖²':>12} {'after SVD':>12} {'Thm3 bound':>12}"]
    rows = report["layers"] if max_rows is None else report["layers"][:max_rows]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{r['name'][-48:]:<48} {shape:>11} {r['sparsity']:>8.4f} {r['pruned_energy']:>12.4g} "
            f"{r['residual_energy_after_svd']:>12.4g} {r['theorem3_bound']:>12.4g}"
        )
    if max_rows is not None and len(report["layers"]) > max_rows:
        lines.append(f"... {len(report['layers']) - max_rows} more layers in salr_report.json")
    t = report["totals"]
    lines.append(
        f"total: {t['target_layers']} layers, sparsity {t['sparsity']:.4f}, parameters {t['parameters']:,}, "
        f"nonzero {t['nonzero_parameters']:,}, adapter parameters {t['adapter_parameters']:,}, "
        f"energy {t['pruned_energy']:.4g} -> {t['residual_energy_after_svd']:.4g} after SVD, "
        f"{report.get('seconds', 0):.1f} s"
    )
    if "checkpoint_bytes" in t:
        lines.append(
            f"checkpoint: {t['checkpoint_bytes']:,} bytes (format ideal {t['ideal_bytes']:,}; dense model "
            f"{t['dense_bytes']:,}, {t['dense_bytes'] / t['checkpoint_bytes']:.2f}x larger)"
        )
    return "\n".join(lines)


def compress(
    model_spec: str, config: SALRConfig, output: str | Path, dtype: str | None = None, base_format: str = "bitmap"
) -> dict:
    """Load, convert, pack and save; returns the report (also written to output/salr_report.json)."""
    started = time.perf_counter()
    model, tokenizer = load_model(model_spec, dtype=dtype)
    report = convert(model, config)
    if base_format == "bitmap":
        pack_bases(model)
    report["model"] = model_spec
    report["base_format"] = base_format
    report["seconds"] = time.perf_counter() - started  # load + prune + SVD + pack
    save(model, output, config, tokenizer=tokenizer, base_model=model_spec)
    report["totals"].update(size_report(model, output))
    atomic_write_json(Path(output) / REPORT_NAME, report)
    return report


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    report = compress(args.model, config, args.output, dtype=args.dtype, base_format=args.base_format)
    if not args.quiet:
        print(format_report(report))
    print(f"wrote {args.output} and {Path(args.output) / REPORT_NAME}")
    return 0

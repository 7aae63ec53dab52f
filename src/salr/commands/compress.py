"""`salr compress`: prune a model's frozen base, initialise SVD residual + LoRA adapters, save a checkpoint."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from salr.checkpoint import save
from salr.commands.common import add_model_arg, add_salr_args, config_from_args
from salr.model import convert
from salr.models import load_model

logger = logging.getLogger(__name__)
REPORT_NAME = "salr_report.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compress", help="prune + residual SVD + LoRA init; writes DIR and DIR/salr_report.json")
    add_model_arg(p)
    add_salr_args(p)
    p.add_argument("--output", required=True, help="checkpoint directory to write")
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
    return "\n".join(lines)


def compress(model_spec: str, config, output: str | Path, dtype: str | None = None) -> dict:
    """Load, convert and save; returns the report (also written to output/salr_report.json)."""
    started = time.perf_counter()
    model, tokenizer = load_model(model_spec, dtype=dtype)
    report = convert(model, config)
    report["model"] = model_spec
    report["seconds"] = time.perf_counter() - started  # load + prune + SVD
    save(model, output, config, tokenizer=tokenizer, base_model=model_spec, extra_files={REPORT_NAME: report})
    return report


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    report = compress(args.model, config, args.output, dtype=args.dtype)
    if not args.quiet:
        print(format_report(report))
    print(f"wrote {args.output} and {Path(args.output) / REPORT_NAME}")
    return 0

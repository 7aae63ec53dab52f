"""`compress`: load a model, convert it (prune + residual + LoRA init), pack the bases, save a checkpoint and its
report (`salr_report.json`, written inside the checkpoint before it is renamed into place)."""

from __future__ import annotations

import time
from pathlib import Path

from salr.checkpoint import prepare_output, save, size_report
from salr.config import SALRConfig
from salr.convert import convert, pack_bases
from salr.errors import SALRError
from salr.loaders import load_model

REPORT_NAME = "salr_report.json"


def format_report(report: dict, max_rows: int | None = None) -> str:
    """A human-readable per-layer table plus totals."""
    outputs = any(r.get("output_error_after_residual") is not None for r in report["layers"])
    head = f"{'layer':<48} {'shape':>11} {'sparsity':>8} {'pruned ‖E‖²':>12} {'after fit':>12} {'Thm3 bound':>12}"
    lines = [head + (f" {'out err pruned':>14} {'+ residual':>10}" if outputs else "")]
    rows = report["layers"] if max_rows is None else report["layers"][:max_rows]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        line = (
            f"{r['name'][-48:]:<48} {shape:>11} {r['sparsity']:>8.4f} {r['pruned_energy']:>12.4g} "
            f"{r['residual_energy_after_svd']:>12.4g} {r['theorem3_bound']:>12.4g}"
        )
        if outputs:  # ‖(W0 − Ŵ [− B A]) X‖ / ‖W0 X‖ on the calibration activations
            line += f" {r['output_error_before_residual']:>14.4f} {r['output_error_after_residual']:>10.4f}"
        lines.append(line)
    if max_rows is not None and len(report["layers"]) > max_rows:
        lines.append(f"... {len(report['layers']) - max_rows} more layers in salr_report.json")
    t = report["totals"]
    lines.append(
        f"total: {t['target_layers']} layers, sparsity {t['sparsity']:.4f}, parameters {t['parameters']:,}, "
        f"nonzero {t['nonzero_parameters']:,}, adapter parameters {t['adapter_parameters']:,}, "
        f"energy {t['pruned_energy']:.4g} -> {t['residual_energy_after_svd']:.4g} after SVD, "
        f"{report.get('seconds', 0):.1f} s"
    )
    tuned = report.get("block_tuning")
    if tuned:  # the per-layer output errors above are those before block tuning
        before = sum(r["block_error_before"] for r in tuned) / len(tuned)
        after = sum(r["block_error_after"] for r in tuned) / len(tuned)
        lines.append(
            f"block tuning: {len(tuned)} blocks, mean relative block output error {before:.4g} -> {after:.4g} "
            "(the layer errors above are before it)"
        )
    if t.get("quant", "none") != "none":
        lines.append(
            f"quantization: {t['quant']} in blocks of {t.get('quant_blocksize', 64)}"
            f"{' + double-quantized scales' if t.get('quant_double') else ''}, "
            f"{t.get('quant_scales') or 'absmax'} scales, {t.get('quant_rounding') or 'nearest'} rounding, error "
            f"energy {t['quantization_energy']:.4g} (pruning {t['pruned_energy']:.4g}); the residual absorbs both"
        )
    if "checkpoint_bytes" in t:
        lines.append(
            f"checkpoint: {t['checkpoint_bytes']:,} bytes (format ideal {t['ideal_bytes']:,}; dense bf16 model "
            f"{t['dense_bytes']:,}, {t['dense_bytes'] / t['checkpoint_bytes']:.2f}x larger); frozen bases "
            f"{t['base_bytes']:,} bytes"
        )
    return "\n".join(lines)


def compress(
    model_spec: str, config: SALRConfig, output: str | Path, dtype: str | None = None, base_format: str = "bitmap"
) -> dict:
    """Load, convert, pack and save; returns the report (also written to output/salr_report.json)."""
    if config.quant != "none" and base_format != "bitmap":
        raise SALRError(f"--quant {config.quant} stores quantized bitmap bases: drop --base-format {base_format}")
    output = prepare_output(output)  # fail before the work, not after it
    started = time.perf_counter()
    model, tokenizer = load_model(model_spec, dtype=dtype)
    report = convert(model, config, tokenizer=tokenizer)
    if base_format == "bitmap":
        pack_bases(model)
    report["model"] = model_spec
    report["base_format"] = base_format
    report["seconds"] = time.perf_counter() - started  # load + prune + SVD + pack

    def final_report(directory: Path) -> dict:
        report["totals"].update(size_report(model, directory))
        return report

    save(model, output, config, tokenizer=tokenizer, base_model=model_spec, extra_files={REPORT_NAME: final_report})
    return report

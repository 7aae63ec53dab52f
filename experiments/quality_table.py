"""Compression quality at init: WikiText-2 perplexity of one model compressed with several recipes, side by side.

Each recipe is a JSON object of SALRConfig fields on top of `--preset` (default: the paper's recipe, so a recipe
names what it changes). All recipes share one set of calibration windows (sampled once, as `salr compress` samples
them with the same seed), and the perplexity is `salr eval --task wikitext2 --limit N`'s measure (windows of
min(context, 1024), stride 512). This is what docs/quality.md reports:

    python experiments/quality_table.py --output runs/quality \
        '{"residual_rank": 0}' '{}' '{"criterion": "wanda", "residual_rank": 0}' '{"criterion": "wanda"}' \
        '{"residual_init": "whitened"}' '{"criterion": "sparsegpt", "residual_init": "whitened"}' \
        '{"criterion": "sparsegpt", "residual_init": "alternating"}'

Each row is what `salr compress --model M --preset paper <the recipe as flags> --output D` followed by
`salr eval --model D --task wikitext2 --data wiki.test.raw --limit N` computes (a recipe that needs calibration
gets `calibration: self`, and Wanda / SparseGPT their default per-row granularity, unless it says otherwise).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import torch

from salr.calibration import calibration_ids
from salr.config import SALRConfig
from salr.convert import convert
from salr.evaluate import perplexity
from salr.io import atomic_write_json
from salr.loaders import load_model

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="+", help="JSON objects of SALRConfig fields, one per row")
    p.add_argument("--model", default="default")
    p.add_argument("--preset", default="paper", help="the recipe each row starts from")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--residual-rank", type=int, default=64)
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--calibration-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling and of the conversion")
    p.add_argument("--wikitext", default=str(WIKITEXT))
    p.add_argument("--limit", type=int, default=20, help="perplexity windows")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--output", required=True, help="directory for results.json and results.md")
    return p.parse_args(argv)


def recipe_config(preset: str, fields: dict) -> SALRConfig:
    """`preset` with `fields` on top; activation-aware recipes get self-calibration and their default granularity."""
    if fields["pattern"] != "unstructured":
        fields["sparsity"] = None
    plain = SALRConfig.from_preset("paper")
    if fields.get("criterion", plain.criterion) != "magnitude":
        fields.setdefault("granularity", None)
    if fields.get("criterion", plain.criterion) != "magnitude" or fields.get("residual_init", "svd") != "svd":
        fields.setdefault("calibration", "self")
    return SALRConfig.from_preset(preset, **fields)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    text = Path(args.wikitext).read_text(encoding="utf-8")
    dense, tokenizer = load_model(args.model)
    dense_ppl = perplexity(dense, tokenizer, text, limit=args.limit)["perplexity"]
    started = time.perf_counter()
    ids = calibration_ids(dense, tokenizer, "self", args.calibration_samples, args.calibration_length, args.seed)
    rows = [{"recipe": "dense", "perplexity": dense_ppl, "calibration_seconds": time.perf_counter() - started}]
    print(f"dense: perplexity {dense_ppl:.2f}", flush=True)
    for recipe in args.recipes:
        fields = {
            "sparsity": args.sparsity,
            "pattern": args.pattern,
            "residual_rank": args.residual_rank,
            "calibration_samples": args.calibration_samples,
            "calibration_length": args.calibration_length,
            "seed": args.seed,
            **json.loads(recipe),
        }
        config = recipe_config(args.preset, fields)
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        report = convert(model, config, progress=False, calibration=ids if config.needs_calibration else None)
        seconds = time.perf_counter() - started
        errors = [r["output_error_after_residual"] for r in report["layers"]]
        row = {
            "recipe": recipe,
            "criterion": config.criterion,
            "residual_init": config.residual_init,
            "residual_rank": config.residual_rank,
            "perplexity": perplexity(model, tokenizer, text, limit=args.limit)["perplexity"],
            "convert_seconds": seconds,
            "mean_output_error": sum(errors) / len(errors) if errors[0] is not None else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"args": vars(args), "rows": rows, "peak_rss_mib": peak_mib, "argv": sys.argv}
    atomic_write_json(out / "results.json", result)
    lines = ["| recipe | mask | residual | rank | perplexity | convert s |", "|---|---|---|---:|---:|---:|"]
    for r in rows[1:]:
        lines.append(
            f"| `{r['recipe']}` | {r['criterion']} | {r['residual_init']} | {r['residual_rank']} | "
            f"{r['perplexity']:.2f} | {r['convert_seconds']:.0f} |"
        )
    (out / "results.md").write_text(f"dense: {dense_ppl:.2f}\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

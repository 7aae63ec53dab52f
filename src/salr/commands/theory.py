"""`salr theory`: the paper's MSE framework checked numerically (closed forms vs Monte Carlo, Theorems 3 and 4)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from salr.errors import SALRError
from salr.io import atomic_write_json, check_writable_file
from salr.theory import DELTA_KINDS, PLACEMENTS, collect_linear_inputs, plot_sweep, theory_report

logger = logging.getLogger(__name__)

# The default model is relative to the repository root (src/salr/commands/theory.py -> parents[3]).
DEFAULT_MODEL = (
    Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "models" / "stories260K" / "stories260K.bin"
)
# A TinyStories-like passage: real activations for the Theorem 4 check on the tiny story model.
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog. "
    "One day, she saw a big red ball under a tree. She ran to the ball and kicked it very high. Her dog barked "
    'and ran after it. Lily laughed and said, "Good dog!" They played all day until the sun went down.'
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("theory", help="check the paper's MSE framework numerically; writes a JSON report")
    p.add_argument("--json", required=True, help="report to write")
    p.add_argument("--plot", help="PNG of MSE vs sparsity for the three placements, with and without SVD recovery")
    p.add_argument(
        "--model",
        help="model for the real-weight checks (default: the stories260K llama2.c checkpoint in ../shared; "
        "'none' skips them)",
    )
    p.add_argument("--samples", type=int, default=64, help="Monte Carlo matrices per (sparsity, update kind)")
    p.add_argument("--recovery-samples", type=int, default=8, help="of those, how many get the SVD recovery")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau", type=float, default=0.5, help="update scale: per-entry std of Δ relative to W0's")
    p.add_argument("--shape", type=int, nargs=2, default=[256, 256], metavar=("D", "K"), help="W0 shape")
    p.add_argument("--rank", type=int, default=32, help="SVD recovery rank r on the D x K matrix")
    p.add_argument("--delta-rank", type=int, default=16, help="rank of the LoRA-like update Δ = B A")
    p.set_defaults(func=run)


def _real_model_inputs(spec: str | None) -> tuple[str | None, list, dict]:
    """(model name, [(name, weight)] of the decoder's linear layers, {name: layer input}) or empty when skipped."""
    if spec == "none":
        return None, [], {}
    path = Path(spec) if spec else DEFAULT_MODEL.resolve()
    if spec is None and not path.is_file():
        logger.warning("default model %s not found: skipping the real-weight checks (pass --model)", path)
        return None, [], {}
    from salr.loaders import load_model  # heavy import (transformers), only when needed

    model, tokenizer = load_model(str(path))
    model = model.float()
    weights = [
        (name, m.weight)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    ]
    if not weights:
        raise SALRError(f"{path}: no nn.Linear layers found for the Theorem 3 check")
    input_ids = tokenizer(STORY, return_tensors="pt")["input_ids"]
    return str(path), weights, collect_linear_inputs(model, input_ids)


def format_summary(report: dict) -> str:
    """A readable table of the headline numbers."""
    pm, pl, c = report["pruning_mse"], report["placements"], report["checks"]
    lines = [
        f"pruning MSE at p=0.5: closed form {pm['closed_form']:.5f} σ², Monte Carlo {pm['monte_carlo']:.5f} "
        f"± {pm['monte_carlo_stderr']:.5f}, paper {pm['paper']} "
        f"(closed form vs paper: {c['pruning_mse_p50_rel_error_vs_paper']:.2%})",
        f"placements at p=0.5, τ={report['config']['tau']} (per-entry MSE / σ²; 'rec' = after rank-"
        f"{report['config']['rank']} SVD):",
        f"  {'Δ':<9} {'':<3} {'closed':>9} {'MC':>9} {'rel.err':>8} {'closed rec':>11} {'MC rec':>9}",
    ]
    rows = {(r["delta"], r["placement"]): r for r in report["sweep"] if r["sparsity"] == 0.5}
    for kind in DELTA_KINDS:
        for name in PLACEMENTS:
            r = rows[(kind, name)]
            closed_rec = "-" if r["closed_form_recovered"] is None else f"{r['closed_form_recovered']:.5f}"
            lines.append(
                f"  {kind:<9} {name:<3} {r['closed_form']:>9.5f} {r['monte_carlo']:>9.5f} {r['rel_error']:>8.2%} "
                f"{closed_rec:>11} {r['monte_carlo_recovered']:>9.5f}"
            )
    order = pl["ordering"]
    lines.append(
        f"ordering {order['paper']} (paper): closed form {'holds' if order['closed_form_holds'] else 'FAILS'}, "
        f"Monte Carlo {'holds' if order['monte_carlo_holds'] else 'FAILS'} at every sparsity; after SVD recovery "
        f"(MC) {'holds' if order['monte_carlo_recovered_holds'] else 'fails at ' + str(len(order['exceptions']))} "
        "(see placements.ordering.exceptions)"
    )
    lines.append(
        f"Monte Carlo vs closed form over the sweep: max rel. error {c['monte_carlo_max_rel_error']:.2%} "
        f"(within 2 %: {c['monte_carlo_within_2pct']}); recovered vs Marchenko–Pastur: "
        f"{c['recovered_max_rel_error_vs_marchenko_pastur']:.2%}"
    )
    t3 = report["theorem3"]
    for r in t3["random"]:
        lines.append(
            f"Theorem 3, Gaussian {r['shape'][0]}x{r['shape'][1]} r={r['rank']}: tail/bound {r['tightness']:.3f} "
            f"(Marchenko–Pastur {r['marchenko_pastur_tightness']:.3f}), holds {r['holds']}"
        )
    if "layers" in t3["real"]:
        real = t3["real"]
        lines.append(
            f"Theorem 3, {len(real['layers'])} real layers: tail/bound min {real['tightness_min']:.3f} mean "
            f"{real['tightness_mean']:.3f} max {real['tightness_max']:.3f}, holds {real['all_hold']}"
        )
    t4 = report["theorem4"]
    r = t4["random"]
    lines.append(
        f"Theorem 4, Gaussian X {r['shape'][0]}x{r['shape'][1]}: σ_max power {r['sigma_max_power']:.5f} vs exact "
        f"{r['sigma_max_exact']:.5f} (rel. error {r['rel_error']:.1e}), η* = {r['learning_rate_exact']:.4e}"
    )
    if "layers" in t4["real"]:
        lines.append(
            f"Theorem 4, {len(t4['real']['layers'])} real layer inputs: max rel. error "
            f"{t4['real']['max_rel_error']:.1e}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    check_writable_file(args.json, "--json")  # before the experiments run, not after
    started = time.perf_counter()
    # Many small matrices: thread start-up costs more than it saves, and 10x more on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_name, weights, inputs = _real_model_inputs(args.model)
        report = theory_report(
            tau=args.tau,
            shape=tuple(args.shape),
            rank=args.rank,
            samples=args.samples,
            recovery_samples=args.recovery_samples,
            delta_rank=args.delta_rank,
            seed=args.seed,
            named_weights=weights or None,
            layer_inputs=inputs or None,
        )
    finally:
        torch.set_num_threads(threads)
    report["model"] = model_name
    report["seconds"] = time.perf_counter() - started
    if args.plot:
        plot_sweep(report["sweep"], args.plot, args.rank, tuple(args.shape), args.tau)
    atomic_write_json(args.json, report)
    print(format_summary(report))
    print(f"wrote {args.json}" + (f" and {args.plot}" if args.plot else "") + f" ({report['seconds']:.1f} s)")
    return 0

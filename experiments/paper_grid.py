"""The paper's comparisons at small scale: pretrained, LoRA, SALR, prune+LoRA, SALR with frozen residual, LoSA.

Every run fine-tunes the default model (SmolLM2-135M-Instruct) on GSM8K train minus its last `--holdout`
problems, then evaluates on the held-out problems (GSM8K accuracy and answer NLL), MMLU k-shot and WikiText-2
perplexity. Test files are arguments, so the real test splits can be used. Writes OUTPUT/results.json,
OUTPUT/results.md and OUTPUT/{sparsity_sweep,loss_curves}.png.

    python experiments/paper_grid.py --quick --output runs/quick     # < 20 min: 18.1 min on 2 cores (2026-11-30)
    python experiments/paper_grid.py --output runs/full              # 12 runs: 2.23 h on 2 cores (2026-12-01)

Trainable parameters: LoRA and prune+LoRA use rank residual_rank + lora_rank, exactly SALR's trainable count
(A_cat / B_cat hold residual_rank + lora_rank rows either way); SALR with a frozen residual trains only its
LoRA block; LoSA (salr.losa) prunes the dense model progressively during the same steps on the same examples and
ends with a mean LoRA rank of residual_rank + lora_rank, merged into its sparse weights (no adapters deployed).
The "deployed MB" column is salr.footprint.deployed_bytes at bf16: dense, bitmap-sparse, or base + adapters (a
quantized base at its stored NF4 / int8 payload).

Optional runs (`--quant`, or name them in `--runs`): QSALR at 50 % with the paper's and the salr+ recipe (NF4 base,
the residual absorbs pruning and quantization error) and QLoRA (dense NF4 base + LoRA of SALR's trainable rank):

    python experiments/paper_grid.py --runs salr@50%,qsalr@50%,qlora@nf4 --output runs/qsalr

`--recovery-steps N` distills each converted run towards the dense model on the training problems' text (KL on
every position) before its task fine-tuning: the data-free repair of `salr train --distill`, on the same data pool.
Dense LoRA skips it (it equals the dense model at init), so it is extra compute for the compressed runs alone.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from salr import data, evaluate
from salr.config import BLOCK_TUNING_STEPS, SALRConfig
from salr.convert import convert
from salr.footprint import deployed_bytes
from salr.io import atomic_write_bytes, atomic_write_json
from salr.layer import FusedAdapters
from salr.loaders import load_model
from salr.losa import LoSAConfig, train_losa
from salr.losa.config import PRUNE_METHODS
from salr.train import TrainConfig, every_position_examples, load_examples, method_config, train

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("paper_grid")
SHARED = ROOT.parent / "shared" / "data"
# Override salr+'s (LoSA's) values; the paper preset keeps its own (no data, no alternating rounds).
CALIBRATION_ARGS = (
    "calibration",
    "calibration_samples",
    "calibration_length",
    "alternating_rounds",
    "alternating_momentum",
    "block_tuning_steps",
    "block_tuning_lr",
)


@dataclass
class Run:
    name: str
    method: str  # "pretrained" or one of salr.train.METHODS ("losa": salr.losa, no conversion)
    pattern: str = "unstructured"
    sparsity: float | None = 0.5
    preset: str = "paper"  # how the base is pruned and the residual initialised (salr.config.PRESETS)


OPTIONAL = [
    Run("qsalr@50%", "qsalr"),
    Run("qsalr+@50%", "qsalr", preset="salr+"),
    Run("qlora@nf4", "qlora", sparsity=None),
]


def grid(quick: bool, optional: bool = False) -> list[Run]:
    """Full: 4 methods x {50% unstructured, 2:4} with the paper's recipe, SALR+ (our default recipe: SparseGPT mask
    and whitened residual alternated, self-calibration) and prune-LoRA on the same SparseGPT mask at 50 % and 2:4,
    and a sweep of the paper's SALR at 10/30/60/70 %. Runs named "+" use the salr+ preset, the others the paper's.

    Quick: the 4 methods at 50% unstructured, SALR and SALR+ at 50% and 2:4, and the paper's SALR at 30% and 70%,
    besides the pretrained model. `optional` adds the QSALR (both recipes) and QLoRA runs (OPTIONAL) at the end.

    Both: LoSA at 50 % (quick) and 2:4 (full), calibrated like SALR+ (self-generated windows; LoSA's own Wanda).
    """
    methods = ["lora", "salr", "prune-lora", "salr-frozen-residual"]
    runs = [Run("pretrained", "pretrained", sparsity=None)]
    runs += [Run(f"{m}@50%", m) for m in methods]
    runs += [Run("salr+@50%", "salr", preset="salr+")]
    patterns_24 = ["salr"] if quick else [m for m in methods if m != "lora"]
    runs += [Run(f"{m}@2:4", m, "2:4", None) for m in patterns_24]
    runs += [Run("salr+@2:4", "salr", "2:4", None, preset="salr+")]
    runs += [Run("losa@50%", "losa", preset="salr+")]
    if not quick:
        runs += [Run("losa@2:4", "losa", "2:4", None, preset="salr+")]
    if not quick:
        runs += [
            Run("prune-lora+@50%", "prune-lora", preset="salr+"),
            Run("prune-lora+@2:4", "prune-lora", "2:4", None, preset="salr+"),
        ]
    sweep = [0.3, 0.7] if quick else [0.1, 0.3, 0.6, 0.7]
    runs += [Run(f"salr@{round(s * 100)}%", "salr", sparsity=s) for s in sweep]
    return runs + (OPTIONAL if optional else [])


def takes_sparsity_pattern(run: Run) -> bool:
    """--sparsity-pattern replaces the 50 % of the unstructured runs that convert (not the sweep, N:M or LoSA, which
    allocates its own layer sparsities)."""
    return run.pattern == "unstructured" and run.sparsity == 0.5 and run.method != "losa"


def run_config(run: Run, args: argparse.Namespace) -> SALRConfig:
    """The SALRConfig a (non-pretrained) run converts and trains with: `method_config` gives LoRA / prune+LoRA one
    block of rank residual_rank + lora_rank, SALR's trainable parameter count, at the same LoRA scale (2)."""
    base = SALRConfig.from_preset(
        run.preset,
        sparsity=run.sparsity,
        pattern=run.pattern,
        residual_rank=args.residual_rank,
        residual_rank_pattern=args.residual_rank_pattern,
        sparsity_pattern=args.sparsity_pattern if takes_sparsity_pattern(run) else None,
        r=args.lora_rank,
        lora_alpha=2.0 * args.lora_rank,
        seed=args.seed,
        **{
            k: getattr(args, k)
            for k in CALIBRATION_ARGS
            if getattr(args, k, None) is not None and run.preset != "paper"
        },
    )
    return method_config(run.method, base)


def conversion_key(config: SALRConfig) -> str:
    """Runs whose configs differ only in train_residual (salr and salr-frozen-residual) convert identically:
    same mask, same SVD residual, same LoRA init; the layers' `train_residual` is set after the copy."""
    fields = config.to_dict()
    fields.pop("train_residual")
    return json.dumps(fields, sort_keys=True)


class Conversions:
    """Converted-but-untrained models kept for the later runs of the grid that convert identically."""

    def __init__(self, runs: list[Run], args: argparse.Namespace) -> None:
        self.remaining = Counter(
            conversion_key(run_config(r, args)) for r in runs if r.method not in ("pretrained", "losa")
        )
        self.kept: dict[str, tuple[Any, dict[str, Any], str]] = {}

    def get(
        self, run: Run, config: SALRConfig, dense: Any, tokenizer: Any = None
    ) -> tuple[Any, dict[str, Any], str | None]:
        """(converted model to train, conversion report, name of the run whose conversion was reused or None)."""
        key = conversion_key(config)
        self.remaining[key] = self.remaining.get(key, 1) - 1
        if key in self.kept:
            model, report, source = self.kept[key]
            if self.remaining[key] <= 0:
                del self.kept[key]
            else:
                model = copy.deepcopy(model)
            for module in model.modules():
                if isinstance(module, FusedAdapters):
                    module.train_residual = config.train_residual
            return model, report, source
        model = copy.deepcopy(dense)
        report = convert(model, config, progress=False, tokenizer=tokenizer)
        if self.remaining[key] > 0:
            self.kept[key] = (copy.deepcopy(model), report, run.name)
        return model, report, None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--train-data", default=str(SHARED / "gsm8k" / "train.jsonl"))
    p.add_argument("--holdout", type=int, default=500, help="last N train problems = development evaluation set")
    p.add_argument("--gsm8k-test", help="GSM8K-format file to evaluate on instead of the held-out problems")
    p.add_argument("--mmlu", default=str(SHARED / "mmlu" / "val"), help="MMLU csv file or directory")
    p.add_argument("--mmlu-dev", default=str(SHARED / "mmlu" / "dev"), help="few-shot examples")
    p.add_argument("--wikitext", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--output", required=True)
    p.add_argument("--quick", action="store_true", help="small preset: 8 runs of 12 steps, small eval slices")
    p.add_argument("--runs", help="comma-separated run names to run, in this order (e.g. pretrained,salr@50%%)")
    p.add_argument("--quant", action="store_true", help="add the optional QSALR and QLoRA (NF4) runs")
    p.add_argument("--residual-rank", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument(
        "--residual-rank-pattern",
        type=json.loads,
        help="per-layer residual ranks of the SALR runs, JSON {regex: rank} (SALRConfig.residual_rank_pattern); "
        "the LoRA-type runs keep one rank, lora rank + residual rank, everywhere",
    )
    p.add_argument(
        "--sparsity-pattern",
        type=json.loads,
        help="per-layer sparsity of the unstructured 50 %% runs (not the sweep, N:M or LoSA), JSON {regex: sparsity} "
        "(SALRConfig.sparsity_pattern); layers no key matches keep 50 %%",
    )
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--residual-lr", type=float,
        help="peak lr of the SALR residual block (TrainConfig.residual_lr; default: --lr). The LoRA block and every "
        "other method keep --lr",
    )  # fmt: skip
    p.add_argument(
        "--recovery-steps", type=int, default=0,
        help="distillation steps towards the dense model on the training text, after conversion and before the "
        "task fine-tuning (salr train --distill with the grid's training problems as text; 0 = none). Runs whose "
        "model equals the dense one at init (lora) skip it: their KL and its gradient are exactly zero",
    )  # fmt: skip
    p.add_argument(
        "--prompt-distill", type=float, default=0.0,
        help="every fine-tuned run (not LoSA) adds this weight times the KL to the dense model at the prompt "
        "positions to its answer loss (TrainConfig.prompt_distill; 0 = off)",
    )  # fmt: skip
    p.add_argument("--recovery-lr", type=float, default=1e-4, help="peak lr of the recovery distillation")
    p.add_argument("--recovery-batch-size", type=int, default=8, help="sequences per recovery step (at most all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-runs", action="store_true", help="keep each run's saved checkpoint under OUTPUT/runs")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default, one per core)")
    p.add_argument(
        "--calibration",
        help="calibration text of SALR+ and LoSA: 'self' (default), a file, or 'train': the grid's own training "
        "problems (the --train-examples every method fine-tunes on; never the held-out ones)",
    )
    p.add_argument(
        "--calibration-samples", type=int, help="calibration windows of SALR+ and LoSA (default: SALRConfig's, 64)"
    )
    p.add_argument("--calibration-length", type=int, help="tokens per calibration window (default: SALRConfig's, 128)")
    p.add_argument(
        "--alternating-rounds",
        type=int,
        help=f"salr+'s prune / whitened-fit rounds (default: SALRConfig's, {SALRConfig().alternating_rounds})",
    )
    p.add_argument(
        "--alternating-momentum",
        type=float,
        help="salr+'s extrapolation of the low-rank part between rounds (0 = plain alternation; default: "
        f"SALRConfig's, {SALRConfig().alternating_momentum})",
    )
    p.add_argument(
        "--block-tuning-steps",
        type=int,
        help="salr+'s block-wise reconstruction steps per block (default: SALRConfig's: "
        f"{BLOCK_TUNING_STEPS} with a quantized base or an N:M pattern, else 0)",
    )
    p.add_argument(
        "--block-tuning-lr",
        type=float,
        help=f"its learning rate (default: SALRConfig's, {SALRConfig().block_tuning_lr})",
    )
    p.add_argument("--wikitext-length", type=int, default=512, help="tokens per WikiText-2 window")
    p.add_argument("--losa-rounds", type=int, default=5, help="LoSA's prune / fine-tune rounds")
    p.add_argument(
        "--losa-prune-method", choices=PRUNE_METHODS, default="wanda",
        help="LoSA's one-shot pruning of each round (LoSA: wanda; sparsegpt isolates the mask's share of a gap)",
    )  # fmt: skip
    # Switches that isolate LoSA's parts against prune-LoRA+ (docs/losa.md): uniform sparsity, uniform ranks, warmup.
    p.add_argument("--losa-no-rmi-allocation", action="store_true", help="LoSA: every block at the round's sparsity")
    p.add_argument("--losa-no-rank-allocation", action="store_true", help="LoSA: every block at the mean rank")
    p.add_argument(
        "--losa-unmasked-training", action="store_true",
        help="LoSA ablation: train B A unmasked on the pruned base, mask it only when merging (prune-LoRA's way)",
    )  # fmt: skip
    p.add_argument(
        "--losa-warmup-ratio", type=float, default=0.3,
        help="LoSA: warmup of each round's schedule, fraction of its steps (LoSA: 0.3; the other runs: 3%% of all)",
    )  # fmt: skip
    # Full: sized to < 3 h on 2 cores. Measured 2026-11-30 at 80 steps / 100+30+100 eval items: pretrained 11.6 min
    # (eval only), lora@50% 15.7 min (train 515 s + eval 423 s), 12 runs ~3.1 h. With the sizes below: 8024 s.
    for name, full, quick in [
        ("train-examples", 1000, 64),
        ("steps", 60, 12),
        ("batch-size", 4, 4),
        ("max-length", 384, 256),
        ("nll-limit", 80, 24),
        ("accuracy-limit", 20, 8),
        ("max-new-tokens", 192, 80),
        ("mmlu-limit", 60, 8),
        ("mmlu-shots", 5, 5),
        ("wikitext-windows", 16, 2),
    ]:
        p.add_argument(f"--{name}", type=int, help=f"default {full} ({quick} with --quick)")
        p.set_defaults(**{f"_{name.replace('-', '_')}_defaults": (full, quick)})
    args = p.parse_args(argv)
    for key in list(vars(args)):
        if key.startswith("_") and key.endswith("_defaults"):
            name = key[1 : -len("_defaults")]
            if getattr(args, name) is None:
                setattr(args, name, getattr(args, key)[1 if args.quick else 0])
            delattr(args, key)
    return args


@contextlib.contextmanager
def timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to seconds[key]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started


def evaluate_model(
    model: Any, tokenizer: Any, dev: list[dict], text: str, args: argparse.Namespace, seconds: dict[str, float]
) -> dict[str, Any]:
    """The evaluation metrics of one run; each evaluation's wall time goes into `seconds`."""
    started = time.perf_counter()
    with timed(seconds, "eval_answer_nll"):
        nll = evaluate.answer_nll(model, tokenizer, dev[: args.nll_limit])
    acc = {"accuracy": None, "n": 0, "generated_tokens": 0}  # --accuracy-limit 0 / --mmlu-limit 0 skip them
    if args.accuracy_limit > 0:
        with timed(seconds, "eval_gsm8k_generation"):
            acc = evaluate.gsm8k(
                model, tokenizer, dev[: args.accuracy_limit], max_new_tokens=args.max_new_tokens, with_answer_nll=False
            )
    mmlu = {"accuracy": None, "n": 0}
    if args.mmlu_limit > 0:
        with timed(seconds, "eval_mmlu"):
            mmlu = evaluate.mmlu(model, tokenizer, args.mmlu_dev, args.mmlu, k=args.mmlu_shots, limit=args.mmlu_limit)
    with timed(seconds, "eval_wikitext2"):
        ppl = evaluate.perplexity(model, tokenizer, text, max_length=args.wikitext_length, limit=args.wikitext_windows)
    return {
        "gsm8k_answer_nll": nll["answer_nll"],
        "gsm8k_nll_problems": min(len(dev), args.nll_limit),
        "gsm8k_accuracy": acc["accuracy"],
        "gsm8k_accuracy_problems": acc["n"],
        "gsm8k_generated_tokens": acc["generated_tokens"],
        "mmlu_accuracy": mmlu["accuracy"],
        "mmlu_questions": mmlu["n"],
        "wikitext2_perplexity": ppl["perplexity"],
        "wikitext2_tokens": ppl["tokens"],
        "eval_seconds": time.perf_counter() - started,
    }


# What a LoSA row records: the grid's LoSA switches, and per round what the report's rounds say.
LOSA_SWITCHES = ("prune_method", "rmi_allocation", "rank_allocation", "masked_training", "warmup_ratio")
LOSA_ROUND_FIELDS = ("round", "sparsity", "measured_sparsity", "block_sparsity", "ranks", "steps", "prune_seconds")


def losa_config(args: argparse.Namespace) -> LoSAConfig:
    """The LoSA knobs of the grid's command line (the merged copy is not saved: the grid keeps runs by --keep-runs)."""
    return LoSAConfig(
        rounds=args.losa_rounds,
        prune_method=args.losa_prune_method,
        rmi_allocation=not args.losa_no_rmi_allocation,
        rank_allocation=not args.losa_no_rank_allocation,
        masked_training=not args.losa_unmasked_training,
        warmup_ratio=args.losa_warmup_ratio,
        save_merged=False,
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The fine-tuning settings every run shares (the residual lr only acts on SALR's residual blocks)."""
    return TrainConfig(
        lr=args.lr,
        residual_lr=args.residual_lr,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        prompt_distill=args.prompt_distill,
        progress=False,
    )


def needs_recovery(run: Run, args: argparse.Namespace) -> bool:
    """Recovery distills a converted model towards the dense one. Dense LoRA starts equal to the dense model (B = 0),
    so its KL and gradient are exactly zero; LoSA prunes inside its own training."""
    return args.recovery_steps > 0 and run.method not in ("pretrained", "lora", "losa")


def recover(model: Any, dense: Any, tokenizer: Any, examples: list, config: SALRConfig, args: argparse.Namespace,
            out: Path) -> dict[str, Any]:  # fmt: skip
    """Distill the converted model towards the dense one on the training problems' full text (every position a
    target, the answers' labels unused), with the grid's seed; returns the recovery's report fields."""
    texts = every_position_examples([e["input_ids"] for e in examples])
    cfg = TrainConfig(
        lr=args.recovery_lr,
        max_steps=args.recovery_steps,
        batch_size=min(args.recovery_batch_size, len(texts)),
        max_length=args.max_length,
        warmup_steps=2,
        seed=args.seed + 1,  # a different data order from the task fine-tuning's
        residual_lr=None,  # one rate for both blocks, as when the grid's recovery rows were measured
        distill=True,
        progress=False,
    )
    report = train(model, tokenizer, texts, config, cfg, out, base_model=args.model, teacher=dense)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "recovery_steps": report["steps"],
        "recovery_kl_first": report["history"][0]["loss"],
        "recovery_kl_last": report["history"][-1]["loss"],
        "recovery_seconds": report["seconds"],
    }


def train_run(
    run: Run,
    dense: Any,
    tokenizer: Any,
    examples: list,
    args: argparse.Namespace,
    conversions: Conversions,
    seconds: dict[str, float],
) -> tuple[Any, dict[str, Any]]:
    """Convert (or, for LoSA, copy the dense model) and train one run; returns the trained model and its row fields.
    LoSA prunes inside its rounds, so its "convert" is the copy and its pruning time is part of "train"."""
    config = run_config(run, args)
    cfg = train_config(args)
    out = Path(args.output) / "runs" / run.name.replace("@", "_").replace("%", "pct").replace(":", "-")
    with timed(seconds, "convert"):
        if run.method == "losa":
            model, conversion, reused = copy.deepcopy(dense), None, None
        else:
            model, conversion, reused = conversions.get(run, config, dense, tokenizer)
    recovery: dict[str, Any] = {}
    if needs_recovery(run, args):
        with timed(seconds, "recover"):
            recovery = recover(model, dense, tokenizer, examples, config, args, out.with_name(out.name + "_recovery"))
    losa = losa_config(args) if run.method == "losa" else None
    with timed(seconds, "train_and_save"):
        if losa is not None:
            report = train_losa(model, tokenizer, examples, config, cfg, losa, out, base_model=args.model)
        else:
            teacher = dense if cfg.prompt_distill else None
            report = train(model, tokenizer, examples, config, cfg, out, base_model=args.model, teacher=teacher)
    # the training functions save the run after their loop; report["seconds"] covers the loop (LoSA: and pruning)
    seconds["train"] = report["seconds"]
    seconds["save"] = seconds.pop("train_and_save") - report["seconds"]
    fields = {
        "sparsity": config.sparsity,
        "trainable_parameters": report["trainable_parameters"],
        "base_sparsity": report["merged_sparsity"] if conversion is None else conversion["totals"]["sparsity"],
        "conversion_reused_from": reused,
        "train_seconds": report["seconds"],
        "final_loss": report["final_loss"],
        "loss_curve": [h["loss"] for h in report["history"]],
        "tokens_per_s": report["tokens"] / report["seconds"],
        "peak_memory_mib": report["peak_memory_mib"],
        **recovery,
    }
    if losa is not None:
        fields.update({f"losa_{k}": getattr(losa, k) for k in LOSA_SWITCHES})
        fields["losa_rounds"] = [{k: r[k] for k in LOSA_ROUND_FIELDS} for r in report["rounds"]]
    if not args.keep_runs:
        with timed(seconds, "save"):
            shutil.rmtree(out, ignore_errors=True)
    return model, fields


def run_one(
    run: Run,
    dense: Any,
    tokenizer: Any,
    examples: list,
    dev: list,
    text: str,
    args: argparse.Namespace,
    conversions: Conversions,
) -> dict:
    """Convert, train and evaluate one run; returns its row, with the wall time of each stage in `seconds`."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    row: dict[str, Any] = {"name": run.name, "method": run.method, "pattern": run.pattern, "sparsity": run.sparsity}
    if run.method == "pretrained":
        model = dense  # evaluated as loaded; nothing modifies it
    else:
        model, fields = train_run(run, dense, tokenizer, examples, args, conversions, seconds)
        row.update(fields)
    row["deployed_bytes"] = deployed_bytes(model)["total"]
    row.update(evaluate_model(model, tokenizer, dev, text, args, seconds))
    seconds["total"] = time.perf_counter() - started
    row["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    logger.info("%s: %s", run.name, {k: v for k, v in row.items() if k != "loss_curve"})
    return row


def _cell(value: float | None, n: int) -> str:
    return "-" if value is None else f"{value:.3f} ({n})"


def markdown(rows: list[dict], settings: dict) -> str:
    lines = [
        "| run | method | pattern | sparsity | trainable params | deployed MB | GSM8K answer NLL | GSM8K acc | "
        "MMLU acc | WikiText-2 ppl | final train loss |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sparsity = "-" if r["sparsity"] is None else f"{r['sparsity']:.0%}"
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['method']} | {r['pattern'] if r['method'] != 'pretrained' else '-'} | {sparsity} | "
            f"{r.get('trainable_parameters', 0):,} | {r['deployed_bytes'] / 1e6:.1f} | {r['gsm8k_answer_nll']:.4f} | "
            f"{_cell(r['gsm8k_accuracy'], r['gsm8k_accuracy_problems'])} | "
            f"{_cell(r['mmlu_accuracy'], r['mmlu_questions'])} | {r['wikitext2_perplexity']:.2f} | {loss} |"
        )
    for check in (issue_check(rows), quant_check(rows), losa_check(rows)):
        if check:
            lines += ["", check]
    lines += ["", timing_table(rows)]
    return "\n".join(lines) + "\n"


STAGES = [
    ("convert", "convert"),
    ("recover", "recover"),
    ("train", "train"),
    ("save", "save"),
    ("eval_answer_nll", "answer NLL"),
    ("eval_gsm8k_generation", "GSM8K generation"),
    ("eval_mmlu", "MMLU"),
    ("eval_wikitext2", "WikiText-2"),
    ("total", "total"),
]


def timing_table(rows: list[dict]) -> str:
    """Wall seconds per stage and run (convert includes pruning and the SVD; save is the checkpoint that
    salr.train writes, plus deleting it)."""
    lines = [
        "| run | " + " | ".join(label for _, label in STAGES) + " |",
        "|---|" + "---:|" * len(STAGES),
    ]
    for r in rows:
        sec = r.get("seconds", {})
        cells = [f"{sec[k]:.1f}" if k in sec else "-" for k, _ in STAGES]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    totals = [sum(r.get("seconds", {}).get(k, 0.0) for r in rows) for k, _ in STAGES]
    lines.append("| all runs | " + " | ".join(f"{t:.1f}" for t in totals) + " |")
    return "\n".join(lines)


def issue_check(rows: list[dict]) -> str:
    """The issue's check: SALR@50% answer NLL within 3% of LoRA's, below prune-lora's and frozen-residual's."""
    by = {r["name"]: r["gsm8k_answer_nll"] for r in rows}
    if not all(k in by for k in ("salr@50%", "lora@50%", "prune-lora@50%", "salr-frozen-residual@50%")):
        return ""
    gap = by["salr@50%"] / by["lora@50%"] - 1
    return (
        f"SALR@50% answer NLL {by['salr@50%']:.4f} vs LoRA {by['lora@50%']:.4f} ({gap:+.2%}; "
        f"{'within' if abs(gap) <= 0.03 or gap < 0 else 'NOT within'} 3%), prune-lora {by['prune-lora@50%']:.4f} "
        f"({'better' if by['salr@50%'] < by['prune-lora@50%'] else 'NOT better'}), frozen residual "
        f"{by['salr-frozen-residual@50%']:.4f} "
        f"({'better' if by['salr@50%'] < by['salr-frozen-residual@50%'] else 'NOT better'})."
    )


def quant_check(rows: list[dict]) -> str:
    """QSALR's check: answer NLL within 3% of SALR bf16's at 50%, and below QLoRA's at equal trainable parameters."""
    by = {r["name"]: r["gsm8k_answer_nll"] for r in rows}
    if "qsalr@50%" not in by or "salr@50%" not in by:
        return ""
    gap = by["qsalr@50%"] / by["salr@50%"] - 1
    text = (
        f"QSALR@50% answer NLL {by['qsalr@50%']:.4f} vs SALR@50% {by['salr@50%']:.4f} ({gap:+.2%}; "
        f"{'within' if gap <= 0.03 else 'NOT within'} 3%)"
    )
    if "qlora@nf4" in by:
        better = "below" if by["qsalr@50%"] < by["qlora@nf4"] else "NOT below"
        text += f", QLoRA {by['qlora@nf4']:.4f} ({better})"
    return text + "."


def losa_check(rows: list[dict]) -> str:
    """Issue 15's check: LoSA@50% against prune-LoRA@50% on WikiText-2 perplexity, and each SALR run at 50 % against
    LoSA@50% on both metrics with their trainable parameters and deployed bytes side by side."""
    by = {r["name"]: r for r in rows}
    losa = by.get("losa@50%")
    if losa is None:
        return ""
    ppl, nll = losa["wikitext2_perplexity"], losa["gsm8k_answer_nll"]
    parts = []
    if "prune-lora@50%" in by:
        other = by["prune-lora@50%"]["wikitext2_perplexity"]
        parts.append(f"LoSA@50% WikiText-2 ppl {ppl:.2f} vs prune-LoRA@50% {other:.2f} "
                     f"({'better' if ppl < other else 'NOT better'})")  # fmt: skip
    for name in ("salr@50%", "salr+@50%", "salr@70%"):
        if name in by:
            r = by[name]
            parts.append(
                f"{name} ppl {r['wikitext2_perplexity']:.2f} / answer NLL {r['gsm8k_answer_nll']:.4f} vs LoSA "
                f"{ppl:.2f} / {nll:.4f} at {r['trainable_parameters'] / max(1, losa['trainable_parameters']):.2f}x "
                f"LoSA's trainable parameters and {r['deployed_bytes'] / losa['deployed_bytes']:.2f}x its deployed "
                "bytes"
            )
    return "; ".join(parts) + "." if parts else ""


def plots(rows: list[dict], output: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sweep = sorted(
        (r for r in rows if r["method"] == "salr" and r["pattern"] == "unstructured"), key=lambda r: r["sparsity"]
    )
    refs = {r["name"]: r for r in rows if r["name"] in ("pretrained", "lora@50%", "prune-lora@50%")}
    if sweep:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in [
            (axes[0], "gsm8k_answer_nll", "GSM8K answer NLL (held out)"),
            (axes[1], "wikitext2_perplexity", "WikiText-2 perplexity"),
        ]:
            ax.plot([r["sparsity"] for r in sweep], [r[key] for r in sweep], "o-", label="SALR (fine-tuned)")
            for name, style in [("pretrained", ":"), ("lora@50%", "--")]:
                if name in refs:
                    ax.axhline(refs[name][key], linestyle=style, color="gray", label=name)
            if "prune-lora@50%" in refs:
                ax.plot([0.5], [refs["prune-lora@50%"][key]], "x", color="red", label="prune-lora@50%")
            ax.set_xlabel("sparsity of the frozen base")
            ax.set_ylabel(label)
            ax.legend()
        fig.tight_layout()
        fig.savefig(output / "sparsity_sweep.png", dpi=120)
        plt.close(fig)
        written.append("sparsity_sweep.png")
    curves = [r for r in rows if r.get("loss_curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in curves:
            ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], label=r["name"])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (answer tokens)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(output / "loss_curves.png", dpi=120)
        plt.close(fig)
        written.append("loss_curves.png")
    return written


def write_calibration_file(output: Path, records: list[dict]) -> Path:
    """The training problems as GSM8K JSONL under OUTPUT, for `--calibration train`."""
    path = output / "calibration_train.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = data.load_gsm8k(args.train_data)
    if len(records) <= args.holdout:
        raise SystemExit(f"{args.train_data} has {len(records)} problems, not more than --holdout {args.holdout}")
    train_records, dev = records[: -args.holdout], records[-args.holdout :]
    if args.gsm8k_test:
        dev = data.load_gsm8k(args.gsm8k_test)
    dense, tokenizer = load_model(args.model)
    examples = load_examples(None, tokenizer, args.max_length, records=train_records[: args.train_examples])
    if args.calibration == "train":  # the data every method trains on, so SALR+ sees no text the others do not
        args.calibration = str(write_calibration_file(output, train_records[: args.train_examples]))
    text = data.load_text(args.wikitext)
    setup_seconds = time.perf_counter() - started
    runs = grid(args.quick, optional=args.quant or bool(args.runs))
    if args.runs:
        by_name = {r.name: r for r in runs}
        unknown = [n for n in args.runs.split(",") if n not in by_name]
        if unknown:
            raise SystemExit(f"--runs: no run {', '.join(unknown)} (choose from {', '.join(by_name)})")
        runs = [by_name[n] for n in dict.fromkeys(args.runs.split(","))]  # in the order given
    if args.prompt_distill and any(r.method == "losa" for r in runs):
        raise SystemExit("--prompt-distill: LoSA's rounds train without a teacher; leave the losa runs out (--runs)")
    conversions = Conversions(runs, args)
    rows = []
    settings = dict(vars(args))
    for run in runs:
        rows.append(run_one(run, dense, tokenizer, examples, dev, text, args, conversions))
        result = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", "experiments/paper_grid.py", *(sys.argv[1:] if argv is None else argv)]),
            "settings": settings,
            "runs": rows,
            "check": issue_check(rows),
            "quant_check": quant_check(rows),
            "losa_check": losa_check(rows),
            "threads": torch.get_num_threads(),
            "setup_seconds": setup_seconds,
            "seconds": time.perf_counter() - started,
        }
        atomic_write_json(output / "results.json", result)  # after every run: partial results survive a crash
        atomic_write_bytes(output / "results.md", markdown(rows, settings).encode())
    result["plots"] = plots(rows, output)
    result["seconds"] = time.perf_counter() - started
    atomic_write_json(output / "results.json", result)
    print(markdown(rows, settings))
    print(f"wrote {output}/results.json, results.md, {', '.join(result['plots'])} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

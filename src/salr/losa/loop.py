"""LoSA's progressive loop (`train_losa`) on salr's trainer, and `run_losa`, what `salr train --method losa` does.

    attach LoRA (capacity ranks) to every target of the dense model; dense block outputs kept once
    for t = 1..T:
        merge the masked delta into the bases
        s_t = cubic schedule; per-block ratios from RMI (unstructured) around s_t
        prune every block (Wanda / SparseGPT) on the merged weights; reconstruction error per block
        unmerge (the new mask); per-block ranks from the errors, mean rank rising to the final one
        fine-tune the active LoRA components with a fresh optimizer and schedule on this round's data
    merge: a plain sparse model, saved as an adapter-free SALR checkpoint (+ a transformers copy in OUTPUT/merged)

The optimizer steps and the training examples are split between rounds by `LoSAConfig.round_weights`, so a LoSA run
takes exactly as many steps, on the same examples, as any other method given the same TrainConfig.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from salr import data
from salr.calibration import calibration_ids
from salr.config import NO_CALIBRATION, SALRConfig
from salr.convert import convert, merge_and_unload
from salr.errors import SALRError
from salr.integrity import sha256_file
from salr.io import atomic_write_json, fsync_tree, make_temp_dir, remove_stale_temps
from salr.loaders import load_model
from salr.losa.allocate import allocate_ranks, block_importance, block_sparsities, rmi_matrix
from salr.losa.config import LoSAConfig, apportion, mean_rank, round_sparsity, sparsity_box
from salr.losa.layer import LoSALinear, losa_layers, sparsity_by_layer, to_losa, to_salr
from salr.losa.prune import block_features, block_of_layers, prune_blocks
from salr.memory import peak_memory_mib, reset_peak_memory
from salr.train import state as run_state
from salr.train.config import TrainConfig, method_config
from salr.train.loop import EvalFn, Trainer, distill_examples, load_examples, load_teacher, steps_per_epoch

logger = logging.getLogger(__name__)

MERGED_DIR = "merged"
MERGE_REPORT = "merge_report.json"


def capacity(rank: int, losa: LoSAConfig) -> int:
    """LoRA rows each layer holds: the largest rank rank allocation may give a block (the final mean if off)."""
    return math.ceil(losa.max_rank_factor * rank) if losa.rank_allocation else rank


def attach(model: nn.Module, config: SALRConfig, losa: LoSAConfig) -> list[tuple[str, LoSALinear]]:
    """Give every target layer of the dense `model` a LoSA LoRA block of `capacity` rows (A Kaiming-uniform,
    B = 0, PEFT's init; scale config.lora_scale), in place; nothing is pruned yet."""
    rank = capacity(config.r, losa)
    dense = {
        **config.to_dict(), "sparsity": 0.0, "pattern": "unstructured", "granularity": "layer",
        "criterion": "magnitude", "residual_init": "svd", "calibration": "none", "residual_rank": 0, "r": rank,
        "lora_alpha": config.lora_scale * rank,
    }  # fmt: skip
    convert(model, SALRConfig(**dense), progress=False)
    layers = to_losa(model)
    for _, layer in layers:
        layer.masked_training = losa.masked_training
    return layers


def prune_round(
    model: nn.Module, ids: torch.Tensor, config: SALRConfig, losa: LoSAConfig, t: int, state: dict[str, Any]
) -> dict[str, Any]:
    """Round t's merge → prune → unmerge → rank allocation; `state` carries the dense block outputs and δ between
    rounds. Returns the round's record (sparsities, RMI redundancy, errors, ranks)."""
    started = time.perf_counter()
    blocks = block_of_layers(model)
    for _, layer in losa_layers(model):
        layer.merge()
    target = round_sparsity(config.sparsity, t, losa.rounds)
    rmi = losa.rmi_allocation and config.nm is None
    n_rmi = max(2, min(len(ids), round(losa.rmi_fraction * len(ids))))
    record: dict[str, Any] = {"round": t, "sparsity": target}
    if "dense" not in state or rmi:
        first = "dense" not in state  # round 1: one pass gives both the dense reference and the RMI features
        grams, outputs = block_features(model, ids if first else ids[:n_rmi], n_rmi, keep_outputs=first)
        if first:
            state["dense"] = outputs
    ratios = [target] * len(blocks)
    if rmi:
        state["delta"] = sparsity_box(target, state.get("delta", 0.01))
        matrix = rmi_matrix(grams)
        ratios = block_sparsities(block_importance(matrix), target, state["delta"])
        record.update(delta=state["delta"], redundancy=(matrix.sum(1) - 1).tolist())
    errors = prune_blocks(model, ids, ratios, config.pattern, losa.prune_method, state["dense"], config.damping)
    for _, layer in losa_layers(model):
        layer.unmerge()
    mean = mean_rank(config.r, t, losa.rounds, losa.rank_start)
    budget = min(len(blocks) * capacity(config.r, losa), max(len(blocks), round(mean * len(blocks))))
    weights = errors if losa.rank_allocation else [1.0] * len(blocks)
    ranks = allocate_ranks(weights, budget, capacity(config.r, losa))
    for layers, rank in zip(blocks, ranks, strict=True):
        for layer in layers:
            layer.set_rank(rank)
    record.update(block_sparsity=ratios, errors=errors, ranks=ranks, rank_budget=budget)
    record["measured_sparsity"] = measured_sparsity(model)
    record["prune_seconds"] = time.perf_counter() - started
    logger.info("losa round %d: sparsity %.4f (measured %.4f), mean rank %.2f, error %.4g..%.4g", t, target,
                record["measured_sparsity"], budget / len(blocks), min(errors), max(errors))  # fmt: skip
    return record


@torch.no_grad()
def measured_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over every LoSA layer's merged weight."""
    zeros = total = 0
    for _, layer in losa_layers(model):
        w = layer.merged_weight()
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / total if total else 0.0


def active_parameters(model: nn.Module) -> int:
    """LoRA parameters that train now: active rank × (in + out) summed over the LoSA layers."""
    return sum(m.active_rank * (m.in_features + m.out_features) for _, m in losa_layers(model))


def split_examples(examples: Sequence[Any], weights: list[float], batch_size: int) -> list[Sequence[Any]]:
    """Contiguous shares of `examples` in proportion to `weights`, one per round; every round sees the whole set when
    there are too few examples for a micro-batch per round."""
    if len(examples) < batch_size * len(weights):
        logger.warning("%d examples are too few to give each of %d rounds its own share: every round uses all",
                       len(examples), len(weights))  # fmt: skip
        return [examples] * len(weights)
    sizes, parts, start = apportion(len(examples), weights, minimum=batch_size), [], 0
    for size in sizes:
        parts.append(examples[start : start + size])
        start += size
    return parts


def train_round(
    model: nn.Module, tokenizer: Any, examples: Sequence[Any], config: SALRConfig, cfg: TrainConfig, losa: LoSAConfig,
    step0: int, t: int, log: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    """Fine-tune the active LoRA components for cfg.max_steps steps with a fresh AdamW and schedule (warmup
    `losa.warmup_ratio` of the round); one metrics row per step, numbered from `step0`."""
    cfg = dataclasses.replace(cfg, warmup_steps=round(losa.warmup_ratio * (cfg.max_steps or 0)), save_every=0)
    trainer = Trainer(model, tokenizer, examples, config, cfg, log["output"], None, log.get("teacher"))
    rows, started = [], time.perf_counter()
    for i in range(trainer.total):
        t0, lr_now = time.perf_counter(), trainer.optimizer.param_groups[0]["lr"]
        loss, grad_norm, n_tokens, step_tokens = trainer.optimizer_step()
        row = {
            "step": step0 + i + 1,
            "round": t,
            "loss": loss,
            "lr": lr_now,
            "grad_norm": grad_norm,
            "answer_tokens": n_tokens,
            "tokens": step_tokens,
            "tokens_per_s": step_tokens / (time.perf_counter() - t0),
            "peak_memory_mib": peak_memory_mib(trainer.env.device),
            "seconds": time.perf_counter() - started,
        }
        eval_fn, every = log.get("eval_fn"), cfg.eval_every
        if eval_fn is not None and every and row["step"] % every == 0:
            model.eval()
            row.update({f"eval_{k}": v for k, v in eval_fn(model, tokenizer).items()})
            model.train()
        with log["metrics"].open("a") as f:
            f.write(json.dumps(row) + "\n")
        log["bar"].update(1)
        log["bar"].set_postfix(round=t, loss=f"{loss:.4f}")
        rows.append(row)
    return rows


def train_losa(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, list[int]]],
    config: SALRConfig,
    cfg: TrainConfig,
    losa: LoSAConfig,
    output: str | os.PathLike,
    base_model: str = "",
    calibration: torch.Tensor | None = None,
    eval_fn: EvalFn | None = None,
    extra_report: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """LoSA on the dense `model` (in place): `config` gives the target sparsity and pattern, the calibration source
    and size, the final mean LoRA rank `r` and the LoRA scale and dropout; `cfg` the optimizer, total steps, batch
    and seed, exactly as for `salr.train.train`. Saves the run to `output` (an adapter-free SALR checkpoint of the
    merged sparse model, metrics.jsonl, train_report.json; with `losa.save_merged` a plain transformers copy in
    OUTPUT/merged) and returns the report. On return `model` is the merged plain sparse model (nn.Linear layers).
    """
    output = Path(output)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SALRError("LoSA runs in one process: its pruning passes are not distributed (drop torchrun)")
    if config.r < 1:
        raise SALRError("LoSA needs a LoRA rank: pass --lora-rank (and --residual-rank) with a total >= 1")
    if calibration is None and config.calibration == NO_CALIBRATION:
        raise SALRError("LoSA prunes with Wanda / SparseGPT on calibration data: pass --calibration self or a file")
    if config.sparsity_pattern is not None:
        raise SALRError("LoSA allocates each layer's sparsity itself (its RMI allocation): drop --sparsity-pattern")
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch(len(examples), cfg)))
    if total < losa.rounds:
        raise SALRError(f"LoSA trains in {losa.rounds} rounds of at least one step each: {total} steps are too few; "
                        f"give --max-steps >= {losa.rounds} or fewer --rounds")  # fmt: skip
    started = time.perf_counter()
    run = run_state.run_record({**(run_info or {}), "method": "losa", "losa_config": dataclasses.asdict(losa)},
                                  base_model, config, cfg, run_state.examples_digest(list(examples)))  # fmt: skip
    run = run_state.start_fresh(output, run)  # refuses a foreign or unfinished output before any work
    if calibration is None:  # from the dense model, before the LoRA blocks: sampling through LoSA layers would form
        # a weight-sized masked delta per layer and token (B = 0 at attach, so the windows are the same)
        calibration = calibration_ids(model, tokenizer, config.calibration, config.calibration_samples,
                                      config.calibration_length, config.seed)  # fmt: skip
    attach(model, config, losa)
    steps = apportion(total, losa.weights(), minimum=1)
    parts = split_examples(examples, losa.weights(), cfg.batch_size)
    log = {"output": output, "metrics": output / run_state.METRICS_NAME, "teacher": teacher, "eval_fn": eval_fn,
           "bar": tqdm(total=total, desc="losa", disable=not cfg.progress, unit="step")}  # fmt: skip
    log["metrics"].unlink(missing_ok=True)
    reset_peak_memory(torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda"))
    rounds, history, state = [], [], {}
    for t in range(1, losa.rounds + 1):
        record = prune_round(model, calibration, config, losa, t, state)
        round_cfg = dataclasses.replace(cfg, max_steps=steps[t - 1])
        rows = train_round(model, tokenizer, parts[t - 1], config, round_cfg, losa, len(history), t, log)
        record.update(steps=steps[t - 1], examples=len(parts[t - 1]), trainable_parameters=active_parameters(model),
                      train_seconds=rows[-1]["seconds"], final_loss=rows[-1]["loss"])  # fmt: skip
        rounds.append(record)
        history.extend(rows)
    log["bar"].close()
    del state
    report = {"run_id": run["run_id"], **(extra_report or {})}
    report = finish(model, tokenizer, config, cfg, losa, output, base_model, rounds, history, started, report)
    return report


def final_config(config: SALRConfig, losa: LoSAConfig) -> SALRConfig:
    """The SALRConfig recorded with the merged model: its sparsity, pattern and pruning method, no adapters."""
    fields = {**config.to_dict(), "criterion": losa.prune_method, "residual_rank": 0, "r": 0, "lora_alpha": None}
    fields["granularity"] = "row" if config.nm is None else "layer"
    return SALRConfig.from_dict(fields)


def finish(
    model: nn.Module, tokenizer: Any, config: SALRConfig, cfg: TrainConfig, losa: LoSAConfig, output: Path,
    base_model: str, rounds: list[dict[str, Any]], history: list[dict[str, Any]], started: float,
    extra: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Merge, measure, save: the SALR checkpoint (loadable by `salr eval --model OUTPUT`) and the merged copy."""
    trainable = active_parameters(model)
    to_salr(model)
    layers = sparsity_by_layer(model)
    report = {
        "method": "losa",
        "method_config": config.to_dict(),
        "losa_config": dataclasses.asdict(losa),
        "train_config": dataclasses.asdict(cfg),
        "base_model": base_model,
        "steps": len(history),
        "trainable_parameters": trainable,
        "target_sparsity": config.sparsity,
        "merged_sparsity": merge_totals(model)["sparsity"],
        "merged_layer_sparsity": layers,
        "rounds": rounds,
        "final_loss": history[-1]["loss"] if history else None,
        "tokens": sum(h["tokens"] for h in history),
        "prune_seconds": sum(r["prune_seconds"] for r in rounds),
        "train_seconds": sum(r["train_seconds"] for r in rounds),
        "seconds": time.perf_counter() - started,
        "peak_memory_mib": max((h["peak_memory_mib"] for h in history), default=0.0),
        "history": history,
        **extra,
    }
    model.eval()
    run_state.save_final(output, model, final_config(config, losa), tokenizer, base_model, report)
    if losa.save_merged:
        save_merged(model, tokenizer, output / MERGED_DIR, target=config.sparsity)
    else:
        merge_and_unload(model)
    logger.info("losa: %d steps, merged sparsity %.4f (target %.4f); wrote %s", len(history),
                report["merged_sparsity"], config.sparsity, output)  # fmt: skip
    return report


@torch.no_grad()
def merge_totals(model: nn.Module) -> dict[str, Any]:
    """Per target layer and in total: measured sparsity of the merged weights (SALR layers or, after
    `merge_and_unload`, the nn.Linear layers inside the transformer blocks)."""
    from salr.calibration import iterate_blocks
    from salr.layer import SALRLinear

    rows = []
    for prefix, block in iterate_blocks(model):
        for name, module in block.named_modules():
            if isinstance(module, SALRLinear | nn.Linear):
                w = module.merged_weight() if isinstance(module, SALRLinear) else module.weight
                zeros = int((w == 0).sum())
                rows.append({"name": f"{prefix}.{name}", "shape": list(w.shape), "nonzero": w.numel() - zeros,
                             "sparsity": zeros / w.numel()})  # fmt: skip
    total = sum(math.prod(r["shape"]) for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    return {"layers": rows, "sparsity": 1 - nonzero / total if total else 0.0, "parameters": total, "nonzero": nonzero}


def save_merged(model: nn.Module, tokenizer: Any, directory: str | os.PathLike, target: float | None = None) -> dict:
    """Fold every adapter into its weight (mask-preserving for LoSA layers) and write `model` as a plain transformers
    checkpoint plus DIR/merge_report.json (`layers[].sparsity` measured on the merged weights, `totals.sparsity`).
    `model` is modified in place (plain nn.Linear layers)."""
    merge_and_unload(model)
    totals = merge_totals(model)
    directory = Path(os.path.abspath(directory))
    report = {
        "layers": totals["layers"],
        "totals": {"sparsity": totals["sparsity"], "target_sparsity": target, "parameters": totals["parameters"],
                   "nonzero": totals["nonzero"]},
    }  # fmt: skip
    if directory.exists() and (
        not directory.is_dir() or (any(directory.iterdir()) and not (directory / "config.json").is_file())
    ):
        raise SALRError(f"{directory} exists and is not a model directory: choose a new or empty directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory.parent, {directory.name})
    stage = make_temp_dir(directory.parent, directory.name)
    try:  # staged, then renamed into place: a killed save never leaves a half-written model under `directory`
        model.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        atomic_write_json(stage / MERGE_REPORT, report)
        fsync_tree(stage)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(stage, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, directory)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def run_losa(
    model_spec: str,
    config: SALRConfig,
    cfg: TrainConfig,
    losa: LoSAConfig,
    output: str | os.PathLike,
    data_path: str | os.PathLike | None = None,
    records: Sequence[dict[str, str]] | None = None,
    limit: int | None = None,
    dtype: str | None = None,
    eval_fn: EvalFn | None = None,
    eval_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What `salr train --method losa` does: load the dense model, tokenise the data, `train_losa`. The final mean
    LoRA rank is that of the LoRA baselines (`method_config`: lora rank + residual rank), so LoSA ends with as many
    trainable parameters as they do."""
    started = time.perf_counter()
    config = method_config("losa", config)
    if records is None and (data_path is not None or not cfg.distill):
        if data_path is None:
            raise SALRError("no training data: pass --data PATH (GSM8K or Alpaca JSON/JSONL), or --distill")
        records = data.load_sft_records(data_path, limit)
    teacher = load_teacher(model_spec, dtype) if cfg.distill else None
    model, tokenizer = load_model(model_spec, dtype=dtype, huge_pages=run_state.trains_on_cpu())
    if records is None:
        examples = distill_examples(teacher, cfg)
    else:
        examples = load_examples(data_path, tokenizer, cfg.max_length, limit, records)
    extra = {"data": str(data_path) if data_path is not None else "records", "distill": cfg.distill,
             "prepare_seconds": time.perf_counter() - started}  # fmt: skip
    run_info = {
        "dtype": dtype,
        "data": {"path": str(data_path), "sha256": sha256_file(data_path), "limit": limit} if data_path else None,
        "eval": eval_info,
    }
    return train_losa(model, tokenizer, examples, config, cfg, losa, output, model_spec, eval_fn=eval_fn,
                      extra_report=extra, teacher=teacher, run_info=run_info)  # fmt: skip

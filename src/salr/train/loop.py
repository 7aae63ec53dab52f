"""Fine-tuning SALR adapters: AdamW, warmup + cosine, gradient accumulation and clipping, loss on answer tokens.

Read top to bottom, `train()` is the whole loop: set up the optimizer (or restore it on resume), then one
`optimizer_step` per step, then the final save. Around it:

- `prepare_model` loads a model and converts it for one of the methods (salr.train.config), or loads a SALR
  checkpoint as is;
- `load_examples` tokenises GSM8K / Alpaca records with the loss on the response only (salr.data);
- `micro_batches` orders examples into length-bucketed micro-batches, a deterministic stream across epochs,
  so the data position is just the optimizer step (resume needs nothing else);
- salr.train.residual_lr gives residual blocks their own learning rate; salr.train.state saves and resumes.

Distributed: run under `torchrun --nproc_per_node N` (RANK / LOCAL_RANK / WORLD_SIZE are read from the
environment; gloo on CPU, NCCL on GPU). `batch_size` is the global micro-batch: every process builds the same
micro-batch stream and takes every WORLD_SIZE-th example of each, and the loss is normalised by the answer
tokens of the whole global step, so N processes compute the same update as one. Only rank 0 logs and saves.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from salr import data
from salr.calibration import calibration_ids, self_generated_ids, within_context
from salr.checkpoint import CONFIG_NAME, read_salr_config
from salr.config import TRAINING_DATA, SALRConfig
from salr.convert import convert, mark_trainable
from salr.errors import SALRError
from salr.integrity import sha256_file
from salr.io import atomic_write_json
from salr.layer import FusedAdapters
from salr.loaders import load_model
from salr.memory import peak_memory_mib, reset_peak_memory
from salr.train import state as run_state
from salr.train.config import METHODS, TrainConfig, method_config
from salr.train.residual_lr import ResidualLR, frozen_residual_parameters, residual_lr_scales

if TYPE_CHECKING:
    from salr.losa import LoSAConfig

logger = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module, Any], dict[str, float]]


# ----------------------------------------------------------------------------- model and data


def effective_config(model_spec: str, method: str, config: SALRConfig) -> SALRConfig:
    """The SALRConfig a run trains: a SALR checkpoint's own (residual frozen for `salr-frozen-residual`), else
    `method_config(method, config)`."""
    path = Path(model_spec)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        saved = SALRConfig.from_dict(read_salr_config(path)["salr"])
        if method == "salr-frozen-residual":
            saved.train_residual = False
        return saved
    return method_config(method, config)


def refuse_float16_adapters(adapters: str | nn.Module) -> None:
    """AdamW cannot train float16 parameters: its eps (1e-8) is 0 in float16, so a zero gradient's update is 0 / 0.
    `adapters`: a config's adapter_dtype, or a model whose trainable parameters are checked."""
    if isinstance(adapters, nn.Module):
        adapters = "float16" if any(p.dtype == torch.float16 for _, p in trainable_parameters(adapters)) else ""
    if adapters == "float16":
        raise SALRError(
            "the adapters are float16, which AdamW cannot train (its eps, 1e-8, is 0 in float16: a zero gradient "
            "gives NaN at the first step): train float32 (the default) or bfloat16 adapters (--adapter-dtype, set "
            "when a model is compressed; --dtype float16 casts a checkpoint's adapters too: use bfloat16)"
        )


def prepare_model(
    model_spec: str,
    method: str,
    config: SALRConfig,
    dtype: str | None = None,
    records: Sequence[dict[str, str]] | None = None,
) -> tuple[nn.Module, Any, SALRConfig, dict[str, Any] | None]:
    """(model, tokenizer, effective config, conversion report or None).

    A SALR checkpoint directory is trained as saved (its own config; `salr-frozen-residual` freezes the
    residual block of every layer); any other model is loaded and converted for `method`, calibrated on the
    training `records` where its calibration is 'data' (TRAINING_DATA).
    """
    path = Path(model_spec)
    config = effective_config(model_spec, method, config)
    refuse_float16_adapters(config.adapter_dtype)  # before any conversion
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        model, tokenizer = load_model(model_spec, dtype=dtype, huge_pages=run_state.trains_on_cpu())
        if not config.train_residual:
            for module in model.modules():
                if isinstance(module, FusedAdapters):
                    module.train_residual = False
        return model, tokenizer, config, None
    model, tokenizer = load_model(model_spec, dtype=dtype, huge_pages=run_state.trains_on_cpu())
    calibration = None
    if config.needs_calibration and config.calibration == TRAINING_DATA:
        if not records:
            raise SALRError(
                "calibration 'data' calibrates on the training records: pass --data, or --calibration self"
            )
        calibration = calibration_ids(model, tokenizer, TRAINING_DATA, config.calibration_samples,
                                      config.calibration_length, config.seed, records=records)  # fmt: skip
    report = convert(model, config, tokenizer=tokenizer, calibration=calibration)
    return model, tokenizer, config, report


def load_teacher(model_spec: str, dtype: str | None = None) -> nn.Module:
    """The dense model a run distills from: `model_spec` itself, or the base model a SALR checkpoint was made from."""
    path = Path(model_spec)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        base = read_salr_config(path).get("base_model")
        if not base:
            raise SALRError(f"{model_spec} does not record its dense base model: distill from the dense model instead")
        model_spec = base
    teacher, _ = load_model(model_spec, dtype=dtype)
    return teacher.eval().requires_grad_(False)


def default_teacher(model_spec: str, dtype: str | None, cfg: TrainConfig) -> nn.Module | None:
    """The teacher a run needs; where only the default prompt distillation asks for it and the dense model cannot
    be found (a checkpoint that does not record it), the run goes on without it, with a warning."""
    try:
        return load_teacher(model_spec, dtype)
    except SALRError as err:
        if cfg.distill or cfg.prompt_distill is not None:
            raise
        logger.warning("training without prompt distillation (its default needs the dense teacher): %s", err)
        return None


def every_position_examples(rows: list[list[int]]) -> list[dict[str, list[int]]]:
    """Training examples whose every position is a target (labels = input_ids): what distillation on whole texts
    uses, since DistillLoss matches the teacher only at labelled positions."""
    return [{"input_ids": row, "labels": row} for row in rows]


def distill_examples(teacher: nn.Module, cfg: TrainConfig) -> list[dict[str, list[int]]]:
    """Sequences sampled from the teacher itself (data-free recovery), every position a training target."""
    length = within_context(teacher, cfg.distill_length, "distillation sequences")
    ids = self_generated_ids(teacher, cfg.distill_samples, length, seed=cfg.seed + 1)
    return every_position_examples(ids.tolist())


def load_examples(
    path: str | os.PathLike | None,
    tokenizer: Any,
    max_length: int,
    limit: int | None = None,
    records: Sequence[dict[str, str]] | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenised SFT examples (labels -100 on the prompt) from a GSM8K/Alpaca file or from `records`."""
    if records is None:
        if path is None:
            raise SALRError("no training data: pass --data PATH (GSM8K or Alpaca JSON/JSONL)")
        records = data.load_sft_records(path, limit)
    return data.build_sft_examples(records, tokenizer, max_length)


def micro_batches(
    examples: Sequence[dict[str, list[int]]], batch_size: int, seed: int, start: int = 0
) -> Iterator[list[int]]:
    """Endless stream of micro-batches (example indices), from micro-batch number `start`.

    Epoch e is `data.length_bucketed_batches(lengths, batch_size, seed + e)` without its incomplete batches, so
    the stream is a pure function of (examples, batch_size, seed): position k is the same on every process and
    after a resume.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    per_epoch = len(lengths) // batch_size
    if per_epoch == 0:
        raise SALRError(f"only {len(lengths)} training examples for batch_size {batch_size}: use more data")
    epoch, index = divmod(start, per_epoch)
    while True:
        batches = [b for b in data.length_bucketed_batches(lengths, batch_size, seed + epoch) if len(b) == batch_size]
        yield from batches[index:]
        epoch, index = epoch + 1, 0


def steps_per_epoch(n_examples: int, cfg: TrainConfig) -> int:
    return max(1, (n_examples // cfg.batch_size) // cfg.grad_accum)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_kl(hidden: torch.Tensor, head: nn.Module, teacher: nn.Module, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, where: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """SUM over the positions `where` (bool [B, T-1]) of KL(teacher ‖ student) of the next-token distributions.

    hidden: the student's last hidden states at positions 0..T-2 ([B, T-1, D]), head: its LM head. Both LM heads
    run only at the selected positions; the teacher runs without gradients."""
    with torch.no_grad():
        t_hidden = teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        target = F.log_softmax(teacher.get_output_embeddings()(t_hidden[:, :-1][where]).float(), dim=-1)
    student = F.log_softmax(head(hidden[where]).float(), dim=-1)  # [N, V]
    return F.kl_div(student, target, log_target=True, reduction="sum")


class AnswerLoss(nn.Module):
    """Wraps a causal LM: forward returns the SUM of token cross-entropies over labelled (answer) positions.

    The LM head runs only on the hidden states that predict a labelled token, which skips most of the
    vocabulary projection for long prompts. Wrapping (rather than calling submodules) keeps DDP's forward hooks.
    With a `teacher` and `prompt_weight` > 0 it adds `prompt_weight` times the SUM over prompt positions (those that
    predict an unlabelled, unpadded token) of KL(teacher ‖ student): the answers are learnt from the labels while the
    inputs keep the dense model's next-token distribution (TrainConfig.prompt_distill).
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None, prompt_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.teacher = [teacher]  # a list: not a submodule, so never trained, saved or wrapped by DDP
        self.prompt_weight = prompt_weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask, labels: [B, T] int64; labels -100 where no loss
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]  # [B, T-1, D]
        targets = labels[:, 1:]
        keep = targets != data.IGNORE_INDEX
        logits = head(hidden[keep]).float()  # [N, V]
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        if not self.prompt_weight:
            return loss
        prompt = ~keep & attention_mask[:, 1:].bool()  # [B, T-1]: positions predicting a real prompt token
        return loss + self.prompt_weight * teacher_kl(hidden, head, self.teacher[0], input_ids, attention_mask, prompt)


class DistillLoss(nn.Module):
    """Wraps a student causal LM and its dense teacher: forward returns the SUM over labelled positions of
    KL(teacher ‖ student) of the next-token distributions (the same positions and normalisation as AnswerLoss)."""

    def __init__(self, model: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.teacher = [teacher]  # a list: not a submodule, so never trained, saved or wrapped by DDP

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels[:, 1:] != data.IGNORE_INDEX  # [B, T-1]: positions whose next token is a target
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
        return teacher_kl(hidden, head, self.teacher[0], input_ids, attention_mask, keep)


def n_answer_tokens(examples: Sequence[dict[str, list[int]]], indices: Sequence[int]) -> int:
    return sum(sum(t != data.IGNORE_INDEX for t in examples[i]["labels"][1:]) for i in indices)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- the loop


class Trainer:
    """The state of one run: model, loss module, optimizer, scheduler, residual lr, data stream, metrics log."""

    def __init__(self, model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, list[int]]],
                 config: SALRConfig, cfg: TrainConfig, output: Path, resume_from: Path | None,
                 teacher: nn.Module | None = None) -> None:  # fmt: skip
        self.env = run_state.init_distributed()
        self.model, self.examples, self.config, self.cfg, self.output = model, examples, config, cfg, output
        torch.manual_seed(cfg.seed)
        model.to(self.env.device)
        mark_trainable(model)
        model.train()
        self.params = [p for _, p in trainable_parameters(model)]
        if not self.params:
            raise SALRError("the model has no trainable adapters (A_cat / B_cat): convert it with a rank > 0 first")
        if cfg.batch_size % self.env.world:
            raise SALRError(
                f"batch_size {cfg.batch_size} must be divisible by the number of processes ({self.env.world})"
            )
        self.total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch(len(examples), cfg)))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.03 * self.total)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, self.total, cfg.min_lr_ratio)
        )
        self.start, self.tokens_before, self.seconds_before = 0, 0, 0.0
        if resume_from is not None:
            saved = run_state.load_train_state(resume_from)
            try:
                self.optimizer.load_state_dict(saved["optimizer"])
                self.scheduler.load_state_dict(saved["scheduler"])
                run_state.set_rng_state(saved["rng"])
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                raise SALRError(
                    f"{resume_from / run_state.STATE_NAME} does not fit this model and optimizer ({err}): the "
                    "checkpoint belongs to another run"
                ) from err
            self.start, self.scales = int(saved["step"]), saved["residual_lr_scales"]
            self.tokens_before, self.seconds_before = int(saved.get("tokens", 0)), float(saved.get("seconds", 0.0))
            if self.start > self.total:
                raise SALRError(
                    f"--resume: the checkpoint is at step {self.start}, beyond the {self.total} steps asked for: "
                    "pass --max-steps of at least the checkpoint's step"
                )
            # the restored lr is the old schedule's: a resume with another --max-steps takes this run's from its step
            for group, base, factor in zip(
                self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
            ):
                group["lr"] = base * factor(self.scheduler.last_epoch)
            logger.info("resumed from %s at step %d", resume_from, self.start)
        else:
            self.scales = residual_lr_scales(model, cfg, examples)
        self.residual_lr = ResidualLR(model, self.scales)
        if self.scales and cfg.theorem4_factor() is not None:
            values = sorted(s * cfg.lr for s in self.scales.values())
            logger.info("theorem4 residual lr: min %.3g, median %.3g, max %.3g",
                        values[0], values[len(values) // 2], values[-1])  # fmt: skip
        self.prompt_weight = cfg.prompt_weight(has_teacher=teacher is not None)
        if (cfg.distill or self.prompt_weight) and teacher is None:
            raise SALRError("distill and prompt_distill need the dense teacher model: pass teacher=")
        self.loss_module: nn.Module = (
            DistillLoss(model, teacher.to(self.env.device))
            if cfg.distill
            else AnswerLoss(model, None if teacher is None else teacher.to(self.env.device), self.prompt_weight)
        )
        if self.env.world > 1:
            # Only A_cat / B_cat need gradients; frozen bases are buffers, identical on every rank (no broadcast).
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.loss_module, find_unused_parameters=False, broadcast_buffers=False
            )
        pad_ids = () if tokenizer is None else (tokenizer.pad_token_id, tokenizer.eos_token_id)
        self.pad_id = next((t for t in pad_ids if t is not None), 0)
        self.stream = micro_batches(examples, cfg.batch_size, cfg.seed, start=self.start * cfg.grad_accum)

    def optimizer_step(self) -> tuple[float, float, int, int]:
        """One optimizer step over `grad_accum` micro-batches: (mean answer-token loss, grad norm, answer tokens,
        tokens processed)."""
        env, cfg = self.env, self.cfg
        group = [next(self.stream) for _ in range(cfg.grad_accum)]
        # Normalise by the answer tokens of the whole global step: then the update does not depend on how the step
        # is split into micro-batches or processes. DDP averages gradients, so each rank multiplies by world.
        n_tokens = sum(n_answer_tokens(self.examples, idx) for idx in group)
        loss_sum, step_tokens = torch.zeros((), device=env.device), 0
        for i, idx in enumerate(group):
            batch = data.collate([self.examples[j] for j in idx[env.rank :: env.world]], self.pad_id)
            batch = {k: v.to(env.device) for k, v in batch.items()}
            step_tokens += int(batch["attention_mask"].sum())
            sync = i == len(group) - 1 or env.world == 1
            with contextlib.nullcontext() if sync else self.loss_module.no_sync():
                loss = self.loss_module(**batch)
                (loss * env.world / max(n_tokens, 1)).backward()
            loss_sum += loss.detach()
        grad_norm = float("nan")
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        self.residual_lr.before()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.residual_lr.after()
        if env.world > 1:  # loss and token count for the log: a sync point, once per step
            totals = torch.stack([loss_sum, torch.tensor(float(step_tokens), device=env.device)])
            dist.all_reduce(totals)
            loss_sum, step_tokens = totals[0], int(totals[1])
        return float(loss_sum) / max(n_tokens, 1), grad_norm, n_tokens, step_tokens

    def resolved_rates(self) -> dict[str, Any]:
        """The report's view of what the run's residual lr and prompt-distillation weight resolved to."""
        per_layer = {n: s * self.cfg.lr for n, s in self.scales.items()} if self.scales else None
        return {"residual_lr": self.cfg.residual_lr, "residual_lr_per_layer": per_layer,
                "prompt_distill": self.prompt_weight}  # fmt: skip

    def train_state(self, step: int, tokens: int, seconds: float) -> dict[str, Any]:
        return {
            "step": step,
            "tokens": tokens,  # the run's totals up to `step`, across resumed segments
            "seconds": seconds,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": run_state.rng_state(),
            "residual_lr_scales": self.scales,
            "train_config": asdict(self.cfg),
        }


def train(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, list[int]]],
    config: SALRConfig,
    cfg: TrainConfig,
    output: str | os.PathLike,
    base_model: str = "",
    resume_from: str | os.PathLike | None = None,
    eval_fn: EvalFn | None = None,
    extra_report: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model`'s adapters (A_cat / B_cat) on `examples`; save the run to `output`; return the report.

    `model` is converted already (for a resume: loaded from the checkpoint `resume_from`, whose train_state.pt
    restores optimizer, scheduler, RNG and step). `eval_fn(model, tokenizer) -> {name: value}` runs every
    `eval_every` steps on rank 0 into the metrics log. With `cfg.distill` the loss is the KL to `teacher` (the dense
    model). A new run records its arguments in `output/run.json` (`run_info`: method, dtype, data file); a resume
    refuses different ones except run_state.SAFE_TRAIN_ARGS. The report covers the whole run.
    """
    output = Path(os.path.abspath(output))
    refuse_float16_adapters(model)  # before the run directory is claimed
    resume_from = None if resume_from is None else Path(resume_from)
    record = run_state.run_record(run_info, base_model, config, cfg, run_state.examples_digest(list(examples)))
    if int(os.environ.get("RANK", "0")) == 0:
        record = _claim_output(output, record, resume_from)
    t = Trainer(model, tokenizer, examples, config, cfg, output, resume_from, teacher)
    env, metrics_path = t.env, output / run_state.METRICS_NAME
    history: list[dict[str, Any]] = []
    if env.main and resume_from is not None:
        history = run_state.rewrite_metrics(metrics_path, t.start)
    bar = tqdm(total=t.total, initial=t.start, desc="train", disable=not (env.main and cfg.progress), unit="step")
    reset_peak_memory(env.device)  # the log reports this run's peak, not earlier work in the same process
    started, tokens_seen = time.perf_counter(), 0
    for step in range(t.start, t.total):
        t0 = time.perf_counter()
        lr_now = t.optimizer.param_groups[0]["lr"]
        loss, grad_norm, n_tokens, step_tokens = t.optimizer_step()
        if not math.isfinite(loss):
            raise SALRError(
                f"training diverged at step {step + 1}: the loss is {loss}; lower --lr or check the data (the last "
                "checkpoint is kept)"
            )
        tokens_seen += step_tokens
        row = {
            "step": step + 1,
            "loss": loss,
            "lr": lr_now,
            "grad_norm": grad_norm if cfg.max_grad_norm > 0 else None,
            "answer_tokens": n_tokens,
            "tokens_per_s": step_tokens / (time.perf_counter() - t0),
            "peak_memory_mib": peak_memory_mib(env.device),
            "seconds": t.seconds_before + time.perf_counter() - started,
        }
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and env.main:
            model.eval()
            row.update({f"eval_{k}": v for k, v in eval_fn(model, tokenizer).items()})
            model.train()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == t.total or "eval_answer_nll" in row:
            history.append(run_state.clean_row(row))
            if env.main:
                run_state.append_metrics(metrics_path, row)
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == t.total):
            if env.main:
                run_state.sync_metrics(metrics_path)
                tokens, seconds = t.tokens_before + tokens_seen, t.seconds_before + time.perf_counter() - started
                state = t.train_state(step + 1, tokens, seconds)
                run_state.save_checkpoint(output, step + 1, model, config, tokenizer, base_model, state)
            if env.world > 1:
                dist.barrier()
    bar.close()
    report = {
        "run_id": record.get("run_id"),
        "method_config": config.to_dict(),
        "train_config": asdict(cfg),
        "base_model": base_model,
        "steps": t.total,
        "resumed_from_step": t.start if resume_from is not None else None,
        "world_size": env.world,
        "examples": len(examples),
        "trainable_parameters": sum(p.numel() for p in t.params) - frozen_residual_parameters(model),
        "final_loss": history[-1]["loss"] if history else None,
        "tokens": t.tokens_before + tokens_seen,
        "seconds": t.seconds_before + time.perf_counter() - started,
        "peak_memory_mib": peak_memory_mib(env.device),
        **t.resolved_rates(),
        "history": history,
        **(extra_report or {}),
    }
    if env.main:
        model.eval()
        run_state.save_final(output, model, config, tokenizer, base_model, report)
        logger.info("saved run to %s (%d steps, final loss %.4f)", output, t.total, report["final_loss"] or 0.0)
    if env.world > 1:
        dist.barrier()
    return report


def _claim_output(output: Path, record: dict[str, Any], resume_from: Path | None) -> dict[str, Any]:
    """Rank 0, before anything else: a new run takes `output` (run_state.start_fresh); a resume checks its
    arguments against run.json (refusing differences, announcing safe changes), records the accepted ones and
    removes what killed processes left behind."""
    if resume_from is None:
        return run_state.start_fresh(output, record)
    stored = run_state.read_run(output)
    if stored is None:
        raise SALRError(f"--resume: {output / run_state.RUN_NAME} is missing: {output} is not a run this salr started")
    for note in run_state.compare_run(stored, record):
        logger.warning(note)
    run_state.prepare_resume(output, keep=resume_from)
    record = {**stored, **record, "run_id": stored["run_id"], "format_version": stored["format_version"]}
    atomic_write_json(output / run_state.RUN_NAME, record)
    return record


def run_training(
    model_spec: str,
    method: str,
    config: SALRConfig,
    cfg: TrainConfig,
    output: str | os.PathLike,
    data_path: str | os.PathLike | None = None,
    records: Sequence[dict[str, str]] | None = None,
    limit: int | None = None,
    resume: bool = False,
    dtype: str | None = None,
    eval_fn: Callable[[nn.Module, Any], dict[str, float]] | None = None,
    eval_info: dict[str, Any] | None = None,
    losa: LoSAConfig | None = None,
) -> dict[str, Any]:
    """What `salr train` does: prepare the model (or reload the latest checkpoint with `resume`), tokenise the
    data, train, save. Returns the report; resuming a finished run returns its report with `already_finished`
    and changes nothing. Every argument is checked before the model is loaded. `losa` holds the knobs of method
    "losa" (salr.losa.run_losa)."""
    if method not in METHODS:
        raise SALRError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if limit is not None and limit < 1:
        raise SALRError(f"--limit must be >= 1, got {limit}")
    output = Path(os.path.abspath(output))
    if method == "losa":
        from salr.losa import LoSAConfig, run_losa

        if resume:
            raise SALRError("--resume is not supported for --method losa: its rounds prune the model; start again")
        return run_losa(model_spec, config, cfg, losa or LoSAConfig(), output, data_path, records, limit, dtype,
                        eval_fn, eval_info)  # fmt: skip
    started = time.perf_counter()
    if records is None and (data_path is not None or not cfg.distill):  # check the data before the slow part
        if data_path is None:
            raise SALRError("no training data: pass --data PATH (GSM8K or Alpaca JSON/JSONL), or --distill")
        records = data.load_sft_records(data_path, limit)
    if records is not None and len(records) < cfg.batch_size:  # before the model is loaded and converted
        raise SALRError(f"only {len(records)} training examples for batch_size {cfg.batch_size}: use more data")
    run_info = {
        "method": method,
        "dtype": dtype,
        "data": {"path": str(data_path), "sha256": sha256_file(data_path), "limit": limit} if data_path else None,
        "eval": eval_info,
    }
    checkpoint = None
    if resume:
        checkpoint = run_state.latest_checkpoint(output)
        stored = run_state.read_run(output)
        if stored is None and checkpoint is None:
            raise SALRError(
                f"--resume: no checkpoint in {output / run_state.CHECKPOINTS}; train with --save-every first"
            )
        if stored is None:
            raise SALRError(
                f"--resume: {output / run_state.RUN_NAME} is missing: {output} is not a run this salr started"
            )
        current = run_state.run_record(run_info, model_spec, effective_config(model_spec, method, config), cfg, None)
        run_state.compare_run(stored, current)  # refuses differences now, before the model is loaded
        done = run_state.finished_report(output, stored)
        if (
            done is not None
            and (cfg.max_steps is None or cfg.max_steps <= done["steps"])
            and (cfg.max_steps is not None or cfg.epochs == done["train_config"].get("epochs"))
        ):
            return {**done, "already_finished": True}
        if checkpoint is None:
            raise SALRError(
                f"--resume: no checkpoint in {output / run_state.CHECKPOINTS}; train with --save-every first"
            )
    elif int(os.environ.get("RANK", "0")) == 0:
        run_state.check_fresh_output(output)
    teacher = default_teacher(model_spec, dtype, cfg) if cfg.wants_teacher() else None
    if checkpoint is not None:
        model, tokenizer, config, conversion = prepare_model(str(checkpoint), method, config, dtype)
    else:
        model, tokenizer, config, conversion = prepare_model(model_spec, method, config, dtype, records)
    if records is None:
        examples, source = distill_examples(teacher, cfg), "sampled from the dense teacher"
    else:
        examples, source = load_examples(data_path, tokenizer, cfg.max_length, limit, records), str(data_path)
    extra = {
        "method": method,
        "data": source if data_path is not None or records is None else "records",
        "distill": cfg.distill,
        "prepare_seconds": time.perf_counter() - started,
        "conversion_totals": conversion["totals"] if conversion else None,
    }
    return train(
        model, tokenizer, examples, config, cfg, output, model_spec, checkpoint, eval_fn=eval_fn, extra_report=extra,
        teacher=teacher,
        run_info=run_info,
    )  # fmt: skip

"""Training configuration and the one definition of the training methods."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from salr.config import TRAINING_DATA, SALRConfig
from salr.errors import SALRError

METHODS = ("salr", "lora", "prune-lora", "salr-frozen-residual", "qsalr", "qlora", "losa")
# The measured best rates: task fine-tuning (labels) 1e-3 for the LoRA block and a tenth of it for the residual
# block; data-free distillation (--distill) 1e-4 for both (docs/quality.md, "Data-free recovery": 1e-3 raised the
# held-out perplexity there). "auto" resolves to one of the two in TrainConfig.__post_init__.
LR_TASK, LR_DISTILL = 1e-3, 1e-4
RESIDUAL_LR_TASK, RESIDUAL_LR_DISTILL = "lr*0.1", "lr"
# How `salr train` converts a dense model where the user leaves these unset: the best measured fine-tuning recipe
# (docs/results.md: calibration on the task's own training records, 8 extrapolated rounds, 32 block-tuning steps).
# `salr compress` keeps SALRConfig's own defaults, which fit its 3-minute target; training time dwarfs the extra.
TRAINING_CONVERSION = {"calibration": TRAINING_DATA, "alternating_rounds": 8, "block_tuning_steps": 32}


@dataclass
class TrainConfig:
    lr: float | None = field(
        default=None,
        metadata={
            "help": f"peak AdamW learning rate of the adapters (the LoRA block); unset: {LR_TASK:g}, or "
            f"{LR_DISTILL:g} with --distill (docs/training.md, Defaults)"
        },
    )
    residual_lr: float | str | None = field(
        default="auto",
        metadata={
            "help": "residual block lr: 'lr*F' (F times lr), a float, 'lr' or None (= lr), 'theorem4' (per layer "
            f"N/σ_max(X)²) or 'theorem4*F'; 'auto': {RESIDUAL_LR_TASK!r} (the residual block starts from a good fit "
            f"that a high rate moves away from), or {RESIDUAL_LR_DISTILL!r} with --distill"
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (ignored when max_steps is set)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch, summed over all processes"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_steps: int | None = field(default=None, metadata={"help": "linear warmup steps (default 3% of steps)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * min_lr_ratio"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global adapter gradient norm (0 = off)"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (prompt + response), truncated"})
    seed: int = field(default=0, metadata={"help": "data order, dropout"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    eval_every: int = field(default=0, metadata={"help": "call the eval function every N steps (0 = never)"})
    log_every: int = field(default=1, metadata={"help": "metrics line every N steps"})
    calib_examples: int = field(default=8, metadata={"help": "theorem4: examples whose activations are used"})
    power_iters: int = field(default=50, metadata={"help": "theorem4: power-iteration steps"})
    distill: bool = field(
        default=False,
        metadata={
            "help": "recover the compressed model by matching the dense teacher's next-token distribution (KL) "
            "instead of the labels; without --data the text is sampled from the teacher itself"
        },
    )
    prompt_distill: float | None = field(
        default=None,
        metadata={
            "help": "with --data: add this weight times the KL to the dense teacher's next-token distribution at "
            "the prompt positions (the labels train the answers; the prompts keep the dense model's behaviour); "
            "0 = off (and no teacher in memory); unset: 1 when the dense teacher is at hand (salr train loads it), "
            "0 with --distill"
        },
    )
    distill_samples: int = field(default=256, metadata={"help": "distill without --data: sequences sampled"})
    distill_length: int = field(default=256, metadata={"help": "distill without --data: tokens per sequence"})
    progress: bool = field(default=True, metadata={"help": "tqdm bar on rank 0"})

    def prompt_weight(self, has_teacher: bool) -> float:
        """The prompt-distillation weight a run uses: prompt_distill, or where unset 1 with a teacher (0 without
        one, and 0 under `distill`, which already matches the teacher everywhere)."""
        if self.prompt_distill is not None:
            return self.prompt_distill
        return 1.0 if has_teacher and not self.distill else 0.0

    def wants_teacher(self) -> bool:
        """Whether a run needs the dense teacher: distillation, or prompt distillation set or left at its default."""
        return self.distill or self.prompt_distill is None or self.prompt_distill > 0

    def residual_lr_ratio(self) -> float | None:
        """Residual block lr / lr for a fixed residual lr ('lr*F', a float); None for 'lr', None and theorem4."""
        if self.residual_lr is None or self.residual_lr == "lr" or self.theorem4_factor() is not None:
            return None
        factor = self.lr_factor()
        return factor if factor is not None else float(self.residual_lr) / self.lr

    def lr_factor(self) -> float | None:
        """'lr' -> 1.0, 'lr*0.1' -> 0.1, anything else -> None."""
        value = self.residual_lr
        if not isinstance(value, str) or not value.startswith("lr"):
            return None
        if value == "lr":
            return 1.0
        try:
            factor = float(value[len("lr*") :]) if value.startswith("lr*") else math.nan
        except ValueError:
            factor = math.nan
        if not (math.isfinite(factor) and factor >= 0):
            raise SALRError(f"residual_lr {value!r}: write 'lr' or 'lr*F' with F a number >= 0, e.g. 'lr*0.1'")
        return factor

    def theorem4_factor(self) -> float | None:
        """'theorem4' -> 1.0, 'theorem4*0.01' -> 0.01, anything else -> None."""
        if not isinstance(self.residual_lr, str) or not self.residual_lr.startswith("theorem4"):
            return None
        rest = self.residual_lr[len("theorem4") :]
        if not rest:
            return 1.0
        try:
            if not rest.startswith("*"):
                raise ValueError(rest)
            return float(rest[1:])
        except ValueError as err:
            msg = f"residual_lr {self.residual_lr!r}: write 'theorem4' or 'theorem4*F' with F a number"
            raise SALRError(msg) from err

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = LR_DISTILL if self.distill else LR_TASK
        if self.residual_lr == "auto":
            self.residual_lr = RESIDUAL_LR_DISTILL if self.distill else RESIDUAL_LR_TASK
        for name in ("lr", "weight_decay", "max_grad_norm", "min_lr_ratio", "epochs"):
            if not math.isfinite(getattr(self, name)):
                raise SALRError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0:
            raise SALRError(f"lr must be positive, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm", "save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise SALRError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise SALRError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise SALRError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.prompt_distill is not None and not (math.isfinite(self.prompt_distill) and self.prompt_distill >= 0):
            raise SALRError(f"prompt_distill must be a finite weight >= 0, got {self.prompt_distill}")
        if self.distill and self.prompt_distill:
            raise SALRError("--distill already matches the teacher at every position: drop --prompt-distill")
        if self.distill_length < 2:
            raise SALRError(f"distill_length must be >= 2 tokens, got {self.distill_length}")
        if self.max_length < 2:
            raise SALRError(f"max_length must be >= 2 tokens, got {self.max_length}")
        keyword = self.theorem4_factor() is not None or self.lr_factor() is not None  # both check their forms
        if isinstance(self.residual_lr, str) and not keyword:
            try:
                self.residual_lr = float(self.residual_lr)
            except ValueError as err:
                raise SALRError(
                    f"residual_lr must be a number, 'lr*F' or 'theorem4', got {self.residual_lr!r}"
                ) from err
        if isinstance(self.residual_lr, float) and not (self.residual_lr >= 0 and math.isfinite(self.residual_lr)):
            raise SALRError(f"residual_lr must be >= 0, got {self.residual_lr}")
        for name in ("batch_size", "grad_accum", "log_every", "calib_examples", "power_iters", "distill_samples"):
            if getattr(self, name) < 1:
                raise SALRError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SALRError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise SALRError(f"epochs must be positive, got {self.epochs}")


def method_config(method: str, config: SALRConfig) -> SALRConfig:
    """The SALRConfig a method trains, the one definition of the methods (CLI, experiments and benchmarks use it):

    - `salr`: as given (pruned base, trainable residual + LoRA);
    - `salr-frozen-residual`: the same with the residual block frozen at its SVD init (the paper's ablation);
    - `lora`: dense base, one LoRA block of rank r + residual_rank, so it trains as many parameters as SALR;
    - `prune-lora`: pruned base without residual, LoRA of rank r + residual_rank (same parameters as SALR);
    - `qsalr`: SALR on a quantized base (config.quant, NF4 when unset): the residual absorbs pruning and quantization
      error;
    - `qlora`: QLoRA, `lora` on a quantized base (config.quant, NF4 when unset): every weight kept, so its bitmap is
      all ones and the base computes exactly the dense dequantized W0;
    - `losa`: LoSA (salr.losa): progressive pruning of the dense model with a masked LoRA update whose final mean rank
      is r + residual_rank (same parameters as SALR at the end); the target sparsity and pattern are `config`'s and
      the model is pruned during training, not by `convert`.
    LoRA blocks keep SALR's LoRA scale (lora_alpha / r). The other methods keep config.quant as given.
    """
    rank = config.r + config.residual_rank
    # a residual_rank_pattern does not carry over: those methods' one block has rank r + residual_rank everywhere
    equal_rank = {
        "r": rank, "residual_rank": 0, "residual_rank_pattern": None,
        "lora_alpha": config.lora_scale * rank if config.r else None,
    }  # fmt: skip
    dense = {  # nothing pruned: no calibration, nothing for block tuning to repair
        "sparsity": 0.0, "sparsity_pattern": None, "pattern": "unstructured", "granularity": "layer",
        "block_tuning_steps": 0,
    }  # fmt: skip
    quant = {"quant": config.quant if config.quant != "none" else "nf4"}
    changes: dict[str, Any] | None = {
        "salr": {"train_residual": True},
        "lora": {**dense, **equal_rank},
        "prune-lora": equal_rank,
        "losa": equal_rank,
        "salr-frozen-residual": {"train_residual": False},
        "qsalr": {"train_residual": True, **quant},
        "qlora": {**dense, **equal_rank, **quant},
    }.get(method)
    if changes is None:
        raise SALRError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    merged = {**config.to_dict(), **changes}
    if merged["pattern"] != "unstructured":
        merged["sparsity"] = None
    if merged["r"] == 0 and merged["residual_rank"] == 0:
        raise SALRError(f"method {method} with lora rank 0 has nothing to train: pass --lora-rank > 0")
    return SALRConfig(**merged)

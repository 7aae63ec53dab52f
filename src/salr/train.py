"""Fine-tuning SALR adapters: AdamW, warmup + cosine, gradient accumulation and clipping, loss on answer tokens.

Read top to bottom, `train()` is the whole loop. Around it:

- `prepare_model` loads a model and converts it for one of the METHODS (or loads a SALR checkpoint as is);
- `load_examples` tokenises GSM8K / Alpaca records with the loss on the response only (salr.data);
- `micro_batches` orders examples into length-bucketed micro-batches, a deterministic stream across epochs,
  so the data position is just the optimizer step (resume needs nothing else);
- `residual_lr_scales` gives each layer's residual block its own learning rate (a float or Theorem 4's
  η* = 1/σ_max(X)², see `theorem4_rates`), applied by rescaling that block's AdamW update after each step;
- `save_checkpoint` / `load_train_state` write and read `DIR/checkpoints/step-N/` (a SALR checkpoint plus
  `train_state.pt`: optimizer, scheduler, RNG, step, per-layer lr scales), every file via temp + rename.

Distributed: run under `torchrun --nproc_per_node N` (RANK / LOCAL_RANK / WORLD_SIZE are read from the
environment; gloo on CPU, NCCL on GPU). `batch_size` is the global micro-batch: every process builds the same
micro-batch stream and takes every WORLD_SIZE-th example of each, and the loss is normalised by the answer
tokens of the whole global step, so N processes compute the same update as one. Only rank 0 logs and saves.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from salr import data
from salr.checkpoint import CONFIG_NAME, read_salr_config, replace_dir, save
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.io import atomic_write_bytes, atomic_write_json
from salr.layer import SALRLinear
from salr.memory import peak_memory_mib, reset_peak_memory
from salr.model import convert, mark_trainable
from salr.models import load_model

logger = logging.getLogger(__name__)

METHODS = ("salr", "lora", "prune-lora", "salr-frozen-residual")
METRICS_NAME = "metrics.jsonl"
REPORT_NAME = "train_report.json"
STATE_NAME = "train_state.pt"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainConfig:
    lr: float = field(default=2e-4, metadata={"help": "peak AdamW learning rate of the adapters"})
    residual_lr: float | str | None = field(
        default=None,
        metadata={"help": "residual block lr: None = lr, a float, 'theorem4' (per layer N/σ_max(X)²) or 'theorem4*F'"},
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
    progress: bool = field(default=True, metadata={"help": "tqdm bar on rank 0"})

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
        if self.lr <= 0:
            raise SALRError(f"lr must be positive, got {self.lr}")
        if isinstance(self.residual_lr, str) and self.residual_lr.startswith("theorem4"):
            self.theorem4_factor()
        elif isinstance(self.residual_lr, str):
            try:
                self.residual_lr = float(self.residual_lr)
            except ValueError as err:
                raise SALRError(f"residual_lr must be 'theorem4' or a number, got {self.residual_lr!r}") from err
        if isinstance(self.residual_lr, float) and self.residual_lr < 0:
            raise SALRError(f"residual_lr must be >= 0, got {self.residual_lr}")
        for name in ("batch_size", "grad_accum", "log_every", "calib_examples", "power_iters"):
            if getattr(self, name) < 1:
                raise SALRError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SALRError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise SALRError(f"epochs must be positive, got {self.epochs}")


# ----------------------------------------------------------------------------- model and data


def method_config(method: str, config: SALRConfig) -> SALRConfig:
    """The SALRConfig a method trains: `salr` as given; `lora` dense base (sparsity 0, no residual);
    `prune-lora` pruned base without residual; `salr-frozen-residual` SALR with the residual frozen."""
    changes: dict[str, Any] = {
        "salr": {"train_residual": True},
        "lora": {"sparsity": 0.0, "pattern": "unstructured", "granularity": "layer", "residual_rank": 0},
        "prune-lora": {"residual_rank": 0},
        "salr-frozen-residual": {"train_residual": False},
    }.get(method)
    if changes is None:
        raise SALRError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    merged = {**config.to_dict(), **changes}
    if merged["pattern"] != "unstructured":
        merged["sparsity"] = None
    if merged["r"] == 0 and merged["residual_rank"] == 0:
        raise SALRError(f"method {method} with lora rank 0 has nothing to train: pass --lora-rank > 0")
    return SALRConfig(**merged)


def prepare_model(
    model_spec: str, method: str, config: SALRConfig, dtype: str | None = None
) -> tuple[nn.Module, Any, SALRConfig, dict[str, Any] | None]:
    """(model, tokenizer, effective config, conversion report or None).

    A SALR checkpoint directory is trained as saved (its own config; `salr-frozen-residual` still freezes the
    residual block in `train`); any other model is loaded and converted for `method`.
    """
    path = Path(model_spec)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        saved = SALRConfig.from_dict(read_salr_config(path)["salr"])
        model, tokenizer = load_model(model_spec, dtype=dtype)
        if method == "salr-frozen-residual":
            saved.train_residual = False
        return model, tokenizer, saved, None
    config = method_config(method, config)
    model, tokenizer = load_model(model_spec, dtype=dtype)
    report = convert(model, config)
    return model, tokenizer, config, report


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


class AnswerLoss(nn.Module):
    """Wraps a causal LM: forward returns the SUM of token cross-entropies over labelled (answer) positions.

    The LM head runs only on the hidden states that predict a labelled token, which skips most of the
    vocabulary projection for long prompts. Wrapping (rather than calling submodules) keeps DDP's forward hooks.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask, labels: [B, T] int64; labels -100 where no loss
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, D]
        targets = labels[:, 1:]
        keep = targets != data.IGNORE_INDEX
        logits = head(hidden[:, :-1][keep]).float()  # [N, V]
        return F.cross_entropy(logits, targets[keep], reduction="sum")


def n_answer_tokens(examples: Sequence[dict[str, list[int]]], indices: Sequence[int]) -> int:
    return sum(sum(t != data.IGNORE_INDEX for t in examples[i]["labels"][1:]) for i in indices)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def salr_layers(model: nn.Module) -> list[tuple[str, SALRLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SALRLinear)]


# ----------------------------------------------------------------------------- residual learning rate


@torch.no_grad()
def theorem4_rates(
    model: nn.Module, examples: Sequence[dict[str, list[int]]], iters: int = 50, seed: int = 0
) -> dict[str, float]:
    """Theorem 4's residual learning rate per SALR layer, η* = N / σ_max(X)² = 1 / λ_max(XᵀX / N).

    X [N tokens, in] is the layer's input on `examples` (one forward each, no padding), collected by forward
    pre-hooks as the Gram matrix XᵀX (so memory is in², not N·in). Because the training loss is a mean over
    tokens, the 1/L step of Theorem 4 (L = σ_max(X)² for a summed loss) is multiplied by N. σ_max(XᵀX) =
    σ_max(X)² comes from `salr.theory.sigma_max_power_iteration` run on the (symmetric PSD) Gram matrix.
    """
    from salr.theory import sigma_max_power_iteration

    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, layer in salr_layers(model):

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        handles.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ex in examples:
            model(input_ids=torch.tensor([ex["input_ids"]], device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    rates = {}
    for name, gram in grams.items():
        lam = sigma_max_power_iteration(gram, iters=iters, seed=seed)
        if lam == 0.0:
            raise SALRError(f"{name}: calibration input is all zeros, Theorem 4's learning rate is undefined")
        rates[name] = counts[name] / lam
    return rates


def residual_lr_scales(model: nn.Module, cfg: TrainConfig, config: SALRConfig, examples: Sequence) -> dict[str, float]:
    """Per SALR layer, residual-block lr divided by the adapter lr (1.0 = same lr; 0.0 = frozen residual)."""
    layers = [(n, m) for n, m in salr_layers(model) if m.residual_rank > 0]
    if not config.train_residual:
        return {n: 0.0 for n, _ in layers}
    if cfg.residual_lr is None or not layers:
        return {}
    factor = cfg.theorem4_factor()
    if factor is not None:
        rates = theorem4_rates(model, examples[: cfg.calib_examples], cfg.power_iters, cfg.seed)
        return {n: factor * rates[n] / cfg.lr for n, _ in layers}
    return {n: float(cfg.residual_lr) / cfg.lr for n, _ in layers}


def _residual_blocks(layer: SALRLinear) -> tuple[torch.Tensor, torch.Tensor]:
    r = layer.residual_rank
    return layer.A_cat.data[:r], layer.B_cat.data[:, :r]


def frozen_residual_parameters(layers: dict[str, SALRLinear], scales: dict[str, float]) -> int:
    """Entries of A_cat / B_cat that never change (residual blocks with lr scale 0)."""
    return sum(
        layers[n].residual_rank * (layers[n].in_features + layers[n].out_features) for n, s in scales.items() if s == 0
    )


def _zero_residual_grads(layers: dict[str, SALRLinear], scales: dict[str, float]) -> None:
    """Frozen residual blocks (scale 0) get no gradient, so they do not count in gradient clipping either."""
    for name, scale in scales.items():
        layer = layers[name]
        if scale == 0.0 and layer.A_cat.grad is not None:
            layer.A_cat.grad[: layer.residual_rank] = 0
            layer.B_cat.grad[:, : layer.residual_rank] = 0


# ----------------------------------------------------------------------------- distributed, memory, checkpoints


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; start the process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, local_rank, world, device)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under output/checkpoints (named by latest.json, written last)."""
    pointer = Path(output) / CHECKPOINTS / "latest.json"
    if not pointer.is_file():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["dir"]
    return path if (path / STATE_NAME).is_file() else None


def save_checkpoint(
    output: Path, step: int, model: nn.Module, config: SALRConfig, tokenizer: Any, base_model: str, state: dict
) -> Path:
    """output/checkpoints/step-N: SALR checkpoint + train_state.pt, then latest.json; older ones removed.

    Each piece is written to a temporary name and renamed, and latest.json moves only once both exist, so a
    crash at any point leaves the previous checkpoint as the latest complete one.
    """
    root = output / CHECKPOINTS
    path = root / f"step-{step:07d}"
    save(model, path, config, tokenizer=tokenizer, base_model=base_model)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path / STATE_NAME, buffer.getvalue())
    atomic_write_json(root / "latest.json", {"dir": path.name, "step": step})
    for old in root.glob("step-*"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_train_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_NAME, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable state file is a corrupt checkpoint for the user
        raise SALRError(f"{path / STATE_NAME} cannot be read ({err}): delete {path.parent} and start over") from err


def check_output_dir(output: Path) -> None:
    """Fail before training, not after it, when `output` holds something other than a salr run (the final save
    replaces the directory and will not delete files it did not write)."""
    if output.exists() and not output.is_dir():
        raise SALRError(f"output {output} is a file: pass a directory")
    if output.is_dir() and not (output / CONFIG_NAME).is_file():
        foreign = sorted(p.name for p in output.iterdir() if p.name not in (CHECKPOINTS, METRICS_NAME))
        if foreign:
            raise SALRError(
                f"output {output} already holds {foreign[:3]} and is not a salr run: choose a new or empty directory"
            )


def save_final(output: Path, model: nn.Module, config: SALRConfig, tokenizer: Any, base_model: str, report: dict):
    """Make `output` itself a SALR checkpoint (loadable by salr.load / `salr eval --model output`).

    salr.save replaces a whole directory, so the final model is saved into a staging directory, the run's
    checkpoints/ and metrics.jsonl are moved in, and the staging directory is renamed over `output`.
    """
    staging = output.with_name(f".{output.name}.final-{os.getpid()}")
    save(model, staging, config, tokenizer=tokenizer, base_model=base_model, extra_files={REPORT_NAME: report})
    for name in (CHECKPOINTS, METRICS_NAME):
        if (output / name).exists():
            os.replace(output / name, staging / name)
    replace_dir(staging, output)  # refuses to replace a directory that holds anything but a SALR run


def _rewrite_metrics(path: Path, keep_until_step: int) -> None:
    """On resume, drop metric lines past the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= keep_until_step]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())


# ----------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, list[int]]],
    config: SALRConfig,
    cfg: TrainConfig,
    output: str | os.PathLike,
    base_model: str = "",
    resume_from: str | os.PathLike | None = None,
    eval_fn: Callable[[nn.Module, Any], dict[str, float]] | None = None,
    extra_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model`'s adapters (A_cat / B_cat) on `examples`; save the run to `output`; return the report.

    `model` is converted already (for a resume: loaded from the checkpoint `resume_from`, whose train_state.pt
    restores optimizer, scheduler, RNG and step). `eval_fn(model, tokenizer) -> {name: value}` runs every
    `eval_every` steps on rank 0 and its values go into the metrics log.
    """
    env = init_distributed()
    output = Path(output)
    if env.main and resume_from is None:
        check_output_dir(output)
    torch.manual_seed(cfg.seed)
    model.to(env.device)
    mark_trainable(model)
    model.train()
    params = trainable_parameters(model)
    if not params:
        raise SALRError("the model has no trainable adapters (A_cat / B_cat): convert it with a rank > 0 first")
    if cfg.batch_size % env.world:
        raise SALRError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({env.world})")
    layers = dict(salr_layers(model))
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch(len(examples), cfg)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.03 * total)

    # A_cat holds [A_res; A_lora] in one tensor, so AdamW sees one lr. The residual block's own lr is applied by
    # rescaling its update after every step: AdamW's update is lr * (adam direction + weight_decay * param), and
    # the direction does not depend on lr, so old + s * (new - old) is exactly a step with lr * s on that block.
    optimizer = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, cfg.min_lr_ratio))
    start = 0
    if resume_from is not None:
        state = load_train_state(Path(resume_from))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, scales = state["step"], state["residual_lr_scales"]
        logger.info("resumed from %s at step %d", resume_from, start)
    else:
        scales = residual_lr_scales(model, cfg, config, examples)
    if scales and cfg.theorem4_factor() is not None:
        values = sorted(s * cfg.lr for s in scales.values())
        mid = values[len(values) // 2]
        logger.info("theorem4 residual lr: min %.3g, median %.3g, max %.3g", values[0], mid, values[-1])

    loss_module: nn.Module = AnswerLoss(model)
    if env.world > 1:
        # Only A_cat / B_cat need gradients; frozen bases are buffers, identical on every rank (no broadcast).
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, find_unused_parameters=False, broadcast_buffers=False
        )
    metrics_path = output / METRICS_NAME
    if env.main:
        output.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            _rewrite_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
    pad_ids = () if tokenizer is None else (tokenizer.pad_token_id, tokenizer.eos_token_id)
    pad_id = next((t for t in pad_ids if t is not None), 0)
    stream = micro_batches(examples, cfg.batch_size, cfg.seed, start=start * cfg.grad_accum)
    bar = tqdm(total=total, initial=start, desc="train", disable=not (env.main and cfg.progress), unit="step")
    history: list[dict[str, Any]] = []
    # Peak memory in the log and report is this run's (from here on), not earlier work in the same process.
    reset_peak_memory(env.device)
    started, tokens_seen = time.perf_counter(), 0
    for step in range(start, total):
        t0 = time.perf_counter()
        group = [next(stream) for _ in range(cfg.grad_accum)]
        # Normalise by the answer tokens of the whole global step: then the update does not depend on how the step
        # is split into micro-batches or processes. DDP averages gradients, so each rank multiplies by world.
        n_tokens = sum(n_answer_tokens(examples, idx) for idx in group)
        loss_sum, step_tokens = torch.zeros((), device=env.device), 0
        for i, idx in enumerate(group):
            local = idx[env.rank :: env.world]
            batch = data.collate([examples[j] for j in local], pad_id)
            batch = {k: v.to(env.device) for k, v in batch.items()}
            step_tokens += int(batch["attention_mask"].sum())
            sync = i == len(group) - 1 or env.world == 1
            with contextlib.nullcontext() if sync else loss_module.no_sync():
                loss = loss_module(**batch)
                (loss * env.world / max(n_tokens, 1)).backward()
            loss_sum += loss.detach()
        _zero_residual_grads(layers, scales)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm))
            if cfg.max_grad_norm > 0
            else float("nan")
        )
        lr_now = optimizer.param_groups[0]["lr"]
        before = {n: [b.clone() for b in _residual_blocks(layers[n])] for n, s in scales.items() if s != 1.0}
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, old_blocks in before.items():
                for new, old in zip(_residual_blocks(layers[name]), old_blocks, strict=True):
                    new.copy_(old if scales[name] == 0.0 else old + scales[name] * (new - old))
        if env.world > 1:  # loss and token count for the log: a sync point, once per step
            totals = torch.stack([loss_sum, torch.tensor(float(step_tokens), device=env.device)])
            dist.all_reduce(totals)
            loss_sum, step_tokens = totals[0], int(totals[1])
        loss_value = float(loss_sum) / max(n_tokens, 1)
        tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "loss": loss_value,
            "lr": lr_now,
            "grad_norm": grad_norm,
            "answer_tokens": n_tokens,
            "tokens_per_s": step_tokens / dt,
            "peak_memory_mib": peak_memory_mib(env.device),
            "seconds": time.perf_counter() - started,
        }
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and env.main:
            model.eval()
            row.update({f"eval_{k}": v for k, v in eval_fn(model, tokenizer).items()})
            model.train()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        history.append(row)
        if env.main and ((step + 1) % cfg.log_every == 0 or step + 1 == total or "eval_answer_nll" in row):
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == total):
            if env.main:
                state = {
                    "step": step + 1,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                    "residual_lr_scales": scales,
                    "train_config": asdict(cfg),
                }
                save_checkpoint(output, step + 1, model, config, tokenizer, base_model, state)
            if env.world > 1:
                dist.barrier()
    bar.close()

    report = {
        "method_config": config.to_dict(),
        "train_config": asdict(cfg),
        "base_model": base_model,
        "steps": total,
        "resumed_from_step": start if resume_from is not None else None,
        "world_size": env.world,
        "examples": len(examples),
        "trainable_parameters": sum(p.numel() for _, p in params) - frozen_residual_parameters(layers, scales),
        "final_loss": history[-1]["loss"] if history else None,
        "tokens": tokens_seen,
        "seconds": time.perf_counter() - started,
        "peak_memory_mib": peak_memory_mib(env.device),
        "residual_lr": cfg.residual_lr,
        "residual_lr_per_layer": {n: s * cfg.lr for n, s in scales.items()} if scales else None,
        "history": history,
        **(extra_report or {}),
    }
    if env.main:
        model.eval()
        save_final(output, model, config, tokenizer, base_model, report)
        logger.info("saved run to %s (%d steps, final loss %.4f)", output, total, report["final_loss"] or 0.0)
    if env.world > 1:
        dist.barrier()
    return report


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
) -> dict[str, Any]:
    """What `salr train` does: prepare the model (or reload the latest checkpoint with `resume`), tokenise the
    data, train, save. Returns the report."""
    if method not in METHODS:
        raise SALRError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    checkpoint = latest_checkpoint(output) if resume else None
    if resume and checkpoint is None:
        raise SALRError(f"--resume: no checkpoint in {Path(output) / CHECKPOINTS}; train with --save-every first")
    started = time.perf_counter()
    if records is None:  # read (and validate) the data before the slow model preparation
        if data_path is None:
            raise SALRError("no training data: pass --data PATH (GSM8K or Alpaca JSON/JSONL)")
        records = data.load_sft_records(data_path, limit)
    if checkpoint is not None:
        model, tokenizer, config, conversion = prepare_model(str(checkpoint), method, config, dtype)
    else:
        model, tokenizer, config, conversion = prepare_model(model_spec, method, config, dtype)
    examples = load_examples(data_path, tokenizer, cfg.max_length, limit, records)
    extra = {
        "method": method,
        "data": str(data_path) if data_path is not None else "records",
        "prepare_seconds": time.perf_counter() - started,
        "conversion_totals": conversion["totals"] if conversion else None,
    }
    return train(
        model, tokenizer, examples, config, cfg, output, model_spec, checkpoint, eval_fn=eval_fn, extra_report=extra
    )

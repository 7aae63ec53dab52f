"""Fine-tuning peak memory and step time: SALR (bitmap base, trainable A_cat/B_cat) vs LoRA on a dense base with the
same trainable rank, both defined by `salr.train.config.method_config`."""

from __future__ import annotations

import gc
import logging
import statistics
import time
from typing import Any

import torch
from torch import nn

from salr.bench.models import bench_model, cuda_model, salr_copy
from salr.bench.timing import environment, in_child, model_bytes, sync
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.memory import peak_rss_mib, reset_peak_rss, return_freed_memory, rss_mib
from salr.train.config import method_config

logger = logging.getLogger(__name__)

METHODS = ("lora", "salr")


def train_steps(model: nn.Module, input_ids: torch.Tensor, steps: int = 3, lr: float = 1e-4) -> dict[str, Any]:
    """`steps` AdamW steps on the trainable parameters (causal-LM loss on input_ids [batch, seq]); the median step ms
    (the first step, a warm-up, left out when there are more), every loss and the trainable parameter count."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SALRError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr)
    times, losses = [], []
    for _ in range(steps):
        sync(input_ids.device)
        t0 = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(input_ids.device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {
        "step_ms": 1e3 * statistics.median(times[1:] if len(times) > 1 else times),
        "losses": losses,
        "trainable_parameters": sum(p.numel() for p in params),
    }


def method_model(model: nn.Module, method: str, config: SALRConfig, inplace: bool = False) -> nn.Module:
    """`model` converted for training `method` ("salr": bitmap bases; "lora": dense base, LoRA of rank
    r + residual_rank at SALR's LoRA scale), as `method_config` defines it."""
    return salr_copy(model, method_config(method, config), bitmap=method != "lora", inplace=inplace)[0]


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing of the decoder layers (transformers' non-reentrant version, which works with a frozen
    embedding): each layer's activations are recomputed in the backward pass instead of kept. Applied the same way
    to every method."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _layer_overrides(layers: int | None) -> dict[str, int]:
    return {} if layers is None else {"num_hidden_layers": layers}


def _child_train_memory(
    spec: str,
    method: str,
    config: SALRConfig,
    batch: int,
    seq: int,
    steps: int,
    threads: int,
    checkpointing: bool,
    layers: int | None = None,
) -> dict[str, Any]:
    """Runs in a fresh process (CPU): build one method's model, train `steps` steps, report peak RSS (MiB)."""
    torch.set_num_threads(threads)
    import transformers.models.llama.modeling_llama  # noqa: F401 - the runtime both methods carry, before any weight

    runtime = rss_mib()
    model, _ = bench_model(spec, "bfloat16", **_layer_overrides(layers))
    model = method_model(model, method, config, inplace=True)
    if checkpointing:
        enable_checkpointing(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    gc.collect()
    # The conversion (SVD, dense + bitmap copies of each base) leaves freed heap pages resident: hand them back to
    # the OS so the peak below is what training holds, not what the conversion left behind.
    trimmed = return_freed_memory()
    before = rss_mib()
    reset = reset_peak_rss()  # so the peak is the training's, not the conversion's (SVD, dense + bitmap bases)
    stats = train_steps(model, ids, steps)
    return {
        **stats,
        "rss_runtime_mib": runtime,
        "rss_before_training_mib": before,
        "peak_rss_mib": peak_rss_mib(),
        "peak_covers": "training steps only" if reset else "conversion and training (VmHWM could not be reset)",
        "freed_memory_returned": trimmed,
        "model_bytes": model_bytes(model),
    }


def _cuda_train_memory(
    spec: str, method: str, config: SALRConfig, batch: int, seq: int, steps: int, checkpointing: bool,
    layers: int | None = None,
) -> dict:  # fmt: skip
    """On the GPU: build one method's model, train `steps` steps, report torch.cuda.max_memory_allocated (MiB)
    during the training steps."""
    model = method_model(cuda_model(spec, **_layer_overrides(layers)), method, config, inplace=True)
    if checkpointing:
        enable_checkpointing(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    stats = train_steps(model, ids, steps)
    return {**stats, "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20, "model_bytes": model_bytes(model)}


def _over_runtime(results: dict[str, dict], peak_key: str) -> dict[str, float]:
    """CPU: the peak ratio without the interpreter + torch + transformers resident set both processes start with
    (what torch.cuda.max_memory_allocated leaves out on a GPU); nothing on CUDA."""
    if "rss_runtime_mib" not in results["lora"]:
        return {}
    above = {m: r[peak_key] - r["rss_runtime_mib"] for m, r in results.items()}
    return {"salr_over_lora_peak_above_runtime": above["salr"] / above["lora"]}


def train_memory(
    spec: str = "default",
    device: str = "cpu",
    batch: int = 4,
    seq: int = 256,
    steps: int = 2,
    sparsity: float = 0.5,
    residual_rank: int = 64,
    lora_rank: int = 16,
    checkpointing: bool = False,
    layers: int | None = None,
) -> dict[str, Any]:
    """`salr bench --train-memory`: fine-tuning peak memory (MiB) and step time, SALR vs LoRA (`method_model`) on the
    same model and batch [batch, seq], both with gradient checkpointing when `checkpointing`; `layers` keeps that
    many decoder layers of a random benchmark model. Two steps are the least that covers the peak: the second
    backward runs with the optimizer state the first step created.

    CUDA: `spec` "llama3-8b" builds the random Llama-3-8B-shaped model on the GPU, anything else is loaded; the peak is
    torch.cuda.max_memory_allocated during the training steps (after the model is built). CPU: each method runs in a
    child process and the peak is its RSS during the training steps (VmHWM reset after conversion; the ~430 MiB of
    torch + transformers are in both)."""
    config = SALRConfig(sparsity=sparsity, residual_rank=residual_rank, r=lora_rank)
    results = {}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SALRError("--device cuda but no CUDA device is available")
        for method in METHODS:
            results[method] = _cuda_train_memory(spec, method, config, batch, seq, steps, checkpointing, layers)
            torch.cuda.empty_cache()
        peak_key = "peak_memory_mib"
    elif device == "cpu":
        for method in METHODS:
            args = (spec, method, config, batch, seq, steps, torch.get_num_threads(), checkpointing, layers)
            results[method] = in_child(_child_train_memory, *args)
        peak_key = "peak_rss_mib"
    else:
        raise SALRError(f"device must be cpu or cuda, got {device!r}")
    return {
        "benchmark": "train-memory",
        "model": spec,
        "device": device,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "gradient_checkpointing": checkpointing,
        "layers": layers,
        "sparsity": sparsity,
        "residual_rank": residual_rank,
        "lora_rank": lora_rank,
        "lora_baseline_rank": method_config("lora", config).r,
        "peak_metric": peak_key,
        "results": results,
        "salr_over_lora_peak": results["salr"][peak_key] / results["lora"][peak_key],
        **_over_runtime(results, peak_key),
        "environment": environment(),
    }

"""Checkpoint bytes on disk: a dense bf16 save_pretrained (safetensors) vs the SALR checkpoint of the same model."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salr.bench.models import LLAMA3_8B, bench_model, random_llama, salr_copy
from salr.bench.timing import environment
from salr.config import SALRConfig

logger = logging.getLogger(__name__)


def checkpoint_case(
    model: nn.Module,
    name: str,
    sparsity: float = 0.5,
    residual_rank: int = 64,
    lora_rank: int = 16,
    quant: str = "none",
    quant_double: bool = False,
) -> dict[str, Any]:
    """Save `model` dense (save_pretrained, safetensors) and as a SALR checkpoint (bitmap bases, quantized with
    `quant`, adapters in the model's dtype) into a temporary directory and report the bytes of the weight files on
    disk, the format's ideal bytes (1 bit per weight + kept values + adapters + dense rest), the adapters' bytes, and
    the frozen bases' bytes against the same weights dense in bf16."""
    from salr.checkpoint import WEIGHTS_NAME, save, size_report
    from salr.convert import base_slots

    config = SALRConfig(
        sparsity=sparsity, residual_rank=residual_rank, r=lora_rank, quant=quant, quant_double=quant_double
    )
    salr_model, config = salr_copy(model, config)
    with tempfile.TemporaryDirectory(prefix="salr-ckpt-") as tmp:
        model.save_pretrained(Path(tmp, "dense"))
        dense_file = sum(p.stat().st_size for p in Path(tmp, "dense").glob("*.safetensors"))
        save(salr_model, Path(tmp, "salr"), config)
        sizes = size_report(salr_model, Path(tmp, "salr"))
        assert sizes["checkpoint_bytes"] == Path(tmp, "salr", WEIGHTS_NAME).stat().st_size
    adapters = sum(p.numel() * p.element_size() for n, p in salr_model.named_parameters() if n.endswith("_cat"))
    base_dense_bf16 = sum(2 * getattr(h, a).shape[0] * getattr(h, a).shape[1] for _, h, a in base_slots(salr_model))
    return {
        "name": name,
        "salr_config": config.to_dict(),
        "dense_checkpoint_bytes": dense_file,
        "salr_checkpoint_bytes": sizes["checkpoint_bytes"],
        "salr_ideal_bytes": sizes["ideal_bytes"],
        "adapter_bytes": adapters,
        "over_ideal": sizes["checkpoint_bytes"] / sizes["ideal_bytes"] - 1.0,
        "compression_vs_dense": dense_file / sizes["checkpoint_bytes"],
        "dense_bf16_bytes": sizes["dense_bytes"],
        "salr_base_bytes": sizes["base_bytes"],
        "base_dense_bf16_bytes": base_dense_bf16,
        "base_compression_vs_dense_bf16": base_dense_bf16 / sizes["base_bytes"],
    }


def checkpoint_sizes(
    spec: str | None = "default",
    sparsity: float = 0.5,
    residual_rank: int = 64,
    lora_rank: int = 16,
    llama_layer: dict | None = None,
    quant: str = "none",
    quant_double: bool = False,
) -> dict[str, Any]:
    """`salr bench --checkpoint`: `checkpoint_case` for a model (`spec`, skipped if None) and for one Llama-3-8B-shaped
    decoder layer (a 1-layer LlamaForCausalLM with a 256-token vocabulary so the embeddings, kept dense in both, do
    not dominate; `llama_layer` overrides its shape, e.g. for tests)."""
    ranks = {"sparsity": sparsity, "residual_rank": residual_rank, "lora_rank": lora_rank, "quant": quant}
    ranks["quant_double"] = quant_double
    cases = []
    if spec:
        model, _ = bench_model(spec, "bfloat16")
        cases.append(checkpoint_case(model, spec, **ranks))
        del model
    layer = random_llama("cpu", torch.bfloat16, **{"num_hidden_layers": 1, "vocab_size": 256, **(llama_layer or {})})
    case = checkpoint_case(layer, "llama3-8b-shaped-layer", **ranks)
    case["shape"] = {k: layer.config.to_dict()[k] for k in LLAMA3_8B}
    cases.append(case)
    return {"benchmark": "checkpoint", "cases": cases, "environment": environment()}

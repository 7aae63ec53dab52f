"""Models the benchmarks compare: random weights with Llama-3-8B or TinyLlama-1.1B shapes (`random_llama`), any
benchmark model spec on the CPU (`bench_model`) or the GPU (`cuda_model`), and the SALR version of a dense model
(`salr_copy`)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salr.attention import use_decode_attention
from salr.config import PRESETS, SALRConfig
from salr.errors import SALRError

logger = logging.getLogger(__name__)

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}

# TinyLlama-1.1B's shapes: the 1B-class model the CPU benchmarks use (`--model tinyllama-shape`), where the converted
# linears are ~88 % of the weights a decoded token streams (the default 135M model: ~55 %, its lm_head dominates).
TINYLLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
RANDOM_SPECS = {"llama3-8b": LLAMA3_8B, "tinyllama-shape": TINYLLAMA_1B}


def random_llama(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides: Any
) -> nn.Module:
    """A LlamaForCausalLM with Llama-3-8B shapes (LLAMA3_8B, any field overridable) and random weights (N(0, 0.02),
    norms 1), built on the meta device and materialised directly on `device` (an 8B model never touches the CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    fields = {**LLAMA3_8B, "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False}
    config = LlamaConfig(**{**fields, **overrides})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(dtype)  # on the meta device: no fp32 copy is ever materialised
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its tables are buffers to_empty left empty
    use_decode_attention(model)  # as salr's loaders do for the models they load
    return model.eval()


def bench_model(
    spec: str, dtype: str = "bfloat16", device: str = "cpu", **llama_overrides: Any
) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) for a benchmark model spec: "tinyllama-shape" and "llama3-8b" are `random_llama`
    with those shapes (built in memory on `device`, no download, no tokenizer), anything else a loader spec."""
    if spec in RANDOM_SPECS:
        shapes = {**RANDOM_SPECS[spec], **llama_overrides}
        if spec == "tinyllama-shape":
            shapes = {"max_position_embeddings": 2048, "rope_theta": 10000.0, **shapes}
        return random_llama(device, getattr(torch, dtype), **shapes), None
    from salr.loaders import load_model

    _refuse_compressed(spec)
    model, tokenizer = load_model(spec, dtype=dtype)
    return model.to(device), tokenizer


def _refuse_compressed(spec: str) -> None:
    """The benchmarks compress the model themselves to compare it with its dense self: a SALR checkpoint or run is
    refused before it is loaded, naming the dense model it came from where its salr_config.json records one."""
    config = Path(spec) / "salr_config.json"
    if spec == "default" or not config.is_file():
        return
    try:
        base = json.loads(config.read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        base = None
    origin = f" (it was made from {base!r})" if base else ""
    report = Path(spec) / "salr_report.json"
    sizes = f" The checkpoint's own sizes are in {report}." if report.is_file() else ""
    raise SALRError(
        f"{spec} is already a SALR checkpoint: salr bench compresses --model itself to compare it with the dense "
        f"model, so give the dense model{origin}.{sizes}"
    )


def cuda_model(spec: str, **llama_overrides: Any) -> nn.Module:
    """A bf16 model on the GPU: "llama3-8b" / "tinyllama-shape" are `random_llama` built there, anything else a loader
    spec."""
    return bench_model(spec, "bfloat16", "cuda", **llama_overrides)[0]


def salr_copy(
    model: nn.Module, config: SALRConfig, bitmap: bool = True, inplace: bool = False
) -> tuple[nn.Module, SALRConfig]:
    """A SALR version of a dense model converted with `config`, adapters in the model's dtype and unmerged, bitmap
    bases when `bitmap`; a deep copy unless `inplace` (which saves a second copy of an 8B model). Returns the model
    and the config it was converted with. With the 2:4 pattern on a GPU the bases go onto sparse tensor cores
    (`use_semi_structured`; pass bitmap=False)."""
    from salr.convert import convert, pack_bases, use_semi_structured

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    # Speed, size and memory do not depend on how the mask was chosen: convert data-free with the paper's recipe
    # (random-weight benchmark models have no meaningful text to calibrate on).
    config = SALRConfig.from_dict({**config.to_dict(), **PRESETS["paper"], "adapter_dtype": dtype})
    salr_model = model if inplace else copy.deepcopy(model)
    convert(salr_model, config, progress=False)
    if bitmap:
        pack_bases(salr_model)
    elif config.nm == (2, 4) and next(salr_model.parameters()).is_cuda:
        use_semi_structured(salr_model)
    return salr_model.eval(), config

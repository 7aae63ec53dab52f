"""Models the benchmarks compare: random weights with Llama-3-8B shapes (`random_llama`), a model loaded onto the GPU
(`cuda_model`) and the SALR version of a dense model (`salr_copy`)."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from salr.config import PRESETS, SALRConfig

logger = logging.getLogger(__name__)

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


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
    model.to_empty(device=device)
    model.to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its tables are buffers to_empty left empty
    return model.eval()


def cuda_model(spec: str, **llama_overrides: Any) -> nn.Module:
    """A bf16 model on the GPU: "llama3-8b" is `random_llama` built there, anything else a loader spec."""
    if spec == "llama3-8b":
        return random_llama("cuda", torch.bfloat16, **llama_overrides)
    from salr.loaders import load_model

    return load_model(spec, dtype="bfloat16")[0].to("cuda")


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

"""Load any supported `--model`: 'default', a Hugging Face directory or hub id, a llama2.c checkpoint, or a SALR
checkpoint directory. Every loader returns (transformers causal LM in eval mode, tokenizer)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from salr.config import DTYPES
from salr.errors import SALRError
from salr.loaders.default import load_default
from salr.loaders.llama2c import load_llama2c_model, load_llama2c_tokenizer

logger = logging.getLogger(__name__)


def _llama2c_tokenizer_path(model_path: Path) -> Path:
    for candidate in [model_path.parent / "tokenizer.bin", *sorted(model_path.parent.glob("tok*.bin"))]:
        if candidate.is_file():
            return candidate
    raise SALRError(f"no tokenizer found beside {model_path}: put llama2.c's tokenizer.bin (or tok*.bin) next to it")


def is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def load_model(spec: str, dtype: str | None = None) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) for `spec`; `dtype` ('float32', 'bfloat16', 'float16') casts the weights."""
    path = Path(spec).expanduser()
    if spec == "default":
        model, tokenizer = load_default()
    elif path.is_file() and path.suffix == ".bin":
        model, tokenizer = load_llama2c_model(path), load_llama2c_tokenizer(_llama2c_tokenizer_path(path))
    elif path.is_dir() and (path / "salr_config.json").is_file():
        from salr.checkpoint import load  # local import: checkpoint imports this module

        model, tokenizer = load(path)
    elif path.is_dir() and _is_peft(path):
        from salr.peft_adapter import load_peft  # local import: it imports this module

        model, tokenizer, _ = load_peft(path)
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _from_pretrained(str(path))
    elif path.is_dir():
        raise SALRError(
            f"{path} is neither a Hugging Face model directory (config.json), a SALR checkpoint, nor an exported PEFT "
            "pair"
        )
    elif is_hub_id(spec):
        model, tokenizer = _from_pretrained(spec)
    else:
        raise SALRError(
            f"model {spec!r} not found: pass 'default', a Hugging Face model directory or hub id, a llama2.c "
            "checkpoint (*.bin with its tokenizer beside it), or a SALR checkpoint directory"
        )
    if dtype is not None:
        if dtype not in DTYPES:
            raise SALRError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        cast_weights(model, DTYPES[dtype])
    return model.eval(), tokenizer


def _is_peft(path: Path) -> bool:
    """An exported pair (OUT/adapter + OUT/base) or a PEFT adapter directory (adapter_config.json)."""
    return (path / "adapter" / "adapter_config.json").is_file() or (path / "adapter_config.json").is_file()


def cast_weights(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Cast parameters and persistent buffers, as `from_pretrained(dtype=...)` would.

    Unlike `model.to(dtype)` this leaves non-persistent buffers (RoPE `inv_freq`) in fp32, so a model saved and
    reloaded gives bit-identical logits.
    """
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, buf.to(dtype))
    model.config.dtype = dtype


def _from_pretrained(name: str) -> tuple[PreTrainedModel, object]:
    try:
        model = AutoModelForCausalLM.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad or unreachable model for the user
        raise SALRError(
            f"could not load {name!r} ({type(err).__name__}: {err}). If it is a hub id, are you offline? "
            "Pass a local model directory instead; if it is a directory, its files may be missing or corrupt."
        ) from err
    return model, tokenizer

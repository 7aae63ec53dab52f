"""Load any supported `--model`: 'default', a Hugging Face directory or hub id, a llama2.c checkpoint, or a SALR
checkpoint directory. Every loader returns (transformers causal LM in eval mode, tokenizer), with every weight read
from the files (never randomly initialised) and finite."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel

from salr.config import DTYPES
from salr.errors import SALRError
from salr.integrity import check_finite
from salr.loaders.default import load_default
from salr.loaders.hf import load_hf_dir, load_hub, looks_like_salr
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
    if dtype is not None and dtype not in DTYPES:
        raise SALRError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(spec).expanduser()
    if spec == "default":
        model, tokenizer = load_default()
    elif path.is_file() and path.suffix == ".bin":
        model = load_llama2c_model(path)
        tokenizer = load_llama2c_tokenizer(_llama2c_tokenizer_path(path))
        if len(tokenizer) > model.config.vocab_size:
            raise SALRError(
                f"{_llama2c_tokenizer_path(path)} has {len(tokenizer)} tokens but {path} only "
                f"{model.config.vocab_size}: the tokenizer belongs to another model"
            )
    elif path.is_dir() and (path / "salr_config.json").is_file():
        from salr.checkpoint import load  # local import: checkpoint imports this module

        model, tokenizer = load(path)
    elif path.is_dir() and looks_like_salr(path):
        raise SALRError(
            f"{path} is a SALR checkpoint or run without its salr_config.json: it is incomplete (an interrupted "
            "save?); re-create it, or finish a training run with `salr train ... --resume`"
        )
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = load_hf_dir(path)
    elif path.is_dir():
        raise SALRError(f"{path} is neither a Hugging Face model directory (config.json) nor a SALR checkpoint")
    elif is_hub_id(spec):
        model, tokenizer = load_hub(spec)
    else:
        raise SALRError(
            f"model {spec!r} not found: pass 'default', a Hugging Face model directory or hub id, a llama2.c "
            "checkpoint (*.bin with its tokenizer beside it), or a SALR checkpoint directory"
        )
    if not (path.is_dir() and (path / "salr_config.json").is_file()):  # salr.load checked its own
        check_finite(model, spec)
    if dtype is not None:
        cast_weights(model, DTYPES[dtype])
        check_finite(model, f"{spec} cast to {dtype}")  # fp16 overflows to infinity
    return model.eval(), tokenizer


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

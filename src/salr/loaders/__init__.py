"""Load any supported `--model`: 'default', a Hugging Face directory or hub id, a llama2.c checkpoint, or a SALR
checkpoint directory. Every loader returns (transformers causal LM in eval mode, tokenizer), with every weight read
from the files (never randomly initialised) and finite."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel

from salr.attention import use_decode_attention
from salr.config import DTYPES
from salr.errors import SALRError
from salr.hugepages import place_on_huge_pages
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


def load_model(spec: str, dtype: str | None = None, huge_pages: bool = True) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) for `spec`; `dtype` ('float32', 'bfloat16', 'float16') casts the weights. A SALR checkpoint
    is placed on transparent huge pages (salr.hugepages) unless `huge_pages` is False: pass False when the model goes
    to a GPU, where the CPU copy would be wasted."""
    if dtype is not None and dtype not in DTYPES:
        raise SALRError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(spec).expanduser()
    # 'default' names the embedded model even where the working directory holds a folder of that name
    salr_checkpoint = spec != "default" and path.is_dir() and (path / "salr_config.json").is_file()
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
    elif salr_checkpoint:
        from salr.checkpoint import load  # local import: checkpoint imports this module

        model, tokenizer = load(path, huge_pages=False)  # placed below, after any cast
    elif path.is_dir() and _is_peft(path):
        from salr.peft_adapter import load_peft  # local import: it imports this module

        model, tokenizer, _ = load_peft(path)
    elif path.is_dir() and looks_like_salr(path):
        raise SALRError(
            f"{path} is a SALR checkpoint or run without its salr_config.json: it is incomplete (an interrupted "
            "save?); re-create it, or finish a training run with `salr train ... --resume`"
        )
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = load_hf_dir(path)
    elif path.is_dir():
        raise SALRError(
            f"{path} is neither a Hugging Face model directory (config.json), a SALR checkpoint, nor an exported PEFT "
            "pair"
        )
    elif is_hub_id(spec):
        model, tokenizer = load_hub(spec)
    else:
        raise SALRError(
            f"model {spec!r} not found: pass 'default', a Hugging Face model directory or hub id, a llama2.c "
            "checkpoint (*.bin with its tokenizer beside it), or a SALR checkpoint directory"
        )
    if not salr_checkpoint:  # salr.load checked its own
        check_finite(model, spec)
    if dtype is not None:
        cast_weights(model, DTYPES[dtype])
        check_finite(model, f"{spec} cast to {dtype}")  # fp16 overflows to infinity
    if salr_checkpoint and huge_pages:  # as salr.load places them: the compressed model decodes faster on the CPU
        place_on_huge_pages(model)
    use_decode_attention(model)  # dense and SALR models alike (salr.attention)
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
        if getattr(module, "format", None) == "qbitmap":
            module.to(dtype)  # a quantized base keeps its codes and fp32 scales; only its output dtype changes
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, buf.to(dtype))
    model.config.dtype = dtype

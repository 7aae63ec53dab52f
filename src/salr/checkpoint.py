"""SALR checkpoints: a directory with

    config.json          the base model's transformers config
    salr_config.json     format version, SALRConfig, base model spec, sha256 of every other file
    model.safetensors    every tensor: frozen sparse bases, A_cat / B_cat, and the untouched dense weights
    tokenizer files      whatever the tokenizer saves

Saving writes into a temporary sibling directory and renames it into place, so a crash never leaves a
half-written checkpoint. Loading builds the model skeleton without allocating weights, rebuilds the SALR
structure, then assigns the saved tensors; checksums are verified first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from salr.bases import BitmapBase, base_for_saved
from salr.bitmap_format import dense_nbytes, ideal_bitmap_nbytes
from salr.config import SALRConfig
from salr.convert import base_format, base_slots, convert, mark_trainable
from salr.errors import SALRError
from salr.io import atomic_write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "salr_config.json"
WEIGHTS_NAME = "model.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without aliases (tied embeddings): safetensors refuses shared storage."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and tensor.numel() > 0:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def save(
    model: PreTrainedModel,
    directory: str | os.PathLike,
    config: SALRConfig,
    tokenizer: Any = None,
    base_model: str | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a SALR checkpoint of `model` (already converted with `config`) to `directory`, atomically.

    `extra_files` maps file names to JSON-serialisable objects written beside the weights (e.g. the report).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        model.config.save_pretrained(tmp)
        tensors, aliases = _unique_state_dict(model)
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "salr_format_version": str(FORMAT_VERSION)})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            atomic_write_json(tmp / name, obj)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(
            tmp / CONFIG_NAME,
            {
                "format_version": FORMAT_VERSION,
                "salr": config.to_dict(),
                "base_model": base_model,
                "base_format": base_format(model),
                "tied_tensors": aliases,
                "files": files,
            },
        )
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved SALR checkpoint to %s", directory)
    return directory


def size_report(model: nn.Module, directory: str | os.PathLike) -> dict[str, int]:
    """Bytes of the saved weights vs the format's ideal and the dense model in the same dtypes.

    ideal: 1 bit per base weight + the kept values for bitmap bases (row offsets excluded), every other tensor
    (adapters, dense bases, everything not pruned) at its own size. dense: every weight dense, no adapters.
    """
    tensors, _ = _unique_state_dict(model)
    ideal = dense = 0
    bitmap_prefixes = set()
    for prefix, holder, attr in base_slots(model):
        base = getattr(holder, attr)
        if isinstance(base, BitmapBase):
            bitmap_prefixes.add(f"{prefix}.")
            ideal += ideal_bitmap_nbytes(base.shape, base.nnz, base.dtype)
            dense += dense_nbytes(base.shape, base.dtype)
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if any(name.startswith(p) for p in bitmap_prefixes):
            continue
        ideal += nbytes
        if not name.endswith(("A_cat", "B_cat")):
            dense += nbytes
    return {
        "checkpoint_bytes": (Path(directory) / WEIGHTS_NAME).stat().st_size,
        "ideal_bytes": ideal,
        "dense_bytes": dense,
    }


def replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and removed only afterwards."""
    if target.exists():
        if not (target / CONFIG_NAME).is_file() and any(target.iterdir()):
            raise SALRError(f"{target} exists and is not a SALR checkpoint: refusing to overwrite it")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def read_salr_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise SALRError(f"{directory} is not a SALR checkpoint (no {CONFIG_NAME})") from err
    except json.JSONDecodeError as err:
        raise SALRError(f"{path} is corrupt ({err}): re-create the checkpoint with `salr compress`") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise SALRError(
            f"{path}: format version {meta.get('format_version')} is not supported (need {FORMAT_VERSION})"
        )
    return meta


def verify(directory: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Check every file listed in salr_config.json exists with the recorded sha256."""
    directory = Path(directory)
    for name, digest in meta["files"].items():
        path = directory / name
        if not path.is_file():
            raise SALRError(f"{path} is missing: the checkpoint is incomplete, re-create it")
        if _sha256(path) != digest:
            raise SALRError(f"{path} is corrupt (sha256 mismatch): re-create the checkpoint")


def load(directory: str | os.PathLike, verify_checksums: bool = True) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) from a SALR checkpoint, with the same logits as the model that was saved; also from a pair
    written by `salr export --to peft` (or a PEFT LoRA adapter directory), see salr.peft_adapter."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        from salr import peft_adapter  # lazy: it builds on this module's neighbours

        if peft_adapter.find_pair(directory) is not None:
            return peft_adapter.load_peft(directory)[:2]
    meta = read_salr_config(directory)
    if verify_checksums:
        verify(directory, meta)
    config = SALRConfig.from_dict(meta["salr"])
    hf_config = AutoConfig.from_pretrained(directory)
    # Parameters on the meta device (no allocation, no random init); buffers such as RoPE tables stay real.
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config)
    convert(model, config, init=False, progress=False)
    try:
        tensors = load_file(directory / WEIGHTS_NAME)
    except (SafetensorError, OSError) as err:
        raise SALRError(f"{directory / WEIGHTS_NAME} cannot be read ({err}): re-create the checkpoint") from err
    for prefix, holder, attr in base_slots(model):  # each base in the format its saved tensors have
        setattr(holder, attr, base_for_saved(getattr(holder, attr).shape, tensors, f"{prefix}."))
    for alias, source in meta.get("tied_tensors", {}).items():
        tensors[alias] = tensors[source]
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as err:
        raise SALRError(
            f"{directory}: saved tensors do not fit the model ({str(err)[:300]}): the checkpoint is corrupt"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise SALRError(
            f"{directory}: tensors do not match the model structure (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}): the checkpoint is corrupt or from another salr version"
        )
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    meta_left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta_left:
        raise SALRError(f"{directory}: no saved values for {meta_left[:5]}: the checkpoint is incomplete")
    mark_trainable(model)
    tokenizer = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer

"""Checks that keep a bad file from becoming a wrong model: finite weights, plain file names, sane config sizes,
checksums. Each raises SALRError with one line naming the file or tensor and what to do."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salr.errors import SALRError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Upper bounds on config.json sizes, far above any released model (Llama-3-405B: 126 layers, hidden 16384, FFN
# 53248; DeepSeek-V3: 256 experts). They stop a crafted config (e.g. a million layers) before anything is built.
CONFIG_LIMITS = {
    "num_hidden_layers": 2048,
    "n_layer": 2048,
    "num_layers": 2048,
    "hidden_size": 1 << 17,
    "n_embd": 1 << 17,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "vocab_size": 1 << 23,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 14,
    "num_local_experts": 1 << 14,
    "num_experts": 1 << 14,
    "n_routed_experts": 1 << 14,
    "n_shared_experts": 1 << 10,
    "num_experts_per_tok": 1 << 10,
    "kv_lora_rank": 1 << 16,
    "q_lora_rank": 1 << 16,
    "qk_rope_head_dim": 1 << 14,
    "qk_nope_head_dim": 1 << 14,
    "v_head_dim": 1 << 14,
    "max_position_embeddings": 1 << 26,
}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_plain_name(name: Any, where: str) -> str:
    """`name` must be a plain file name (no directory part, not hidden): files are opened inside the checkpoint."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or name != name.strip()
    ):
        raise SALRError(f"{where}: {name!r} is not a plain file name inside the checkpoint: the file is corrupt")
    return name


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse a model with any NaN or infinite weight, naming the first tensor that has one."""
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor is None or not tensor.is_floating_point() or tensor.is_meta or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), 1 << 24):  # bounded temporaries for large tensors
            if not bool(torch.isfinite(flat[start : start + (1 << 24)]).all()):
                raise SALRError(
                    f"{where}: tensor {name} has non-finite values (NaN or infinity): the weights are corrupt"
                )


def check_config_sizes(config: Any, where: str) -> None:
    """Refuse config.json values that are not positive integers within `CONFIG_LIMITS` (nested configs too)."""
    if not isinstance(config, dict):
        raise SALRError(f"{where}: expected a JSON object, got {type(config).__name__}")
    for key, value in config.items():
        if isinstance(value, dict):
            check_config_sizes(value, where)
            continue
        limit = CONFIG_LIMITS.get(key)
        if limit is None or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise SALRError(f"{where}: {key} must be an integer, got {value!r}")
        if not 0 < value <= limit and not (value == 0 and key.endswith(("_experts", "experts_per_tok"))):
            raise SALRError(f"{where}: {key} = {value} is not a plausible model size (must be in 1..{limit})")


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names -> dtype, shape, data_offsets; `__metadata__`)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SALRError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise SALRError(f"{path}: invalid safetensors header (length {n}, file {size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise SALRError(f"{path}: invalid safetensors header ({type(err).__name__})") from err
    except OSError as err:
        raise SALRError(f"{path} cannot be read ({err.strerror})") from err
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise SALRError(f"{path}: invalid safetensors header")
    return header


def header_numel(header: dict[str, Any]) -> int:
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise SALRError(f"invalid safetensors header: tensor {name!r} has shape {shape!r}")
        total += math.prod(shape)
    return total

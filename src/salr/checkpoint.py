"""SALR checkpoints: a directory with

    config.json             the base model's transformers config
    model.safetensors       every tensor: frozen sparse bases, A_cat / B_cat, and the untouched dense weights
    generation_config.json  when the model has one
    tokenizer files         whatever the tokenizer saves
    salr_config.json        format version, SALRConfig, base model spec, base format, tied tensors, and `files`:
                            the sha256 of every other file of the checkpoint (reports and train_state.pt included)

Integrity: `files` must list config.json and model.safetensors, names are plain file names, and loading reads only
listed files (verified copies), so a missing, truncated or flipped file is an error, never a different model. The
metadata of model.safetensors holds `salr_binding`, a sha256 over config.json, the model-defining entries of
salr_config.json and the tensor table of the safetensors header: an edit of any of them that keeps the checksums
consistent (ranks, LoRA scale, tied tensors, a renamed tensor) is refused too. Then the weights must be finite.

Saving writes into a temporary sibling directory (files fsynced) and renames it into place, so a crash never leaves
a half-written checkpoint (`save`); `save_into` writes a checkpoint into an existing directory file by file with
salr_config.json last, the training run's final save, which leaves everything else in the directory alone.
Loading builds the model skeleton without allocating weights, rebuilds the SALR structure, then assigns the saved
tensors.
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
from transformers import AutoModelForCausalLM, PreTrainedModel

from salr.attention import use_decode_attention
from salr.bases import BitmapBase, QBitmapBase, base_for_saved
from salr.bitmap_format import ideal_bitmap_nbytes
from salr.config import SALRConfig
from salr.convert import base_format, base_slots, convert, mark_trainable
from salr.errors import SALRError
from salr.hugepages import place_on_huge_pages
from salr.integrity import SHA256_RE, check_finite, check_plain_name, read_safetensors_header, sha256_file
from salr.io import (
    atomic_write_json,
    fsync_path,
    fsync_tree,
    make_temp_dir,
    read_json,
    refuse_foreign_entries,
    remove_stale_temps,
    swap_dir,
    umask,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
CONFIG_NAME = "salr_config.json"
WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
REQUIRED_FILES = (HF_CONFIG_NAME, WEIGHTS_NAME)
# Files a transformers loader would read from the directory: each must be covered by `files` when present.
LOADER_FILES = (
    HF_CONFIG_NAME, WEIGHTS_NAME, GENERATION_CONFIG_NAME, "tokenizer_config.json", "tokenizer.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
    "spiece.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
NOT_COPIED = (WEIGHTS_NAME, "train_state.pt")  # large and not read by `load`: hashed in place
BINDING_KEY = "salr_binding"
_BINDING_PLACEHOLDER = "salr-binding-placeholder-" + "0" * 39  # 64 characters, replaced in place after writing
_META_KEYS = {"format_version", "salr", "base_model", "base_format", "tied_tensors", "files"}


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


def binding(config_json: bytes, meta: dict[str, Any], header: dict[str, Any]) -> str:
    """sha256 tying model.safetensors to its config.json, the model-defining part of salr_config.json and its own
    tensor table (names, dtypes, shapes, offsets; not `__metadata__`)."""
    defining = {k: meta.get(k) for k in ("format_version", "salr", "base_format", "tied_tensors")}
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    blob = json.dumps(
        {"config.json": hashlib.sha256(config_json).hexdigest(), "salr_config": defining, "tensors": table},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_binding(weights: Path, value: str) -> None:
    """Replace the placeholder in the safetensors header with `value` (same length: the layout does not move)."""
    with weights.open("r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        at = header.find(_BINDING_PLACEHOLDER.encode())
        if at < 0 or len(value) != len(_BINDING_PLACEHOLDER):
            raise RuntimeError("safetensors header without the binding placeholder")
        f.seek(8 + at)
        f.write(value.encode())


def local_spec(spec: str | None) -> str | None:
    """A model spec that names a local path, made absolute: as typed it would name another model (or none) from
    another working directory, and './llama' and 'llama' are one model. Hub ids and names stay as given."""
    return os.path.abspath(spec) if spec and os.path.exists(spec) else spec


def write_checkpoint(
    model: PreTrainedModel,
    directory: Path,
    config: SALRConfig,
    tokenizer: Any = None,
    base_model: str | None = None,
    extra_files: dict[str, Any] | None = None,
    extra_bytes: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Write every file of a checkpoint into the existing empty `directory`, salr_config.json last; return its
    content. Not atomic by itself: `save` and `save_into` stage it in a temporary directory."""
    model.config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        try:
            generation.save_pretrained(directory)
        except ValueError as err:  # transformers refuses to save an inconsistent generation config
            logger.warning("generation config not saved (%s): the checkpoint loads with the defaults", err)
            (directory / GENERATION_CONFIG_NAME).unlink(missing_ok=True)
    tensors, aliases = _unique_state_dict(model)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "salr": config.to_dict(),
        "base_model": local_spec(base_model),
        "base_format": base_format(model),
        "tied_tensors": aliases,
    }
    weights = directory / WEIGHTS_NAME
    try:
        save_file(
            tensors,
            weights,
            metadata={"format": "pt", "salr_format_version": str(FORMAT_VERSION), BINDING_KEY: _BINDING_PLACEHOLDER},
        )
    except SafetensorError as err:  # safetensors reports a full disk or a file-size limit as its own error type
        if "I/O error" not in str(err):
            raise
        raise SALRError(f"cannot write {weights}: {str(err).split('I/O error:', 1)[1].strip()}") from err
    header = read_safetensors_header(weights)
    _write_binding(weights, binding((directory / HF_CONFIG_NAME).read_bytes(), meta, header))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for name, obj in (extra_files or {}).items():
        # A callable gets the directory first (e.g. a report that needs the size of the weights file).
        content = obj(directory) if callable(obj) else obj
        atomic_write_json(directory / check_plain_name(name, "extra file"), content)
    for name, data in (extra_bytes or {}).items():
        (directory / check_plain_name(name, "extra file")).write_bytes(data)
    meta["files"] = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}
    atomic_write_json(directory / CONFIG_NAME, meta)
    mode = 0o666 & ~umask()  # safetensors writes 0600: give every file what open() would under the umask
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, mode)
    return meta


def save(
    model: PreTrainedModel,
    directory: str | os.PathLike,
    config: SALRConfig,
    tokenizer: Any = None,
    base_model: str | None = None,
    extra_files: dict[str, Any] | None = None,
    extra_bytes: dict[str, bytes] | None = None,
) -> Path:
    """Write a SALR checkpoint of `model` (already converted with `config`) to `directory`, atomically and durably.

    `extra_files` maps file names to JSON-serialisable objects written beside the weights (e.g. the report), or to
    callables that get the staging directory and return one; `extra_bytes` maps file names to raw contents. All
    are covered by the checksums.
    """
    directory = Path(os.path.abspath(directory))
    check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory.parent, {directory.name})
    tmp = make_temp_dir(directory.parent, directory.name)
    try:
        write_checkpoint(model, tmp, config, tokenizer, base_model, extra_files, extra_bytes)
        fsync_tree(tmp)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved SALR checkpoint to %s", directory)
    return directory


def save_into(
    model: PreTrainedModel,
    directory: str | os.PathLike,
    config: SALRConfig,
    tokenizer: Any = None,
    base_model: str | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Make the existing `directory` a SALR checkpoint of `model` without touching its other entries.

    The files are staged in a temporary directory inside it; then the old salr_config.json is removed (the
    directory stops being a checkpoint), the files are renamed in one by one, salr_config.json last (the commit),
    and files of the previous checkpoint that the new one does not have are removed. A crash at any point leaves
    the other entries (a run's checkpoints/ and metrics.jsonl) as they were and no loadable mix of old and new.
    """
    directory = Path(directory)
    remove_stale_temps(directory, {"salr-final"})
    stage = make_temp_dir(directory, "salr-final")
    try:
        meta = write_checkpoint(model, stage, config, tokenizer, base_model, extra_files)
        fsync_tree(stage)
        old = _previous_files(directory)
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        fsync_path(directory)
        for name in meta["files"]:
            os.replace(stage / name, directory / name)
        fsync_path(directory)
        os.replace(stage / CONFIG_NAME, directory / CONFIG_NAME)
        fsync_path(directory)
        for name in old - set(meta["files"]):
            (directory / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    logger.info("saved SALR checkpoint to %s", directory)
    return directory


def _previous_files(directory: Path) -> set[str]:
    """Plain names listed by the checkpoint being replaced (nothing if there is none or it is unreadable)."""
    try:
        files = read_json(directory / CONFIG_NAME).get("files", {})
    except (SALRError, AttributeError):
        return set()
    names = set()
    for name in files if isinstance(files, dict) else ():
        try:
            names.add(check_plain_name(name, str(directory)))
        except SALRError:
            continue
    return names - {CONFIG_NAME}


def size_report(model: nn.Module, directory: str | os.PathLike) -> dict[str, int]:
    """Bytes of the saved weights vs the format's ideal and the dense bf16 model.

    checkpoint: the weights file on disk. ideal: the stored bases' payloads (bitmap: 1 bit per weight + the kept
    values; quantized bitmap: + codes + scales; row offsets and metadata excluded) plus every other tensor (adapters,
    dense bases, everything not pruned) at its own size. dense: every weight of the model dense in bf16, no adapters
    (what the same model saved in bf16 holds). base: the stored bases' tensors alone.
    """
    tensors, _ = _unique_state_dict(model)
    ideal = dense = base_bytes = 0
    base_prefixes = set()
    for prefix, holder, attr in base_slots(model):
        base = getattr(holder, attr)
        base_prefixes.add(f"{prefix}.")
        dense += 2 * base.shape[0] * base.shape[1]
        if isinstance(base, QBitmapBase):
            ideal += base.ideal_nbytes()
        elif isinstance(base, BitmapBase):
            ideal += ideal_bitmap_nbytes(base.shape, base.nnz, base.dtype)
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if any(name.startswith(p) for p in base_prefixes):
            base_bytes += nbytes
            if not isinstance(_base_of(model, name), BitmapBase | QBitmapBase):
                ideal += nbytes  # a dense base: stored as it is
            continue
        ideal += nbytes
        if not name.endswith(("A_cat", "B_cat")):
            dense += 2 * tensor.numel() if tensor.is_floating_point() else nbytes
    return {
        "checkpoint_bytes": (Path(directory) / WEIGHTS_NAME).stat().st_size,
        "ideal_bytes": ideal,
        "dense_bytes": dense,
        "base_bytes": base_bytes,
    }


def _base_of(model: nn.Module, tensor_name: str) -> nn.Module:
    return model.get_submodule(tensor_name.rsplit(".", 1)[0])


def prepare_output(output: str | os.PathLike) -> Path:
    """Before any work: `output` can be written and replaced by a checkpoint; what a killed save left beside it
    is removed. Returns the absolute path."""
    from salr.io import check_writable_dir

    path = check_writable_dir(output, "--output")
    check_replaceable(path)
    remove_stale_temps(path.parent, {path.name})
    return path


def check_replaceable(target: Path) -> None:
    """`target` may be created or replaced by a checkpoint: absent, empty, or a SALR checkpoint already that holds
    nothing but its own files (not a training run, whose checkpoints/ and metrics a new checkpoint would delete)."""
    if target.exists() and not target.is_dir():
        raise SALRError(f"{target} exists and is not a directory: refusing to overwrite it")
    if target.is_dir() and any(target.iterdir()):
        if not (target / CONFIG_NAME).is_file():
            raise SALRError(f"{target} exists and is not a SALR checkpoint: refusing to overwrite it")
        refuse_foreign_entries(target, _previous_files(target) | {CONFIG_NAME}, "SALR checkpoint")


def replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and removed only afterwards."""
    check_replaceable(target)
    swap_dir(new, target)


def read_salr_config(directory: str | os.PathLike) -> dict[str, Any]:
    """salr_config.json, checked for structure: a readable checkpoint of this format, or a one-line SALRError."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise SALRError(f"{directory} is not a SALR checkpoint (no {CONFIG_NAME})")
    meta = read_json(path)
    corrupt = f"{path} is corrupt"
    if not isinstance(meta, dict):
        raise SALRError(f"{corrupt}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SALRError(
            f"{path}: format version {meta.get('format_version')!r} is not supported (need {FORMAT_VERSION}): "
            "re-create the checkpoint with this salr"
        )
    missing = sorted(_META_KEYS - set(meta))
    if missing:
        raise SALRError(f"{corrupt}: no {', '.join(missing)}")
    for key, kind in (("salr", dict), ("files", dict), ("tied_tensors", dict), ("base_format", str)):
        if not isinstance(meta[key], kind):
            raise SALRError(f"{corrupt}: {key} must be a JSON {kind.__name__}")
    for name, digest in meta["files"].items():
        check_plain_name(name, str(path))
        if name == CONFIG_NAME or not isinstance(digest, str) or not SHA256_RE.match(digest):
            raise SALRError(f"{corrupt}: files[{name!r}] is not a sha256 of another file")
    missing = [name for name in REQUIRED_FILES if name not in meta["files"]]
    if missing:
        raise SALRError(f"{corrupt}: files does not list {', '.join(missing)} (every checkpoint has them)")
    for alias, source in meta["tied_tensors"].items():
        if not isinstance(alias, str) or not isinstance(source, str):
            raise SALRError(f"{corrupt}: tied_tensors must map tensor names to tensor names")
    return meta


def verify(directory: str | os.PathLike, meta: dict[str, Any], copy_to: Path | None = None) -> None:
    """Check every file listed in salr_config.json exists with the recorded sha256, and that every file a loader
    would read is listed. With `copy_to`, small files are copied there while hashed (loading then reads the copies,
    so what is read is what was verified)."""
    directory = Path(directory)
    unlisted = [n for n in LOADER_FILES if n not in meta["files"] and (directory / n).exists()]
    if unlisted:
        raise SALRError(
            f"{directory / unlisted[0]} is not covered by the checksums in {CONFIG_NAME}: the checkpoint was "
            "modified, re-create it"
        )
    for name, digest in meta["files"].items():
        path = directory / name
        if not path.is_file():
            raise SALRError(f"{path} is missing: the checkpoint is incomplete, re-create it")
        copy = copy_to / name if copy_to is not None and name not in NOT_COPIED else None
        if _hash_file(path, copy) != digest:
            raise SALRError(f"{path} is corrupt (sha256 mismatch): re-create the checkpoint")


def _hash_file(path: Path, copy: Path | None = None) -> str:
    """sha256 of `path`, reading no more than the size it reports (a special file cannot make it read forever);
    with `copy`, the bytes read are also written there."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f, copy.open("wb") if copy is not None else _NoFile() as out:
        left = size + 1
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                break
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    if left <= 0:
        raise SALRError(f"{path} is larger than its reported size (not a regular file?): refusing to read it")
    return digest.hexdigest()


class _NoFile:
    def __enter__(self) -> _NoFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, data: bytes) -> None:
        return None


def _copy_listed(directory: Path, meta: dict[str, Any], copy_to: Path) -> None:
    for name in meta["files"]:
        if name not in NOT_COPIED:
            path = directory / name
            if not path.is_file():
                raise SALRError(f"{path} is missing: the checkpoint is incomplete, re-create it")
            _hash_file(path, copy_to / name)


def _hf_config(directory: Path, where: Path) -> Any:
    from salr.loaders.hf import config_from_dir  # local import: loaders imports this module

    return config_from_dir(directory, where)


def load(
    directory: str | os.PathLike, verify_checksums: bool = True, huge_pages: bool = True
) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) from a SALR checkpoint, with the same logits as the model that was saved; also from a pair
    written by `salr export --to peft` (or a PEFT LoRA adapter directory), see salr.peft_adapter. With `huge_pages`
    the model's tensors are moved onto transparent huge pages where the system offers them (salr.hugepages: faster
    decoding on the CPU); pass False when the model goes to a GPU or is only rewritten."""
    model, tokenizer = _load(Path(directory), verify_checksums)
    if huge_pages:
        place_on_huge_pages(model)
    use_decode_attention(model)  # one-token decode steps on the CPU without torch's slow bf16 SDPA kernel
    return model, tokenizer


def _load(directory: Path, verify_checksums: bool) -> tuple[PreTrainedModel, Any]:
    if not (directory / CONFIG_NAME).is_file():
        from salr import peft_adapter  # lazy: it builds on this module's neighbours

        if peft_adapter.find_pair(directory) is not None:
            return peft_adapter.load_peft(directory)[:2]
    meta = read_salr_config(directory)
    weights = directory / WEIGHTS_NAME
    with tempfile.TemporaryDirectory(prefix="salr-load-") as tmp:
        copies = Path(tmp)
        if verify_checksums:
            verify(directory, meta, copy_to=copies)
        else:
            _copy_listed(directory, meta, copies)
        header = read_safetensors_header(weights)
        saved_binding = (header.get("__metadata__") or {}).get(BINDING_KEY)
        if saved_binding != binding((copies / HF_CONFIG_NAME).read_bytes(), meta, header):
            raise SALRError(
                f"{directory}: {CONFIG_NAME} or {HF_CONFIG_NAME} does not belong to {WEIGHTS_NAME} (edited after "
                "saving): re-create the checkpoint"
            )
        hf_config = _hf_config(copies, directory / HF_CONFIG_NAME)
        model = _build(directory, meta, hf_config, weights)
        tokenizer = _tokenizer(copies, directory) if "tokenizer_config.json" in meta["files"] else None
        if GENERATION_CONFIG_NAME in meta["files"] and model.can_generate():
            model.generation_config = _generation_config(copies, directory)
    return model.eval(), tokenizer


def _build(directory: Path, meta: dict[str, Any], hf_config: Any, weights: Path) -> PreTrainedModel:
    config = SALRConfig.from_dict(meta["salr"])
    try:
        # Parameters on the meta device (no allocation, no random init); buffers such as RoPE tables stay real.
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise SALRError(f"{directory / HF_CONFIG_NAME}: transformers cannot build this model ({err})") from err
    convert(model, config, init=False, progress=False)
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise SALRError(f"{weights} cannot be read ({err}): re-create the checkpoint") from err
    for prefix, holder, attr in base_slots(model):  # each base in the format its saved tensors have
        setattr(holder, attr, base_for_saved(getattr(holder, attr).shape, tensors, f"{prefix}."))
    for alias, source in meta["tied_tensors"].items():
        if source not in tensors:
            raise SALRError(f"{directory}: tied tensor {alias} refers to {source}, which is not saved: corrupt")
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
    check_finite(model, str(directory))
    mark_trainable(model)
    return model


def _tokenizer(copies: Path, directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(copies)
    except Exception as err:  # noqa: BLE001 - a verified but unusable tokenizer is a bad checkpoint for the user
        raise SALRError(f"{directory}: the tokenizer files cannot be loaded ({type(err).__name__}: {err})") from err


def _generation_config(copies: Path, directory: Path) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(copies)
    except Exception as err:  # noqa: BLE001 - as for the tokenizer
        raise SALRError(f"{directory / GENERATION_CONFIG_NAME} cannot be loaded ({type(err).__name__})") from err

"""What a run keeps between processes and restarts: torchrun's environment, RNG state, the run's arguments
(`run.json`), periodic checkpoints (`DIR/checkpoints/step-N/`: a SALR checkpoint whose files include
`train_state.pt`), the metrics log and the final save.

Promises (docs/reliability.md): every file is written under a temporary name, fsynced and renamed;
`checkpoints/latest.json` (with the sha256 of train_state.pt) moves only once a checkpoint is complete; the final
save writes the checkpoint's files into DIR itself and never moves or removes checkpoints/ or metrics.jsonl, so a
crash at any moment leaves a run that `--resume` continues; a resume checks its arguments against run.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from salr.checkpoint import CONFIG_NAME, local_spec, read_salr_config, save, save_into
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.integrity import SHA256_RE
from salr.io import atomic_write_bytes, atomic_write_json, fsync_path, json_dumps, read_json, remove_stale_temps

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
REPORT_NAME = "train_report.json"
STATE_NAME = "train_state.pt"
RUN_NAME = "run.json"
CHECKPOINTS = "checkpoints"
LATEST_NAME = "latest.json"
RUN_FORMAT_VERSION = 1
STEP_RE = re.compile(r"^step-\d{7}$")
# Arguments a resume may change: they do not change the steps already taken (the schedule is recomputed for a new
# total). Everything else must match the run being resumed.
SAFE_TRAIN_ARGS = ("max_steps", "epochs", "save_every", "log_every", "eval_every")
_FLAGS = {"r": "--lora-rank"}


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def trains_on_cpu() -> bool:
    """Whether a run keeps its model on the CPU: init_distributed picks a CUDA device whenever there is one."""
    return not torch.cuda.is_available()


def init_distributed() -> Dist:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; start the process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = not trains_on_cpu()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, local_rank, world, device)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- periodic checkpoints


def read_latest(output: str | os.PathLike) -> dict[str, Any] | None:
    """checkpoints/latest.json, validated; None when there is none."""
    pointer = Path(output) / CHECKPOINTS / LATEST_NAME
    if not pointer.exists():
        return None
    latest = read_json(pointer)
    bad = f"{pointer} is corrupt"
    if not isinstance(latest, dict):
        raise SALRError(f"{bad}: expected a JSON object; delete {pointer.parent} to start the run over")
    name, step, digest = latest.get("dir"), latest.get("step"), latest.get("train_state_sha256")
    if not isinstance(name, str) or not STEP_RE.match(name) or isinstance(step, bool) or not isinstance(step, int):
        raise SALRError(f"{bad}: no valid dir / step; delete {pointer.parent} to start the run over")
    if int(name[len("step-") :]) != step or step < 1:
        raise SALRError(f"{bad}: dir {name} and step {step} disagree; delete {pointer.parent} to start the run over")
    if not isinstance(digest, str) or not SHA256_RE.match(digest):
        raise SALRError(f"{bad}: no train_state_sha256; delete {pointer.parent} to start the run over")
    return latest


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under output/checkpoints (named by latest.json, written last)."""
    latest = read_latest(output)
    if latest is None:
        return None
    path = Path(output) / CHECKPOINTS / latest["dir"]
    if not (path / CONFIG_NAME).is_file() or not (path / STATE_NAME).is_file():
        raise SALRError(
            f"{path} (named by {LATEST_NAME}) is missing or incomplete: delete {path.parent} to start over"
        )
    return path


def save_checkpoint(
    output: Path, step: int, model: nn.Module, config: SALRConfig, tokenizer: Any, base_model: str, state: dict
) -> Path:
    """output/checkpoints/step-N: a SALR checkpoint with train_state.pt inside, then latest.json; older ones removed.

    The checkpoint is staged and renamed whole (salr.checkpoint.save) and latest.json moves only afterwards, so a
    crash at any point leaves the previous checkpoint as the latest complete one.
    """
    root = output / CHECKPOINTS
    path = root / f"step-{step:07d}"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    save(model, path, config, tokenizer=tokenizer, base_model=base_model, extra_bytes={STATE_NAME: data})
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_json(root / LATEST_NAME, {"dir": path.name, "step": step, "train_state_sha256": digest})
    for old in root.glob("step-*"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_train_state(path: Path) -> dict[str, Any]:
    """train_state.pt of checkpoint `path`, after checking its sha256 (the checkpoint's `files` and latest.json)."""
    state_path = path / STATE_NAME
    expected = {read_salr_config(path)["files"].get(STATE_NAME)}
    latest = read_latest(path.parent)
    if latest is not None and latest["dir"] == path.name:
        expected.add(latest["train_state_sha256"])
    try:
        data = state_path.read_bytes()
    except OSError as err:
        raise SALRError(f"{state_path} cannot be read ({err.strerror}): delete {path.parent} and start over") from err
    if expected != {hashlib.sha256(data).hexdigest()}:
        raise SALRError(f"{state_path} is corrupt (sha256 mismatch): delete {path.parent} and start over")
    try:
        state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable state file is a corrupt checkpoint for the user
        raise SALRError(f"{state_path} cannot be read ({err}): delete {path.parent} and start over") from err
    needed = {"step", "optimizer", "scheduler", "rng", "residual_lr_scales"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise SALRError(f"{state_path} is not a salr training state: delete {path.parent} and start over")
    return state


# ----------------------------------------------------------------------------- the run directory


def run_record(
    run_info: dict[str, Any] | None, base_model: str, config: SALRConfig, cfg: Any, examples_sha256: str | None
) -> dict[str, Any]:
    """What run.json stores: the arguments that define the run (`run_info` adds method, dtype, data, eval)."""
    train_config = {k: v for k, v in vars(cfg).items() if k != "progress"}
    record = {"model": local_spec(base_model), "salr_config": config.to_dict(), "train_config": train_config}
    if examples_sha256 is not None:
        record["examples_sha256"] = examples_sha256
    return {**(run_info or {}), **record}


def examples_digest(examples: list[dict[str, list[int]]]) -> str:
    """sha256 of the tokenised examples: the data, limit, max_length and tokenizer in one value."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex["input_ids"], ex["labels"]], separators=(",", ":")).encode())
    return digest.hexdigest()


def read_run(output: Path) -> dict[str, Any] | None:
    path = output / RUN_NAME
    if not path.exists():
        return None
    run = read_json(path)
    if (
        not isinstance(run, dict)
        or run.get("format_version") != RUN_FORMAT_VERSION
        or not isinstance(run.get("run_id"), str)
    ):
        raise SALRError(f"{path} is corrupt: delete {output} to start the run over")
    return run


def _flag(section: str, name: str) -> str:
    if section == "data":
        return {"sha256": "--data (contents)", "path": "--data", "limit": "--limit"}.get(name, f"--data {name}")
    if section == "eval":
        return {"sha256": "--eval-data (contents)", "path": "--eval-data", "limit": "--eval-limit"}.get(name, name)
    if section == "examples_sha256":
        return "the tokenised training examples"
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


def compare_run(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Refuse (SALRError, one line naming them) arguments that differ from the stored run's; return notes on the
    safe ones that changed. Keys absent from `current` are not compared."""
    differ: dict[str, str] = {}
    safe: dict[str, str] = {}
    for key, now in current.items():
        if key in ("run_id", "format_version") or key not in stored:
            continue
        was = stored[key]
        if key == "model":  # runs recorded before local paths were made absolute
            was = local_spec(was)
        if isinstance(now, dict) and isinstance(was, dict):
            pairs = [(key, name, was.get(name), now.get(name)) for name in sorted(set(was) | set(now))]
        else:
            pairs = [(key, key, was, now)]
        for section, name, old, new in pairs:
            if old == new or (
                isinstance(old, float | int) and isinstance(new, float | int) and float(old) == float(new)
            ):
                continue
            flag = _flag(section, name)
            text = f"{flag} {_show(new)} (run: {_show(old)})"
            if section == "eval" or (section == "train_config" and name in SAFE_TRAIN_ARGS) or name == "path":
                safe[flag] = text
            else:
                differ[flag] = text
    if differ:
        shown = list(differ.values())
        if len(shown) > 1 and "the tokenised training examples" in differ:
            shown = [t for f, t in differ.items() if f != "the tokenised training examples"]
        raise SALRError(
            f"--resume: {', '.join(shown)} differ from the run being resumed: pass the run's arguments, or start a "
            "new run in another --output"
        )
    return [f"--resume: {t}: accepted" for t in safe.values()]


def finished_report(output: Path, run: dict[str, Any] | None) -> dict[str, Any] | None:
    """The final report when `output` holds the completed final save of `run`, else None."""
    if run is None or not (output / CONFIG_NAME).is_file() or not (output / REPORT_NAME).is_file():
        return None
    try:
        read_salr_config(output)
        report = read_json(output / REPORT_NAME)
    except SALRError:
        return None
    return report if isinstance(report, dict) and report.get("run_id") == run["run_id"] else None


def prepare_resume(output: Path, keep: Path | None = None) -> None:
    """Remove what killed processes left in the run directory: temporary files and directories, checkpoints that
    latest.json does not name (older ones, or one renamed into place just before a kill); never `keep`."""
    remove_stale_temps(output)
    root = output / CHECKPOINTS
    remove_stale_temps(root)
    latest = read_latest(output)
    for old in root.glob("step-*") if root.is_dir() else ():
        if (latest is None or old.name != latest["dir"]) and (keep is None or old.resolve() != keep.resolve()):
            shutil.rmtree(old, ignore_errors=True)


def check_fresh_output(output: Path) -> None:
    """Refuse, before any work, an output a new run must not take over: a file, a directory of someone else's
    files, or an unfinished run that `--resume` would continue."""
    if output.exists() and not output.is_dir():
        raise SALRError(f"output {output} is a file: pass a directory")
    if not output.is_dir():
        return
    run = read_run(output) if (output / RUN_NAME).exists() else None
    if not (output / CONFIG_NAME).is_file() and run is None:
        own = (CHECKPOINTS, METRICS_NAME, RUN_NAME)
        foreign = sorted(p.name for p in output.iterdir() if p.name not in own and not p.name.startswith("."))
        if foreign:
            raise SALRError(
                f"output {output} already holds {foreign[:3]} and is not a salr run: choose a new or empty directory"
            )
    if (output / CHECKPOINTS / LATEST_NAME).exists() and finished_report(output, run) is None:
        latest = read_latest(output)
        raise SALRError(
            f"output {output} holds an unfinished run (checkpoint at step {latest['step']}): pass --resume to "
            "continue it, or choose another --output to start a new run"
        )


def start_fresh(output: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Take `output` for a new run: check it, remove the previous run's checkpoints and log (its final model stays
    until the new one replaces it), write run.json. Returns the record with its new run_id."""
    check_fresh_output(output)
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output)
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    (output / METRICS_NAME).unlink(missing_ok=True)
    record = {"format_version": RUN_FORMAT_VERSION, "run_id": uuid.uuid4().hex, **record}
    atomic_write_json(output / RUN_NAME, record)
    return record


def save_final(output: Path, model: nn.Module, config: SALRConfig, tokenizer: Any, base_model: str, report: dict):
    """Make `output` itself a SALR checkpoint (loadable by salr.load / `salr eval --model output`), in place:
    checkpoints/, metrics.jsonl and run.json are never moved (salr.checkpoint.save_into)."""
    save_into(model, output, config, tokenizer=tokenizer, base_model=base_model, extra_files={REPORT_NAME: report})


# ----------------------------------------------------------------------------- metrics log


def clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """Non-finite numbers become null: the log stays strict JSON (a diverged loss is refused before it is logged)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json_dumps(clean_row(row)) + "\n")


def sync_metrics(path: Path) -> None:
    if path.is_file():
        fsync_path(path)


def rewrite_metrics(path: Path, keep_until_step: int) -> list[dict[str, Any]]:
    """On resume, drop metric lines past the checkpoint (they will be logged again) and a line cut by a kill;
    returns the rows kept (the history of the earlier segments)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # the last line, cut by a kill mid-write
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= keep_until_step:
            rows.append(row)
    atomic_write_bytes(path, "".join(json_dumps(r) + "\n" for r in rows).encode())
    return rows

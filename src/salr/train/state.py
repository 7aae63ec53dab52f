"""What a run keeps between processes and restarts: torchrun's environment, RNG state, periodic checkpoints
(`DIR/checkpoints/step-N/`: a SALR checkpoint plus `train_state.pt`), the final save and the metrics log.

Every file is written to a temporary name and renamed, and `latest.json` moves only once a checkpoint is complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from salr.checkpoint import CONFIG_NAME, replace_dir, save
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.io import atomic_write_bytes, atomic_write_json

METRICS_NAME = "metrics.jsonl"
REPORT_NAME = "train_report.json"
STATE_NAME = "train_state.pt"
CHECKPOINTS = "checkpoints"


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; start the process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
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


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under output/checkpoints (named by latest.json, written last)."""
    pointer = Path(output) / CHECKPOINTS / "latest.json"
    if not pointer.is_file():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["dir"]
    return path if (path / STATE_NAME).is_file() else None


def save_checkpoint(
    output: Path, step: int, model: nn.Module, config: SALRConfig, tokenizer: Any, base_model: str, state: dict
) -> Path:
    """output/checkpoints/step-N: SALR checkpoint + train_state.pt, then latest.json; older ones removed.

    Each piece is written to a temporary name and renamed, and latest.json moves only once both exist, so a
    crash at any point leaves the previous checkpoint as the latest complete one.
    """
    root = output / CHECKPOINTS
    path = root / f"step-{step:07d}"
    save(model, path, config, tokenizer=tokenizer, base_model=base_model)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path / STATE_NAME, buffer.getvalue())
    atomic_write_json(root / "latest.json", {"dir": path.name, "step": step})
    for old in root.glob("step-*"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_train_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_NAME, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable state file is a corrupt checkpoint for the user
        raise SALRError(f"{path / STATE_NAME} cannot be read ({err}): delete {path.parent} and start over") from err


def check_output_dir(output: Path) -> None:
    """Fail before training, not after it, when `output` holds something other than a salr run (the final save
    replaces the directory and will not delete files it did not write)."""
    if output.exists() and not output.is_dir():
        raise SALRError(f"output {output} is a file: pass a directory")
    if output.is_dir() and not (output / CONFIG_NAME).is_file():
        foreign = sorted(p.name for p in output.iterdir() if p.name not in (CHECKPOINTS, METRICS_NAME))
        if foreign:
            raise SALRError(
                f"output {output} already holds {foreign[:3]} and is not a salr run: choose a new or empty directory"
            )


def save_final(output: Path, model: nn.Module, config: SALRConfig, tokenizer: Any, base_model: str, report: dict):
    """Make `output` itself a SALR checkpoint (loadable by salr.load / `salr eval --model output`).

    salr.save replaces a whole directory, so the final model is saved into a staging directory, the run's
    checkpoints/ and metrics.jsonl are moved in, and the staging directory is renamed over `output`.
    """
    staging = output.with_name(f".{output.name}.final-{os.getpid()}")
    save(model, staging, config, tokenizer=tokenizer, base_model=base_model, extra_files={REPORT_NAME: report})
    for name in (CHECKPOINTS, METRICS_NAME):
        if (output / name).exists():
            os.replace(output / name, staging / name)
    replace_dir(staging, output)  # refuses to replace a directory that holds anything but a SALR run


def rewrite_metrics(path: Path, keep_until_step: int) -> None:
    """On resume, drop metric lines past the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= keep_until_step]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())

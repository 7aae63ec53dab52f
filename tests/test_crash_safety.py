"""`salr train` killed with SIGKILL at random moments, mid-save included, then resumed, ends bit-identical to a run
that was never interrupted, with no temporary file left (issue 12).

Each process is `salr.cli.main(["train", ...])` in a child of a multiprocessing forkserver that has imported salr
already (starting a fresh interpreter costs ~10 s on the shared CI machine). A child is killed either by the test
after a random delay, or by itself just before its k-th file-system operation (a rename, fsync, unlink or rmdir:
the moments inside a checkpoint or the final save), k drawn at random over the operations the run has left.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import salr
from salr import data
from salr.train.state import latest_checkpoint

STEPS, SAVE_EVERY = 10, 2
FS_OPS = ("replace", "fsync", "unlink", "rmdir")


def _argv(stories: str, data_path: str, out: str, resume: bool) -> list[str]:
    return [
        "train", "--model", stories, "--data", data_path, "--output", out, "--residual-rank", "4",
        "--lora-rank", "4", "--batch-size", "4", "--max-length", "160", "--lr", "3e-3", "--max-steps", str(STEPS),
        "--save-every", str(SAVE_EVERY), "--no-progress", *(["--resume"] if resume else []),
    ]  # fmt: skip


def _child(argv: list[str], kill_at: int | None, ops_log: str) -> None:
    """Run `salr train`; count file-system operations into `ops_log`; SIGKILL ourselves before operation `kill_at`."""
    import logging

    torch.set_num_threads(1)  # the same arithmetic in every process
    logging.disable(logging.WARNING)
    count = 0
    log = open(ops_log, "a")  # noqa: SIM115 - open for the life of the process

    def wrap(name):
        real = getattr(os, name)

        def op(*args, **kwargs):
            nonlocal count
            count += 1
            log.write(f"{count} {time.monotonic():.4f} {name} {args[0] if args else ''}\n")
            log.flush()
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(os, name, op)

    for name in FS_OPS:
        wrap(name)
    from salr.cli import main

    code = main(argv)
    log.close()
    sys.exit(code)


def _run(ctx, argv, kill_at=None, kill_after=None, ops_log="/dev/null") -> int:
    """Exit code of one `salr train` child (-SIGKILL when killed). `kill_after`: seconds after its first file
    operation (the run has started: model loaded, data read)."""
    proc = ctx.Process(target=_child, args=(argv, kill_at, ops_log))
    proc.start()
    if kill_after is not None:
        deadline = time.monotonic() + 120
        while proc.is_alive() and time.monotonic() < deadline and not Path(ops_log).stat().st_size:
            time.sleep(0.01)
        proc.join(timeout=kill_after)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    return proc.exitcode


def _leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.startswith("."))


@pytest.fixture(scope="module")
def ctx():
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["salr.cli", "salr.train", "salr.checkpoint", "salr.loaders"])
    return context


def test_sigkill_at_random_moments_then_resume_is_bit_identical(ctx, stories_path, tmp_path):
    data_path = tmp_path / "train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_arithmetic(48, seed=7)))
    stories = str(stories_path)

    reference, ops_log = tmp_path / "reference", tmp_path / "reference.ops"
    assert _run(ctx, _argv(stories, str(data_path), str(reference), False), ops_log=str(ops_log)) == 0
    ops = ops_log.read_text().splitlines()
    total_ops, span = len(ops), float(ops[-1].split()[1]) - float(ops[0].split()[1])
    assert total_ops > 50  # every checkpoint and the final save count dozens of operations

    run, rng = tmp_path / "run", random.Random(12)
    kills, mid_save = [], 0
    for attempt in range(12):
        latest = latest_checkpoint(run) if (run / "checkpoints").exists() else None
        resume = latest is not None
        done = int(latest.name.split("-")[1]) if resume else 0
        left = max(4, int(0.8 * total_ops * (STEPS - done) / STEPS))
        log = tmp_path / f"attempt{attempt}.ops"
        log.touch()
        if attempt in (2, 6):  # killed by the clock, wherever it is
            delay = rng.uniform(0.0, 0.6) * span * (STEPS - done) / STEPS
            code = _run(ctx, _argv(stories, str(data_path), str(run), resume), kill_after=delay, ops_log=str(log))
        else:  # killed right before its k-th file operation
            kill_at = rng.randint(1, left)
            code = _run(ctx, _argv(stories, str(data_path), str(run), resume), kill_at=kill_at, ops_log=str(log))
        mid_save += code == -signal.SIGKILL and bool(_leftovers(run))  # killed inside a save: its temporaries
        if code == 0:
            break
        assert code == -signal.SIGKILL, f"attempt {attempt} exited with {code}"
        kills.append(attempt)
    print(f"killed {len(kills)} times, {mid_save} inside a save")
    assert len(kills) >= 6 and mid_save >= 2, (kills, mid_save)
    latest = latest_checkpoint(run) if (run / "checkpoints").exists() else None
    final = _run(ctx, _argv(stories, str(data_path), str(run), latest is not None))
    assert final == 0

    # the same model, bit for bit, and the same losses
    a, _ = salr.load(reference)
    b, _ = salr.load(run)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    ra, rb = (json.loads((d / "train_report.json").read_text()) for d in (reference, run))
    assert [h["loss"] for h in rb["history"]] == [h["loss"] for h in ra["history"]]
    assert [h["step"] for h in rb["history"]] == list(range(1, STEPS + 1))
    assert rb["tokens"] == ra["tokens"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == [h["loss"] for h in ra["history"]]
    # nothing left behind: no temporary files, only the last checkpoint
    assert _leftovers(run) == []
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", f"step-{STEPS:07d}"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

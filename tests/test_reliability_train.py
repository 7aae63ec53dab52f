"""Training runs (issue 12): the final save never takes the periodic checkpoints away, a resume checks its
arguments, a finished run is a no-op, the report covers the whole run, train_state.pt is hashed, killed processes'
leftovers are removed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import salr
from salr import data
from salr.cli import main
from salr.train import state as run_state

STEPS = 6


@pytest.fixture
def gsm8k(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_arithmetic(40, seed=5)))
    return path


def train_argv(stories_path, data_path, out, *extra) -> list[str]:
    return [
        "train", "--model", str(stories_path), "--data", str(data_path), "--output", str(out),
        "--residual-rank", "4", "--lora-rank", "4", "--batch-size", "4", "--max-length", "160", "--lr", "3e-3",
        "--max-steps", str(STEPS), "--save-every", "2", "--no-progress", *extra,
    ]  # fmt: skip


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def temp_leftovers(path: Path) -> list[str]:
    return [str(p) for p in path.rglob(".*")]


# ----------------------------------------------------------------------------- item 2


def test_final_save_keeps_checkpoints_when_the_run_directory_gains_a_file(stories_path, gsm8k, tmp_path, monkeypatch):
    out = tmp_path / "R"
    original = run_state.save_checkpoint

    def save_and_touch(output, step, *args, **kwargs):  # the user drops a file in while the run is going
        path = original(output, step, *args, **kwargs)
        (output / "notes.txt").write_text("mine")
        return path

    monkeypatch.setattr(run_state, "save_checkpoint", save_and_touch)
    assert main(train_argv(stories_path, gsm8k, out)) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert run_state.latest_checkpoint(out).name == f"step-{STEPS:07d}"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == STEPS
    salr.load(out)  # the run directory is the final checkpoint
    assert temp_leftovers(out) == []
    mask = salr.io.umask()  # and everything in it is shared like any other file (item 12)
    modes = {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file() and p.name != "notes.txt"}
    assert modes == {0o666 & ~mask}
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_dir()} == {0o777 & ~mask}


def test_a_crash_inside_the_final_save_leaves_a_resumable_run(stories_path, gsm8k, tmp_path, monkeypatch, capsys):
    from salr import checkpoint

    out = tmp_path / "R"
    replace = os.replace
    calls = {"n": 0}

    def crash_on_third_rename(a, b):  # inside save_into: after the old salr_config.json went, mid-way through files
        if Path(b).parent == out and Path(a).parent.name.startswith(".salr-final."):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return replace(a, b)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_third_rename)
    assert main(train_argv(stories_path, gsm8k, out)) == 130  # Ctrl-C: one line, exit 130
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    assert run_state.latest_checkpoint(out).name == f"step-{STEPS:07d}"  # checkpoints/ was never moved
    assert not (out / "salr_config.json").exists()
    with pytest.raises(salr.SALRError, match="without its salr_config.json"):
        salr.load_model(str(out))
    assert main(train_argv(stories_path, gsm8k, out, "--resume")) == 0
    report = json.loads((out / "train_report.json").read_text())
    assert [h["step"] for h in report["history"]] == list(range(1, STEPS + 1))
    salr.load(out)
    assert temp_leftovers(out) == []


# ----------------------------------------------------------------------------- items 3, 4, 5, 11


def test_resume_of_a_finished_run_is_a_no_op(stories_path, gsm8k, tmp_path, capsys):
    out = tmp_path / "R"
    assert main(train_argv(stories_path, gsm8k, out)) == 0
    before = tree(out)
    capsys.readouterr()
    assert main(train_argv(stories_path, gsm8k, out, "--resume")) == 0
    captured = capsys.readouterr()
    assert "already finished (6 steps); nothing to do" in captured.out and "Traceback" not in captured.err
    assert tree(out) == before  # nothing rewritten, the report keeps its whole history


def test_a_local_model_is_one_model_however_its_path_is_written(stories_path, gsm8k, tmp_path, capsys, monkeypatch):
    """A run started with --model stories260K.bin resumes with ./stories260K.bin (it was refused as another model)."""
    monkeypatch.chdir(stories_path.parent)
    out = tmp_path / "R"
    argv = train_argv(stories_path.name, gsm8k, out)
    assert main([*argv[:-1], "--max-steps", "2", "--no-progress"]) == 0
    assert json.loads((out / "run.json").read_text())["model"] == str(Path.cwd() / stories_path.name)  # absolute
    capsys.readouterr()
    assert main(train_argv(f"./{stories_path.name}", gsm8k, out, "--resume")) == 0
    assert "differ from the run being resumed" not in capsys.readouterr().err


def test_resume_refuses_different_arguments_and_accepts_safe_ones(stories_path, gsm8k, tmp_path, capsys, caplog):
    out = tmp_path / "R"
    argv = train_argv(stories_path, gsm8k, out)
    argv[argv.index("--max-steps") + 1] = "4"
    assert main(argv) == 0  # a finished run of 4 steps, to be extended
    capsys.readouterr()
    other = gsm8k.with_name("other.jsonl")
    other.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_arithmetic(40, seed=6)))
    refused = {
        ("--lr", "1e-3"): "--lr 0.001 (run: 0.003)",
        ("--batch-size", "8"): "--batch-size 8 (run: 4)",
        ("--lora-rank", "8"): "--lora-rank 8 (run: 4)",
        ("--sparsity", "0.7"): "--sparsity 0.7 (run: 0.5)",
        ("--data", str(other)): "--data (contents)",
        ("--method", "lora"): "--method lora (run: salr)",
    }
    for (name, value), message in refused.items():
        changed = train_argv(stories_path, gsm8k, out, "--resume")
        if name in changed:
            changed[changed.index(name) + 1] = value
        else:
            changed += [name, value]
        assert main(changed) == 2, name
        err = capsys.readouterr().err
        assert message in err and "differ from the run being resumed" in err and len(err.splitlines()) == 1, err
    assert main(train_argv(stories_path, gsm8k, out, "--resume")) == 0  # --max-steps 6 (run: 4): accepted
    assert "--max-steps 6 (run: 4): accepted" in caplog.text
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == STEPS and [h["step"] for h in report["history"]] == list(range(1, STEPS + 1))


def test_report_covers_the_whole_run_after_a_resume(stories_path, gsm8k, tmp_path, monkeypatch, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(train_argv(stories_path, gsm8k, full)) == 0
    original = run_state.save_checkpoint

    def stop_after_step_4(output, step, *args, **kwargs):
        path = original(output, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(run_state, "save_checkpoint", stop_after_step_4)
    capsys.readouterr()
    assert main(train_argv(stories_path, gsm8k, cut)) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("salr train: interrupted;") and "Traceback" not in err
    monkeypatch.setattr(run_state, "save_checkpoint", original)
    assert main(train_argv(stories_path, gsm8k, cut, "--resume")) == 0
    a, b = (json.loads((d / "train_report.json").read_text()) for d in (full, cut))
    assert b["resumed_from_step"] == 4 and b["tokens"] == a["tokens"] and b["final_loss"] == a["final_loss"]
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"]]
    assert b["seconds"] > b["history"][3]["seconds"]  # time of both segments


def test_resume_checks_train_state_and_latest_json(stories_path, gsm8k, tmp_path, capsys):
    out = tmp_path / "R"
    assert main(train_argv(stories_path, gsm8k, out, "--max-steps", "4")) == 0
    os.remove(out / "salr_config.json")
    state = run_state.latest_checkpoint(out) / run_state.STATE_NAME
    good = state.read_bytes()
    state.write_bytes(good[:-40] + bytes(40))
    capsys.readouterr()
    assert main(train_argv(stories_path, gsm8k, out, "--max-steps", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and len(err.splitlines()) == 1
    state.write_bytes(good)
    (out / "checkpoints" / "latest.json").write_text('{"dir": "../../etc", "step": 1}')
    assert main(train_argv(stories_path, gsm8k, out, "--max-steps", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert "latest.json is corrupt" in err and len(err.splitlines()) == 1


def test_a_new_run_never_takes_over_an_unfinished_one(stories_path, gsm8k, tmp_path, capsys):
    out = tmp_path / "R"
    assert main(train_argv(stories_path, gsm8k, out, "--max-steps", "4")) == 0
    os.remove(out / "salr_config.json")  # unfinished: a resumable checkpoint and no final model
    before = tree(out)
    capsys.readouterr()
    assert main(train_argv(stories_path, gsm8k, out)) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run (checkpoint at step 4): pass --resume" in err
    assert tree(out) == before


def test_resume_removes_what_killed_processes_left(stories_path, gsm8k, tmp_path, dead_pid):
    out = tmp_path / "R"
    assert main(train_argv(stories_path, gsm8k, out, "--max-steps", "4")) == 0
    os.remove(out / "salr_config.json")
    pid = dead_pid
    leftovers = [
        out / "checkpoints" / f".step-0000006.{pid}.ab12.tmp",
        out / "checkpoints" / f".step-0000002.old-{pid}",
        out / "checkpoints" / "step-0000006",  # renamed into place, killed before latest.json moved
        out / f".salr-final.{pid}.zz.tmp",
    ]
    for path in leftovers:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    (out / f".metrics.jsonl.{pid}.q1.tmp").write_text("{")
    assert main(train_argv(stories_path, gsm8k, out, "--resume")) == 0
    assert temp_leftovers(out) == []
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", f"step-{STEPS:07d}"]

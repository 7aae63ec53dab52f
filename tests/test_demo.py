"""`salr demo` end to end on the tiny real model: compress, fine-tune on synthetic arithmetic, evaluate, reload."""

from __future__ import annotations

import json

import pytest

import salr
from salr.bases import QBitmapBase
from salr.cli import main
from salr.layer import SALRLinear


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_demo_end_to_end(stories_path, tmp_path, capsys, quant):
    out, summary_path = tmp_path / "demo", tmp_path / "demo.json"
    argv = ["demo", "--model", str(stories_path), "--residual-rank", "8", "--lora-rank", "4", "--lr", "3e-3"]
    argv += ["--quant", quant]
    argv += [
        "--recovery-steps",
        "4",
        "--calibration-samples",
        "4",
        "--calibration-length",
        "64",
        "--sample-length",
        "32",
    ]
    argv += ["--train-steps", "12", "--train-examples", "32", "--eval-examples", "8", "--accuracy-examples", "2"]
    argv += ["--max-new-tokens", "4", "--output", str(out), "--json", str(summary_path)]
    assert main(argv) == 0
    summary = json.loads(summary_path.read_text())
    scores = summary["held_out"]["scores"]
    assert set(scores) == {"dense (no tuning)", "SALR+ (before fine-tuning)", "SALR+ (fine-tuned)"}
    # fine-tuning on the synthetic task must lower the held-out answer NLL well below the untuned SALR model's
    assert scores["SALR+ (fine-tuned)"]["answer_nll"] < 0.8 * scores["SALR+ (before fine-tuning)"]["answer_nll"]
    ppl = summary["held_out_text_perplexity"]
    assert set(ppl) == {"dense", "naive unstructured pruning", "SALR, paper recipe", "SALR+ (init)",
                        "SALR+ (recovered)", "SALR+ (fine-tuned)"}  # fmt: skip
    assert ppl["dense"] < ppl["SALR+ (init)"] < ppl["naive unstructured pruning"]
    assert summary["recovery"]["steps"] == 4
    assert summary["loss_curve"][-1] < summary["loss_curve"][0]
    assert summary["reload_max_abs_logit_diff"] == 0.0
    assert summary["training"]["steps"] == 12
    # salr train's defaults: residual block at a tenth of --lr, prompt distillation towards the dense model
    assert summary["training"]["residual_lr"] == "lr*0.1" and summary["training"]["prompt_distill"] == 1.0
    assert set(summary["completions"]) >= {"dense", "SALR+ (init)", "SALR+ (recovered)", "SALR+ (fine-tuned)"}
    text = capsys.readouterr().out
    assert "SALR+ (fine-tuned)" in text and "answer NLL" in text and "held-out text perplexity" in text
    model, _ = salr.load(out)  # the run directory is a SALR checkpoint
    bases = [m.base for m in model.modules() if isinstance(m, SALRLinear)]
    assert bases and all(isinstance(b, QBitmapBase) == (quant == "nf4") for b in bases)  # QSALR kept through it all
    assert (out / "train_report.json").is_file() and (out / "metrics.jsonl").is_file()


def test_demo_without_fine_tuning_saves_the_recovered_model(stories_path, tmp_path):
    """--train-steps 0 with recovery on: the recovered model is what --output holds (it once saved nothing there)."""
    out, summary_path = tmp_path / "demo", tmp_path / "demo.json"
    argv = ["demo", "--model", str(stories_path), "--residual-rank", "8", "--lora-rank", "4", "--recovery-steps", "2"]
    argv += ["--calibration-samples", "4", "--calibration-length", "64", "--sample-length", "32", "--train-steps", "0"]
    argv += ["--eval-examples", "4", "--accuracy-examples", "0", "--max-new-tokens", "4"]
    argv += ["--output", str(out), "--json", str(summary_path)]
    assert main(argv) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["recovery"]["steps"] == 2 and "training" not in summary
    assert summary["reload_max_abs_logit_diff"] == 0.0
    assert (out / "salr_config.json").is_file()


def test_demo_bad_data_fails_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "x"}]')
    assert main(["demo", "--model", "does-not-matter", "--data", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "unknown record format" in capsys.readouterr().err


def test_demo_checks_its_outputs_before_loading(tmp_path, capsys):
    """A bad --output or --json is refused before the model is loaded (it failed at stage 3 or at the very end, after
    the whole demo's work, the --json one naming a temporary file)."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    base = ["demo", "--model", "does-not-matter"]
    cases = {
        ("--output", str(foreign)): "already holds ['notes.txt'] and is not a salr run",
        ("--output", str(foreign), "--train-steps", "0"): "is not a SALR checkpoint: refusing to overwrite it",
        ("--output", str(tmp_path / "o"), "--json", str(foreign)): "is a directory: pass a file name",
    }
    for flags, message in cases.items():
        assert main([*base, *flags]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and (foreign / "notes.txt").read_text() == "keep"

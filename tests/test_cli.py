"""The command-line contract: `salr compress` writes a checkpoint and a report; bad input is one clear line."""

import json
import subprocess
import sys

import pytest
import torch

import salr
from salr.cli import main


def test_compress_writes_checkpoint_and_report(stories_path, tmp_path, capsys):
    out = tmp_path / "D"
    argv = ["compress", "--model", str(stories_path), "--preset", "paper", "--sparsity", "0.5", "--residual-rank", "8"]
    assert main([*argv, "--lora-rank", "4", "--output", str(out)]) == 0
    report = json.loads((out / "salr_report.json").read_text())
    assert len(report["layers"]) == 35
    assert report["config"]["r"] == 4  # --lora-rank reaches the field `r` (it was once silently ignored)
    for row in report["layers"]:
        assert set(row) >= {
            "name",
            "shape",
            "sparsity",
            "pruned_energy",
            "residual_energy_after_svd",
            "theorem3_bound",
        }
        assert abs(row["sparsity"] - 0.5) <= 0.01
        assert row["residual_energy_after_svd"] == pytest.approx(row["svd_tail_energy"], rel=1e-4)
        assert row["residual_energy_after_svd"] <= row["theorem3_bound"]
    totals = report["totals"]
    assert set(totals) >= {"sparsity", "parameters", "nonzero_parameters", "adapter_parameters"}
    assert report["seconds"] > 0
    assert "total: 35 layers" in capsys.readouterr().out
    model, tokenizer = salr.load(out)
    dense, _ = salr.load_model(str(stories_path))
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, dense(ids).logits)  # it really was pruned


def test_compress_2_4_pattern(stories_path, tmp_path):
    out = tmp_path / "D24"
    argv = ["compress", "--model", str(stories_path), "--pattern", "2:4", "--residual-rank", "4", "--output", str(out)]
    assert main([*argv, "--preset", "paper", "--quiet"]) == 0
    report = json.loads((out / "salr_report.json").read_text())
    assert report["config"]["pattern"] == "2:4" and report["config"]["sparsity"] == 0.5
    assert all(abs(r["sparsity"] - 0.5) < 1e-9 for r in report["layers"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
        (["--pattern", "4:8", "--residual-rank", "4"], "needs the input dimension"),
        (["--residual-rank", "65"], "exceeds min(out, in)"),
        (["--target-modules", "attn_qkv"], "match no linear layer"),
    ],
)
def test_bad_arguments_give_one_clear_line(stories_path, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert main(["compress", "--model", str(stories_path), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_missing_model_file_from_a_real_subprocess(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "salr.cli",
            "compress",
            "--model",
            str(tmp_path / "x.bin"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "not found" in result.stderr and "Traceback" not in result.stderr


def test_compress_default_recipe_calibrates_on_self_generated_text(stories_path, tmp_path):
    """The default (salr+) recipe: SparseGPT mask + alternating whitened residual on text the model samples itself."""
    out = tmp_path / "plus"
    argv = ["compress", "--model", str(stories_path), "--residual-rank", "8", "--lora-rank", "4", "--quiet"]
    argv += ["--calibration-samples", "4", "--calibration-length", "64", "--output", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "salr_report.json").read_text())
    config = report["config"]
    recipe = (config["criterion"], config["residual_init"], config["calibration"])
    assert recipe == ("sparsegpt", "alternating", "self")
    for row in report["layers"]:
        assert abs(row["sparsity"] - 0.5) <= 0.01
        # the whitened residual reduces the output error on the calibration activations
        assert row["output_error_after_residual"] < row["output_error_before_residual"]
    salr.load(out)


def test_preset_paper_reproduces_the_paper_flags(stories_path, tmp_path):
    out = tmp_path / "paper"
    argv = ["compress", "--model", str(stories_path), "--preset", "paper", "--residual-rank", "4", "--quiet"]
    assert main([*argv, "--output", str(out)]) == 0
    config = json.loads((out / "salr_report.json").read_text())["config"]
    assert (config["criterion"], config["residual_init"], config["granularity"], config["calibration"]) == (
        "magnitude",
        "svd",
        "layer",
        "none",
    )
    assert config["residual_rank"] == 4  # a flag beside the preset still applies


@pytest.mark.parametrize("command", ["train", "compress", "eval"])
def test_help_of_every_generated_flag_prints(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "usage: salr" in out
    assert ("--lora-rank" in out) == (command != "eval")  # the generated SALR flags of compress and train
    if command == "train":  # "3% of steps" in a help string is shown, not %-formatted
        assert "3% of steps" in " ".join(out.split()) and "--rank-allocation" in out

"""`salr train`'s defaults are the best measured fine-tuning recipe (docs/training.md, "Defaults"): LoRA block at
1e-3, residual block at a tenth of it, prompt distillation 1 when the dense teacher is at hand, and a dense model
converted with calibration on its own training records, 8 rounds and 32 block-tuning steps."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import SALR_CFG, converted, tiny_examples

import salr
from salr import data
from salr.calibration import calibration_ids, records_text, text_ids
from salr.cli import build_parser, main
from salr.commands.train import train_config_from_args, training_conversion
from salr.config import TRAINING_DATA
from salr.evaluate import answer_nll, run_task
from salr.train import TrainConfig, train
from salr.train import loop as train_loop
from salr.train.config import TRAINING_CONVERSION


def test_defaults_are_the_measured_recipe():
    cfg = TrainConfig()
    assert cfg.lr == 1e-3 and cfg.residual_lr_ratio() == pytest.approx(0.1)
    assert cfg.prompt_weight(has_teacher=True) == 1.0 and cfg.prompt_weight(has_teacher=False) == 0.0
    assert cfg.wants_teacher()
    distill = TrainConfig(distill=True)  # data-free recovery: 1e-4 for both blocks, as measured (1e-3 hurt there)
    assert distill.lr == 1e-4 and distill.residual_lr_ratio() is None
    assert distill.prompt_weight(has_teacher=True) == 0.0  # distill matches every position already
    assert TrainConfig(lr=3e-4).residual_lr_ratio() == pytest.approx(0.1)  # a given lr keeps the tenth
    assert TrainConfig(prompt_distill=0.0).prompt_weight(has_teacher=True) == 0.0
    assert not TrainConfig(prompt_distill=0.0).wants_teacher()
    assert TRAINING_CONVERSION == {"calibration": TRAINING_DATA, "alternating_rounds": 8, "block_tuning_steps": 32}


def test_residual_lr_forms():
    assert TrainConfig(residual_lr="lr").residual_lr_ratio() is None
    assert TrainConfig(residual_lr=None).residual_lr_ratio() is None
    assert TrainConfig(residual_lr="lr*0.5").residual_lr_ratio() == 0.5
    assert TrainConfig(lr=1e-3, residual_lr=2e-4).residual_lr_ratio() == pytest.approx(0.2)
    assert TrainConfig(lr=1e-3, residual_lr="2e-4").residual_lr_ratio() == pytest.approx(0.2)
    assert TrainConfig(residual_lr="theorem4").residual_lr_ratio() is None  # per layer, from the activations
    for bad in ("lr*", "lr*x", "lr*-1", "lrx", "lr*nan", "fast"):
        with pytest.raises(salr.SALRError, match="residual_lr"):
            TrainConfig(residual_lr=bad)


def test_default_residual_block_trains_at_a_tenth_of_lr(tiny_llama, tmp_path):
    settings = TrainConfig(lr=1e-2, max_steps=1, batch_size=8, warmup_steps=0, max_length=64, progress=False)
    report = train(converted(tiny_llama), None, tiny_examples(n=8), SALR_CFG, settings, tmp_path / "run")
    rates = report["residual_lr_per_layer"]
    assert rates and all(r == pytest.approx(1e-3) for r in rates.values()), rates
    assert report["prompt_distill"] == 0.0  # no teacher given: the default resolves to off, not to an error


def parse(*argv: str):
    return build_parser().parse_args(["train", "--output", "o", *argv])


def test_cli_residual_lr_takes_keywords_and_numbers():
    """`--residual-lr theorem4` used to be refused by argparse (the flag parsed floats only)."""
    for value, expected in (("theorem4", "theorem4"), ("lr*0.25", "lr*0.25"), ("3e-4", 3e-4), ("lr", "lr")):
        assert train_config_from_args(parse("--residual-lr", value)).residual_lr == expected
    assert train_config_from_args(parse()).residual_lr == "lr*0.1"
    assert train_config_from_args(parse("--method", "losa")).lr == 2e-4  # LoSA keeps its paper's rate
    assert train_config_from_args(parse("--method", "losa", "--lr", "5e-4")).lr == 5e-4


def test_training_conversion_fills_only_what_the_user_left_unset():
    assert training_conversion(parse("--data", "d.jsonl")) == TRAINING_CONVERSION
    assert training_conversion(parse()) == {"alternating_rounds": 8, "block_tuning_steps": 32}  # no data: self
    given = training_conversion(parse("--data", "d.jsonl", "--calibration", "self", "--alternating-rounds", "3"))
    assert given == {"block_tuning_steps": 32}
    assert training_conversion(parse("--data", "d.jsonl", "--preset", "paper")) == {}
    assert training_conversion(parse("--data", "d.jsonl", "--method", "losa")) == {}


def test_data_calibration_uses_exactly_the_training_records(stories_path, monkeypatch):
    """Calibration 'data' windows come from the (--limit-ed) training records, as the grid's `--calibration train`
    file does; without records it is one clear error; `salr compress` cannot use it."""
    records = data.synthetic_arithmetic(40, seed=5)
    captured = {}
    real_convert = train_loop.convert

    def spy(model, config, tokenizer=None, calibration=None, **kw):
        captured["ids"] = calibration
        return real_convert(model, config, tokenizer=tokenizer, calibration=calibration, **kw)

    monkeypatch.setattr(train_loop, "convert", spy)
    config = salr.SALRConfig(residual_rank=4, r=4, calibration=TRAINING_DATA, calibration_samples=6,
                             calibration_length=32, alternating_rounds=1, seed=3)  # fmt: skip
    model, tok, saved, report = train_loop.prepare_model(str(stories_path), "salr", config, records=records)
    assert saved.calibration == TRAINING_DATA and report["totals"]["sparsity"] > 0.4
    expected = text_ids(tok, records_text(records), 6, 32, seed=3)
    assert captured["ids"].shape == (6, 32) and torch.equal(captured["ids"], expected)
    with pytest.raises(salr.SALRError, match="training records"):
        train_loop.prepare_model(str(stories_path), "salr", config, records=None)
    with pytest.raises(salr.SALRError, match="only salr train"):
        calibration_ids(model, tok, TRAINING_DATA, 4, 16)


def test_salr_train_defaults_end_to_end(stories_path, tmp_path):
    """`salr train` with no recipe flags: the saved config and report carry the training recipe."""
    records = tmp_path / "train.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_arithmetic(24, seed=2)))
    argv = ["train", "--model", str(stories_path), "--data", str(records), "--residual-rank", "4", "--lora-rank", "4",
            "--calibration-samples", "4", "--calibration-length", "32", "--block-tuning-steps", "2", "--max-steps",
            "2", "--batch-size", "4", "--no-progress", "--output", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    method = report["method_config"]
    assert method["calibration"] == TRAINING_DATA and method["alternating_rounds"] == 8
    assert method["block_tuning_steps"] == 2  # given, so kept
    assert report["prompt_distill"] == 1.0 and report["train_config"]["lr"] == 1e-3
    assert all(r == pytest.approx(1e-4) for r in report["residual_lr_per_layer"].values())


def test_eval_answer_nll_task(stories, stories_path, tmp_path, capsys):
    """`salr eval --task answer-nll`: the grid's teacher-forced metric, no generation."""
    model, tok = stories
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_arithmetic(12, seed=7)))
    got = run_task(model, tok, "answer-nll", path, limit=5, batch_size=2)
    want = answer_nll(model, tok, data.load_sft_records(path, 5), batch_size=2)
    assert got["n"] == 5 and got["answer_nll"] == pytest.approx(want["answer_nll"], rel=1e-6)
    assert got["answer_tokens"] == want["answer_tokens"] > 0
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(stories_path), "--task", "answer-nll", "--data", str(path), "--limit", "5",
            "--batch-size", "2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "answer nll" in capsys.readouterr().out
    assert json.loads(out.read_text())["metrics"]["answer_nll"] == pytest.approx(want["answer_nll"], rel=1e-6)


def checkpoint_without_its_dense_model(stories_path, tmp_path):
    """(a paper-recipe SALR checkpoint of the stories model that records no base model, 16 training records)."""
    from salr.loaders import load_model

    model, tok = load_model(str(stories_path))
    config = salr.SALRConfig.from_preset("paper", residual_rank=4, r=4)
    salr.convert(model, config, progress=False)
    ckpt = tmp_path / "ckpt"
    salr.save(model, ckpt, config, tokenizer=tok, base_model=None)
    records = tmp_path / "train.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_arithmetic(16, seed=2)))
    return ckpt, records


def test_default_prompt_distillation_steps_aside_without_a_dense_teacher(stories_path, tmp_path, caplog, capsys):
    """A checkpoint that does not record its dense model: the default trains without prompt distillation (with a
    warning); asking for it explicitly is one clear error."""
    ckpt, records = checkpoint_without_its_dense_model(stories_path, tmp_path)
    base = ["train", "--model", str(ckpt), "--data", str(records), "--max-steps", "1", "--batch-size", "4",
            "--no-progress"]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert main([*base, "--output", str(tmp_path / "run")]) == 0
    assert "without prompt distillation" in caplog.text
    assert json.loads((tmp_path / "run" / "train_report.json").read_text())["prompt_distill"] == 0.0
    capsys.readouterr()
    assert main([*base, "--prompt-distill", "1", "--output", str(tmp_path / "run2")]) == 2
    assert "does not record its dense base model" in capsys.readouterr().err


def test_a_checkpoint_is_trained_as_saved_and_conversion_flags_are_refused(stories_path, tmp_path, capsys):
    """`salr train --model CKPT` trains the checkpoint's own mask and adapters: a conversion flag, a preset or a method
    that converts a dense model would change nothing and is one clear error before anything is written."""
    ckpt, records = checkpoint_without_its_dense_model(stories_path, tmp_path)
    base = ["train", "--model", str(ckpt), "--data", str(records), "--max-steps", "1", "--batch-size", "4",
            "--no-progress", "--output", str(tmp_path / "run")]  # fmt: skip
    refused = {
        ("--sparsity", "0.9", "--lora-rank", "2"): "--sparsity, --lora-rank would change nothing",
        ("--preset", "paper"): "--preset would change nothing",
        ("--method", "lora"): "unquantized base): --method lora converts a dense model",
        ("--method", "qsalr"): "unquantized base): --method qsalr converts a dense model",
    }
    for flags, message in refused.items():
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "trained as saved (sparsity 0.5, residual rank 4, LoRA rank 4" in err
        assert not (tmp_path / "run").exists()
    assert main([*base, "--method", "salr-frozen-residual", "--seed", "3"]) == 0
    trained, _ = salr.load(tmp_path / "run")
    layer = trained.model.layers[0].mlp.up_proj
    assert layer.residual_rank == 4 and layer.lora_rank == 4

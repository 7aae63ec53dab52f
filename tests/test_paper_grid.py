"""experiments/paper_grid.py: the quick grid, conversion reuse, per-stage timings in results.json."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from salr import data
from salr.config import BLOCK_TUNING_STEPS, PRESETS, SALRConfig
from salr.convert import convert
from salr.layer import SALRLinear
from salr.train import TrainConfig, load_examples, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STORIES = DATA / "models" / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("paper_grid", ROOT / "experiments" / "paper_grid.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_grid"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("paper_grid", None)


def tiny_grid_argv(out: Path, runs: str, *extra: str) -> list[str]:
    """A grid command on stories260K with generation and MMLU off, one WikiText-2 window, 96-token examples."""
    return ["--quick", "--model", str(STORIES), "--output", str(out), "--runs", runs, "--max-length", "96",
            "--accuracy-limit", "0", "--mmlu-limit", "0", "--wikitext-windows", "1", "--threads", "1",
            *extra]  # fmt: skip


def test_quick_grid_keeps_the_comparisons(experiment):
    names = [r.name for r in experiment.grid(quick=True)]
    assert names == [
        "pretrained",
        "lora@50%",
        "salr@50%",
        "prune-lora@50%",
        "salr-frozen-residual@50%",
        "salr+@50%",
        "salr@2:4",
        "salr+@2:4",
        "losa@50%",
        "salr@30%",
        "salr@70%",
    ]
    full = experiment.grid(quick=False)
    assert set(names) < {r.name for r in full} and len(full) == 18
    assert {(r.name, r.pattern) for r in full if r.method == "losa"} == {
        ("losa@50%", "unstructured"),
        ("losa@2:4", "2:4"),
    }
    # the paper's recipe and ours side by side; "+" runs use the salr+ preset
    assert {r.name for r in full if r.preset == "salr+"} == {
        "salr+@50%",
        "salr+@2:4",
        "prune-lora+@50%",
        "prune-lora+@2:4",
        "losa@50%",  # LoSA calibrates like salr+ (self-generated windows)
        "losa@2:4",
    }


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("A_cat", "B_cat"))}


def test_frozen_residual_reuses_the_salr_conversion_and_trains_identically(experiment, make_tokenizer, tmp_path):
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )
    args = argparse.Namespace(residual_rank=4, residual_rank_pattern=None, sparsity_pattern=None, lora_rank=2, seed=0)
    runs = [experiment.Run(f"{m}@50%", m) for m in ("salr", "salr-frozen-residual", "prune-lora")]
    conversions = experiment.Conversions(runs, args)
    configs = [experiment.run_config(r, args) for r in runs]
    salr, _, reused = conversions.get(runs[0], configs[0], dense)
    assert reused is None
    salr_init = _adapters(salr)
    examples = load_examples(None, tokenizer, 96, records=data.synthetic_arithmetic(8, seed=3))
    cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=4, max_length=96, seed=0, progress=False, warmup_steps=0)
    train(salr, tokenizer, examples, configs[0], cfg, tmp_path / "salr")  # must not touch the kept copy
    frozen, report, reused = conversions.get(runs[1], configs[1], dense)
    assert reused == "salr@50%" and report["totals"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(torch.equal(salr_init[n], t) for n, t in _adapters(frozen).items())  # the untrained conversion
    assert all(not m.train_residual for m in frozen.modules() if isinstance(m, SALRLinear))
    assert not conversions.kept  # no later run needs it
    _, _, reused = conversions.get(runs[2], configs[2], dense)
    assert reused is None  # prune-lora: no residual, another conversion
    # The reused model trains exactly like a fresh salr-frozen-residual conversion.
    fresh = LlamaForCausalLM(dense.config)
    fresh.load_state_dict(dense.state_dict())
    convert(fresh, configs[1], progress=False)
    train(frozen, tokenizer, examples, configs[1], cfg, tmp_path / "reused")
    train(fresh, tokenizer, examples, configs[1], cfg, tmp_path / "fresh")
    after_reused, after_fresh = _adapters(frozen), _adapters(fresh)
    assert after_reused.keys() == after_fresh.keys()
    assert all(torch.equal(after_reused[n], after_fresh[n]) for n in after_fresh)
    changed = [n for n in after_fresh if not torch.equal(after_fresh[n], salr_init[n])]
    assert changed  # the LoRA block did train
    for name, layer in frozen.named_modules():
        if isinstance(layer, SALRLinear):  # the residual block did not
            r = layer.residual_rank
            assert torch.equal(layer.A_cat[:r], salr_init[f"{name}.A_cat"][:r])
            assert torch.equal(layer.B_cat[:, :r], salr_init[f"{name}.B_cat"][:, :r])


def test_runner_writes_per_stage_seconds(experiment, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "exp"
    argv = [
        "--quick",
        "--model",
        str(STORIES),
        "--output",
        str(out),
        "--runs",
        "pretrained,salr@50%,salr-frozen-residual@50%",
        "--residual-rank",
        "8",
        "--lora-rank",
        "4",
        "--train-examples",
        "8",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "128",
        "--nll-limit",
        "4",
        "--accuracy-limit",
        "2",
        "--max-new-tokens",
        "8",
        "--mmlu",
        str(DATA / "mmlu" / "val" / "anatomy_val.csv"),
        "--mmlu-limit",
        "2",
        "--mmlu-shots",
        "1",
        "--wikitext-windows",
        "1",
        "--threads",
        "1",
    ]
    assert experiment.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["pretrained", "salr@50%", "salr-frozen-residual@50%"]
    evals = {"eval_answer_nll", "eval_gsm8k_generation", "eval_mmlu", "eval_wikitext2"}
    pretrained, salr, frozen = result["runs"]
    assert set(pretrained["seconds"]) == evals | {"total"}
    assert set(salr["seconds"]) == evals | {"convert", "train", "save", "total"}
    for row in result["runs"]:
        sec = row["seconds"]
        assert all(v >= 0 for v in sec.values())
        assert sum(v for k, v in sec.items() if k != "total") <= sec["total"] + 0.05
        assert 0 < row["gsm8k_generated_tokens"] <= 2 * 8
    assert salr["conversion_reused_from"] is None and frozen["conversion_reused_from"] == "salr@50%"
    assert result["threads"] == 1 and result["seconds"] >= sum(r["seconds"]["total"] for r in result["runs"])
    assert not (out / "runs" / "salr_50pct").exists()  # checkpoints deleted without --keep-runs
    md = (out / "results.md").read_text()
    assert "| GSM8K generation |" in md and "| all runs |" in md


def test_optional_quantized_runs(experiment):
    names = [r.name for r in experiment.grid(quick=True, optional=True)]
    assert names[-3:] == ["qsalr@50%", "qsalr+@50%", "qlora@nf4"]
    assert "qsalr@50%" not in [r.name for r in experiment.grid(True)]
    args = argparse.Namespace(residual_rank=4, residual_rank_pattern=None, sparsity_pattern=None, lora_rank=2, seed=0)
    qsalr, qsalr_plus, qlora = (experiment.run_config(r, args) for r in experiment.OPTIONAL)
    assert (qsalr.quant, qsalr.sparsity, qsalr.residual_rank, qsalr.r) == ("nf4", 0.5, 4, 2)
    assert qsalr.criterion == "magnitude" and qsalr_plus.criterion == PRESETS["salr+"]["criterion"]
    assert qsalr_plus.residual_init == PRESETS["salr+"]["residual_init"]
    assert qsalr_plus.quant == "nf4"
    assert (qlora.quant, qlora.sparsity, qlora.residual_rank, qlora.r) == ("nf4", 0.0, 0, 6)  # SALR's rank
    rows = [
        {"name": "salr@50%", "gsm8k_answer_nll": 1.0},
        {"name": "qsalr@50%", "gsm8k_answer_nll": 1.02},
        {"name": "qlora@nf4", "gsm8k_answer_nll": 1.1},
    ]
    assert experiment.quant_check(rows) == (
        "QSALR@50% answer NLL 1.0200 vs SALR@50% 1.0000 (+2.00%; within 3%), QLoRA 1.1000 (below)."
    )


def test_losa_runs_beside_prune_lora_with_deployed_bytes(experiment, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "exp"
    argv = tiny_grid_argv(out, "pretrained,prune-lora@50%,losa@50%",
                          "--residual-rank", "4", "--lora-rank", "4", "--train-examples", "16", "--steps", "5",
                          "--batch-size", "2", "--nll-limit", "3", "--calibration-samples", "4",
                          "--calibration-length", "64", "--losa-prune-method", "sparsegpt",
                          "--losa-no-rmi-allocation", "--losa-no-rank-allocation", "--losa-unmasked-training",
                          "--losa-warmup-ratio", "0.2")  # fmt: skip
    assert experiment.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    pretrained, prune_lora, losa = result["runs"]
    assert losa["losa_prune_method"] == "sparsegpt" and losa["losa_warmup_ratio"] == 0.2
    assert losa["losa_rmi_allocation"] is False and losa["losa_rank_allocation"] is False
    assert losa["losa_masked_training"] is False
    for r in losa["losa_rounds"]:  # the switches reach LoSA: uniform sparsity, ranks within the budget's rounding
        assert set(r["block_sparsity"]) == {r["sparsity"]} and max(r["ranks"]) - min(r["ranks"]) <= 1
    assert losa["method"] == "losa" and abs(losa["base_sparsity"] - 0.5) < 0.01  # measured on the merged weights
    assert losa["trainable_parameters"] == prune_lora["trainable_parameters"]  # final mean rank = LoRA's rank
    assert [r["steps"] for r in losa["losa_rounds"]] == [1, 1, 1, 1, 1] and len(losa["loss_curve"]) == 5
    # deployed: LoSA is a plain sparse model, prune-LoRA a sparse base plus adapters, both below the dense model
    assert losa["deployed_bytes"] < prune_lora["deployed_bytes"] <= pretrained["deployed_bytes"]
    assert losa["gsm8k_accuracy"] is None and "eval_mmlu" not in losa["seconds"]  # limit 0 skips them
    md = (out / "results.md").read_text()
    assert "| deployed MB |" in md and "LoSA@50% WikiText-2 ppl" in md


def test_calibration_train_writes_only_the_training_problems(experiment, tmp_path):
    records = [{"question": f"q{i}", "answer": f"a{i}\n#### {i}"} for i in range(5)]
    path = experiment.write_calibration_file(tmp_path, records[:3])  # the grid passes train_records[:train_examples]
    assert data.load_gsm8k(path) == records[:3]
    assert not list(tmp_path.glob("*.tmp"))
    args = experiment.parse_args(["--output", str(tmp_path), "--calibration", "train"])
    assert args.calibration == "train"


def test_alternating_rounds_reach_salr_plus_but_not_the_paper_preset(experiment, tmp_path):
    args = experiment.parse_args(["--output", str(tmp_path), "--alternating-rounds", "8"])
    runs = {r.name: r for r in experiment.grid(quick=False)}
    assert experiment.run_config(runs["salr+@50%"], args).alternating_rounds == 8
    assert experiment.run_config(runs["salr@50%"], args).residual_init == "svd"  # the paper's recipe, no rounds
    default = experiment.parse_args(["--output", str(tmp_path)])
    assert experiment.run_config(runs["salr+@50%"], default).alternating_rounds == SALRConfig().alternating_rounds
    plain = experiment.parse_args(["--output", str(tmp_path), "--alternating-momentum", "0"])
    assert experiment.run_config(runs["salr+@50%"], plain).alternating_momentum == 0.0  # 0 is a value, not unset
    assert experiment.run_config(runs["salr+@50%"], default).alternating_momentum == SALRConfig().alternating_momentum


def test_block_tuning_reaches_salr_plus_only(experiment, tmp_path):
    args = experiment.parse_args(
        ["--output", str(tmp_path), "--block-tuning-steps", "32", "--block-tuning-lr", "3e-4"]
    )
    runs = {r.name: r for r in experiment.grid(quick=False)}
    salr_plus = experiment.run_config(runs["salr+@50%"], args)
    assert (salr_plus.block_tuning_steps, salr_plus.block_tuning_lr) == (32, 3e-4)
    assert experiment.run_config(runs["lora@50%"], args).tuning_steps == 0  # a dense base: nothing to repair
    assert experiment.run_config(runs["salr@50%"], args).tuning_steps == 0  # the paper preset has no data
    default = experiment.parse_args(["--output", str(tmp_path)])
    assert experiment.run_config(runs["salr+@50%"], default).tuning_steps == SALRConfig().tuning_steps == 0
    assert experiment.run_config(runs["salr+@2:4"], default).tuning_steps == BLOCK_TUNING_STEPS


def test_residual_lr_reaches_the_training_config(experiment, tmp_path):
    default = experiment.train_config(experiment.parse_args(["--output", str(tmp_path), "--lr", "1e-3"]))
    assert default.lr == 1e-3 and default.residual_lr is None  # the residual block follows --lr
    split = experiment.parse_args(["--output", str(tmp_path), "--lr", "1e-3", "--residual-lr", "1e-4"])
    cfg = experiment.train_config(split)
    assert cfg.lr == 1e-3 and cfg.residual_lr == 1e-4 and cfg.max_steps == split.steps


def test_recovery_distills_converted_runs_and_skips_dense_lora(experiment, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "exp"
    argv = tiny_grid_argv(out, "lora@50%,salr@50%",
                          "--residual-rank", "8", "--lora-rank", "4", "--train-examples", "8", "--steps", "1",
                          "--batch-size", "2", "--nll-limit", "2",
                          "--recovery-steps", "4", "--recovery-lr", "1e-2", "--recovery-batch-size", "64")  # fmt: skip
    assert experiment.main(argv) == 0
    lora, salr = json.loads((out / "results.json").read_text())["runs"]
    assert "recovery_steps" not in lora and "recover" not in lora["seconds"]  # dense LoRA: KL is exactly zero
    assert salr["recovery_steps"] == 4 and salr["seconds"]["recover"] > 0
    # the same sequences every step (the batch holds all): distillation must bring the student closer to the teacher
    assert 0 < salr["recovery_kl_last"] < salr["recovery_kl_first"]
    assert not list((out / "runs").glob("*_recovery"))  # the recovery checkpoint is not kept


def test_recovery_leaves_the_dense_teacher_untouched(experiment, tmp_path):
    from salr.loaders import load_model

    dense, tokenizer = load_model(str(STORIES))
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    args = experiment.parse_args(["--output", str(tmp_path), "--recovery-steps", "2", "--recovery-lr", "1e-2",
                                  "--recovery-batch-size", "2", "--max-length", "256"])  # fmt: skip
    run = experiment.Run("salr@50%", "salr")
    assert experiment.needs_recovery(run, args) and not experiment.needs_recovery(experiment.Run("l", "lora"), args)
    config = SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=2)
    model = copy.deepcopy(dense)
    convert(model, config, progress=False)
    records = data.load_gsm8k(DATA / "gsm8k" / "train.jsonl")[:4]
    examples = load_examples(None, tokenizer, 256, records=records)
    fields = experiment.recover(model, dense, tokenizer, examples, config, args, tmp_path / "rec")
    assert fields["recovery_steps"] == 2
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert not (tmp_path / "rec").exists()


def test_prompt_distill_reaches_every_trained_run_and_refuses_losa(experiment, tmp_path):
    """One step with and without --prompt-distill: the step's loss gains the prompts' KL for the pruned run and
    nothing for dense LoRA (equal to the dense model at init); LoSA, which trains without a teacher, is refused."""
    torch.set_num_threads(1)
    losses = []
    for weight in ("0", "1"):
        out = tmp_path / f"exp{weight}"
        argv = tiny_grid_argv(out, "lora@50%,salr@50%",
                              "--residual-rank", "8", "--lora-rank", "4", "--train-examples", "8", "--steps", "1",
                              "--batch-size", "2", "--nll-limit", "2", "--prompt-distill", weight)  # fmt: skip
        assert experiment.main(argv) == 0
        result = json.loads((out / "results.json").read_text())
        assert result["settings"]["prompt_distill"] == float(weight)
        losses.append([r["loss_curve"][0] for r in result["runs"]])
    (lora0, salr0), (lora1, salr1) = losses
    assert lora1 == pytest.approx(lora0, rel=1e-5) and salr1 > salr0 * 1.001
    with pytest.raises(SystemExit, match="LoSA"):
        experiment.main(tiny_grid_argv(tmp_path / "losa", "losa@50%", "--prompt-distill", "1"))


def test_sparsity_pattern_goes_to_the_unstructured_50_percent_runs(experiment):
    pattern = {"(gate|up|down)_proj": 0.25}
    grid = experiment
    args = argparse.Namespace(residual_rank=4, residual_rank_pattern=None, sparsity_pattern=pattern, lora_rank=2,
                              seed=0)  # fmt: skip
    configs = {run.name: grid.run_config(run, args) for run in grid.grid(quick=False) if run.method != "pretrained"}
    assert configs["salr+@50%"].sparsity_pattern == pattern
    assert configs["prune-lora+@50%"].sparsity_pattern == pattern
    assert configs["lora@50%"].sparsity_pattern is None
    assert all(configs[name].sparsity_pattern is None for name in configs if "2:4" in name or "losa" in name)
    assert configs["salr@70%"].sparsity_pattern is None  # the sweep keeps its one sparsity per run

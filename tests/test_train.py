"""salr.train: the loss falls, only adapters change, frozen residual stays put, runs reload and resume exactly,
two DDP processes equal one, Theorem 4's per-layer lr is applied as documented, bad data fails clearly."""

from __future__ import annotations

import copy
import json
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

import salr
from salr import data, memory
from salr.cli import main
from salr.layer import SALRLinear
from salr.train import TrainConfig, load_examples, method_config, prepare_model, train
from salr.train.loop import AnswerLoss
from salr.train.residual_lr import theorem4_rates
from salr.train.state import latest_checkpoint

SALR_CFG = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=4, lora_alpha=8, seed=0)


def tiny_examples(n: int = 32, seed: int = 0, vocab: int = 128) -> list[dict[str, list[int]]]:
    """Prompt of random tokens, answer = the prompt's first 6 tokens (learnable); labels -100 on the prompt."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (8 + i % 5,), generator=gen).tolist()
        answer = prompt[:6]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def converted(model: torch.nn.Module, config: salr.SALRConfig = SALR_CFG) -> torch.nn.Module:
    salr.convert(model, config, progress=False)
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cfg(**kw) -> TrainConfig:
    defaults = dict(lr=1e-2, max_steps=12, batch_size=8, warmup_steps=2, max_length=64, progress=False)
    return TrainConfig(**{**defaults, **kw})


def test_short_train_on_stories(stories_path, tmp_path):
    """Real model, real tokenizer, synthetic GSM8K-format data: loss falls; bases bit-identical; run reloads."""
    model, tok, config, _ = prepare_model(
        str(stories_path), "salr", salr.SALRConfig.from_preset("paper", residual_rank=8, r=8)
    )
    examples = load_examples(None, tok, 96, records=data.synthetic_arithmetic(48, seed=3))
    before = snapshot(model)
    report = train(model, tok, examples, config, cfg(lr=3e-3, max_steps=24), tmp_path / "run", "stories")
    losses = [h["loss"] for h in report["history"]]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    after = model.state_dict()
    for name, value in before.items():
        if name.endswith(("A_cat", "B_cat")):
            assert not torch.equal(value, after[name]), f"{name} did not train"
        else:  # frozen bases (hence their masks), embeddings, norms: bit for bit
            assert torch.equal(value, after[name]), f"{name} changed"
    reloaded, tok2 = salr.load(tmp_path / "run")
    ids = torch.tensor([examples[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert tok2 is not None
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 24 and {"step", "loss", "lr", "tokens_per_s", "peak_memory_mib"} <= set(eval(lines[0]))


def test_output_holding_other_files_is_refused_before_training(tiny_llama, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    model = converted(tiny_llama)
    before = snapshot(model)
    with pytest.raises(salr.SALRError, match=r"holds \['notes.txt'\] and is not a salr run"):
        train(model, None, tiny_examples(), SALR_CFG, cfg(max_steps=2), out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before any step
    (tmp_path / "afile").write_text("x")
    with pytest.raises(salr.SALRError, match="is a file"):
        train(model, None, tiny_examples(), SALR_CFG, cfg(max_steps=2), tmp_path / "afile")


def test_reported_peak_memory_is_the_runs_own(tiny_llama, tmp_path):
    """A run inside a process that used a lot of memory earlier reports its own peak, not the process's."""
    if not memory.reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here: the CPU peak cannot be reset")
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched, then returned to the OS
    earlier_peak = memory.peak_rss_mib()
    del big
    report = train(converted(tiny_llama), None, tiny_examples(), SALR_CFG, cfg(max_steps=2), tmp_path / "run")
    assert 0 < report["peak_memory_mib"] < earlier_peak - 128


def test_frozen_residual_block_is_bit_identical(tiny_llama, tmp_path):
    config = method_config("salr-frozen-residual", SALR_CFG)
    model = converted(tiny_llama, config)
    before = snapshot(model)
    # weight decay would shrink a block that only gets zero gradients: the loop must still keep it exact
    train(model, None, tiny_examples(), config, cfg(weight_decay=0.1), tmp_path / "run")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SALRLinear)]
    for name, layer in layers:
        r = layer.residual_rank
        assert torch.equal(layer.A_cat[:r], before[f"{name}.A_cat"][:r])
        assert torch.equal(layer.B_cat[:, :r], before[f"{name}.B_cat"][:, :r])
        assert not torch.equal(layer.A_cat[r:], before[f"{name}.A_cat"][r:])
        assert not torch.equal(layer.B_cat[:, r:], before[f"{name}.B_cat"][:, r:])


def test_float16_adapters_are_refused_before_training_and_bfloat16_ones_train(tiny_llama, tmp_path, capsys):
    """AdamW's eps underflows in float16 (the first step gave NaN and 'lower --lr'): refused in one line, before a
    dense model is converted or a run directory exists; bfloat16 adapters train."""
    half = salr.SALRConfig.from_dict({**SALR_CFG.to_dict(), "adapter_dtype": "float16"})
    with pytest.raises(salr.SALRError, match="adapters are float16, which AdamW cannot train"):
        train(converted(copy.deepcopy(tiny_llama), half), None, tiny_examples(), half, cfg(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(salr.SALRError, match="adapters are float16"):
        prepare_model("unused: refused before loading", "salr", half)
    tiny_llama.save_pretrained(tmp_path / "dense")
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_arithmetic(8, seed=0)))
    argv = ["train", "--model", str(tmp_path / "dense"), "--data", str(records), "--output", str(tmp_path / "b")]
    assert main([*argv, "--adapter-dtype", "float16", "--preset", "paper", "--no-progress"]) == 2
    assert "adapters are float16" in capsys.readouterr().err and not (tmp_path / "b").exists()
    bf16 = salr.SALRConfig.from_dict({**SALR_CFG.to_dict(), "adapter_dtype": "bfloat16"})
    report = train(converted(tiny_llama, bf16), None, tiny_examples(), bf16, cfg(max_steps=3), tmp_path / "c")
    assert len(report["history"]) == 3 and all(math.isfinite(row["loss"]) for row in report["history"])


def test_distillation_sequences_are_cut_to_the_teachers_context(tiny_llama):
    """--distill-length past the context sampled on for as long as asked (100,000 tokens ran for minutes)."""
    from salr.train.loop import distill_examples

    examples = distill_examples(tiny_llama, TrainConfig(distill=True, distill_samples=2, distill_length=100_000))
    assert [len(e["input_ids"]) for e in examples] == [tiny_llama.config.max_position_embeddings] * 2


def test_methods_and_equal_parameter_lora(tiny_llama):
    lora = method_config(
        "lora", salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=8, lora_alpha=16)
    )
    # one LoRA block of rank residual rank + LoRA rank, at SALR's LoRA scale (lora_alpha / r = 2)
    assert (lora.sparsity, lora.residual_rank, lora.r, lora.lora_scale) == (0.0, 0, 12, 2.0)
    prune_lora = method_config("prune-lora", salr.SALRConfig.from_preset("paper", pattern="2:4"))
    assert (prune_lora.residual_rank, prune_lora.r, prune_lora.pattern) == (0, 80, "2:4")
    assert method_config("salr-frozen-residual", SALR_CFG).train_residual is False
    # so LoRA and prune-LoRA train exactly SALR's parameter count
    counts = [
        sum(p.numel() for p in converted(copy.deepcopy(tiny_llama), cfg).parameters() if p.requires_grad)
        for cfg in (SALR_CFG, method_config("lora", SALR_CFG), method_config("prune-lora", SALR_CFG))
    ]
    assert counts[0] == counts[1] == counts[2] > 0
    with pytest.raises(salr.SALRError, match="unknown method"):
        method_config("dora", SALR_CFG)


class Crash(Exception):
    pass


def _crash(model, tokenizer):
    raise Crash


def test_resume_matches_uninterrupted(tiny_llama, tmp_path):
    config = SALR_CFG
    examples = tiny_examples()
    settings = cfg(max_steps=8, save_every=4, batch_size=4, grad_accum=2)
    full_model = converted(copy.deepcopy(tiny_llama))
    full = train(copy.deepcopy(full_model), None, examples, config, settings, tmp_path / "full")
    full_model = salr.load(tmp_path / "full")[0]
    # the same run killed at step 6 (an exception from the eval hook): the step-4 checkpoint is the latest
    crashed = converted(copy.deepcopy(tiny_llama))
    with pytest.raises(Crash):
        train(
            crashed,
            None,
            examples,
            config,
            TrainConfig(**{**vars(settings), "eval_every": 6}),
            tmp_path / "run",
            eval_fn=_crash,
        )
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == "step-0000004"
    resumed_model, _ = salr.load(checkpoint)
    resumed = train(resumed_model, None, examples, config, settings, tmp_path / "run", resume_from=checkpoint)
    assert resumed["resumed_from_step"] == 4
    # the report covers the whole run (the first 4 steps come from the log), bit for bit as if never interrupted
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["tokens"] == full["tokens"]
    for (name, p), (_, q) in zip(full_model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the log was cut back to the checkpoint, then continued


def test_resume_with_more_steps_follows_the_new_schedule_from_its_first_step(tiny_llama, tmp_path):
    """Extending a finished 4-step run to 8: every step after the checkpoint takes the 8-step schedule's lr (the first
    one took the old schedule's, restored with the optimizer)."""
    from salr.train.loop import lr_factor

    examples, short = tiny_examples(), cfg(max_steps=4, save_every=4, batch_size=4, warmup_steps=2, log_every=1)
    train(converted(tiny_llama), None, examples, SALR_CFG, short, tmp_path / "run")
    checkpoint = latest_checkpoint(tmp_path / "run")
    longer = TrainConfig(**{**vars(short), "max_steps": 8})
    resumed, _ = salr.load(checkpoint)
    report = train(resumed, None, examples, SALR_CFG, longer, tmp_path / "run", resume_from=checkpoint)
    lrs = {row["step"]: row["lr"] for row in report["history"]}
    for step in range(5, 9):
        assert lrs[step] == pytest.approx(longer.lr * lr_factor(step - 1, 2, 8, longer.min_lr_ratio), rel=1e-9)
    assert lrs[5] != pytest.approx(short.lr * lr_factor(4, 2, 4, short.min_lr_ratio))


# Adam divides by sqrt(v): on entries whose gradient is near zero, float reordering between 1 and 2 processes is
# amplified to about lr, so the comparison uses a small lr (the losses agree to ~1e-7 at any lr).
DDP_CFG = cfg(lr=1e-3, max_steps=4, batch_size=8, grad_accum=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config()).eval()
    converted(model)
    try:
        train(model, None, tiny_examples(), SALR_CFG, DDP_CFG, out)
    finally:
        torch.distributed.destroy_process_group()


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def test_two_process_ddp_equals_one_process(tmp_path):
    from transformers import LlamaForCausalLM

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    torch.manual_seed(0)
    single = converted(LlamaForCausalLM(_tiny_config()).eval())
    init = snapshot(single)
    report = train(single, None, tiny_examples(), SALR_CFG, DDP_CFG, tmp_path / "one")
    ddp, _ = salr.load(tmp_path / "ddp")
    ddp_report = json.loads((tmp_path / "ddp" / "train_report.json").read_text())
    assert ddp_report["world_size"] == 2
    assert [h["loss"] for h in ddp_report["history"]] == pytest.approx(
        [h["loss"] for h in report["history"]], rel=1e-6
    )
    moved = 0.0
    for (name, p), (_, q) in zip(single.named_parameters(), ddp.named_parameters(), strict=True):
        if name.endswith(("A_cat", "B_cat")):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5, msg=name)
            moved = max(moved, float((p.detach() - init[name]).abs().max()))
    assert moved > 1e-3  # the adapters really trained (so equality is not trivial)


def test_theorem4_rates_and_per_block_lr(tiny_llama, tmp_path):
    model = converted(tiny_llama)
    examples = tiny_examples(n=8)
    rates = theorem4_rates(model, examples[:4], iters=200)
    # reference: X = inputs of q_proj on those examples, stacked; η* = N / σ_max(X)²
    xs = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0][0]))
    with torch.no_grad():
        for ex in examples[:4]:
            model(input_ids=torch.tensor([ex["input_ids"]]))
    handle.remove()
    x = torch.cat(xs).double()
    expected = x.shape[0] / float(torch.linalg.matrix_norm(x, 2)) ** 2
    assert rates["model.layers.0.self_attn.q_proj"] == pytest.approx(expected, rel=1e-6)

    # One AdamW step (no clipping, no warmup): the residual block moves by lr_res * g / (|g| + eps) per entry
    # (Adam's first step), the LoRA block by lr * g / (|g| + eps).
    lr, res_lr = 1e-2, 1e-3
    layer_name = "model.layers.1.mlp.down_proj"
    probe = copy.deepcopy(model)
    loss = AnswerLoss(probe)(**data.collate(examples, 0))
    (loss / sum(sum(t != -100 for t in ex["labels"][1:]) for ex in examples)).backward()
    layer = model.get_submodule(layer_name)
    grads = [probe.get_submodule(layer_name).A_cat.grad, probe.get_submodule(layer_name).B_cat.grad]
    starts = [layer.A_cat.detach().clone(), layer.B_cat.detach().clone()]
    settings = cfg(lr=lr, residual_lr=res_lr, max_steps=1, batch_size=8, warmup_steps=0, max_grad_norm=0)
    report = train(model, None, examples, SALR_CFG, settings, tmp_path / "run")
    assert report["residual_lr_per_layer"][layer_name] == pytest.approx(res_lr)
    r = SALR_CFG.residual_rank
    d_a, d_b = layer.A_cat.detach() - starts[0], layer.B_cat.detach() - starts[1]
    s_a, s_b = (g / (g.abs() + 1e-8) for g in grads)
    assert float(s_b[:, r:].abs().mean()) > 0.5  # the LoRA block really moves (B_lora starts at zero, A_lora not)
    torch.testing.assert_close(d_a[:r], -res_lr * s_a[:r], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(d_b[:, :r], -res_lr * s_b[:, :r], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(d_b[:, r:], -lr * s_b[:, r:], rtol=1e-3, atol=1e-5)


def test_theorem4_config_parsing():
    assert TrainConfig(residual_lr="theorem4").theorem4_factor() == 1.0
    assert TrainConfig(residual_lr="theorem4*0.01").theorem4_factor() == 0.01
    assert TrainConfig(residual_lr="3e-4").residual_lr == 3e-4
    for bad in ("theorem5", "theorem4x2"):
        with pytest.raises(salr.SALRError, match="residual_lr"):
            TrainConfig(residual_lr=bad)


def test_bad_data_file_is_one_clear_error(stories_path, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{not json}\n')
    argv = ["train", "--model", str(stories_path), "--data", str(bad), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: invalid JSON" in err and "Traceback" not in err
    argv[argv.index("--data") + 1] = str(tmp_path / "missing.jsonl")
    assert main(argv) == 2
    assert "no such file" in capsys.readouterr().err


def test_distill_loss_is_zero_for_an_identical_student_and_positive_after_pruning(tiny_llama):
    from salr.train.loop import DistillLoss

    examples = tiny_examples(4)
    batch = data.collate(examples, 0)
    student = converted(copy.deepcopy(tiny_llama), method_config("lora", SALR_CFG))  # B = 0: the dense model
    assert float(DistillLoss(student, tiny_llama)(**batch)) == pytest.approx(0.0, abs=1e-4)
    pruned = converted(copy.deepcopy(tiny_llama), salr.SALRConfig.from_preset("paper", residual_rank=0, r=2))
    assert float(DistillLoss(pruned, tiny_llama)(**batch)) > 1e-3


def test_data_free_distillation_recovers_a_pruned_model(stories_path, tmp_path):
    """`salr train --distill` without --data: text sampled from the dense teacher, KL falls, the run saves."""
    config = salr.SALRConfig.from_preset("paper", residual_rank=8, r=8)
    cfg = TrainConfig(
        lr=3e-3, max_steps=16, batch_size=8, warmup_steps=1, distill=True, distill_samples=32, distill_length=48,
        progress=False,
    )  # fmt: skip
    from salr.train import run_training

    report = run_training(str(stories_path), "salr", config, cfg, tmp_path / "run")
    losses = [h["loss"] for h in report["history"]]
    assert report["distill"] is True and report["data"] == "sampled from the dense teacher"
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    salr.load(tmp_path / "run")


def test_train_without_data_needs_distill(stories_path, tmp_path, capsys):
    assert main(["train", "--model", str(stories_path), "--output", str(tmp_path / "o")]) == 2
    assert "or --distill" in capsys.readouterr().err


def test_prompt_distill_adds_the_teacher_kl_at_prompt_positions_only(tiny_llama):
    """AnswerLoss with a teacher: answer CE + weight * KL(teacher ‖ student) summed over the positions that predict
    a real prompt token; padding and answer positions add no KL; a student equal to its teacher adds none."""
    import torch.nn.functional as F

    examples = tiny_examples(4)
    batch = data.collate(examples, 0)  # different lengths: the shorter rows are padded
    assert int((batch["attention_mask"] == 0).sum()) > 0
    pruned = converted(copy.deepcopy(tiny_llama), salr.SALRConfig.from_preset("paper", residual_rank=0, r=2))
    with torch.no_grad():
        answer_only = float(AnswerLoss(pruned)(**batch))
        with_kl = float(AnswerLoss(pruned, tiny_llama, 0.5)(**batch))
    with torch.no_grad():  # the KL term by hand, from full logits
        s = F.log_softmax(pruned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        t = F.log_softmax(tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        per_position = (t.exp() * (t - s)).sum(-1)[:, :-1]  # [B, T-1]
        prompt = (batch["labels"][:, 1:] == -100) & (batch["attention_mask"][:, 1:] == 1)
        expected_kl = float(per_position[prompt].sum())
    assert expected_kl > 1e-3
    assert with_kl == pytest.approx(answer_only + 0.5 * expected_kl, rel=1e-4)
    same = converted(copy.deepcopy(tiny_llama), method_config("lora", SALR_CFG))  # B = 0: equals the teacher
    with torch.no_grad():
        assert float(AnswerLoss(same, tiny_llama, 2.0)(**batch)) == pytest.approx(float(AnswerLoss(same)(**batch)))


def test_prompt_distill_keeps_the_prompts_closer_to_the_teacher(tiny_llama, tmp_path):
    """The same run with and without prompt_distill: the prompt positions' KL to the dense model ends lower with it,
    the answers are still learnt, and a run without a teacher is refused clearly."""
    from salr.train.loop import DistillLoss

    examples = tiny_examples(32)
    batch = data.collate(examples[:8], 0)

    def prompt_labels(e):  # the prompt tokens as targets, the answers masked
        return [t if lab == -100 else -100 for t, lab in zip(e["input_ids"], e["labels"], strict=True)]

    prompt_only = [{**e, "labels": prompt_labels(e)} for e in examples[:8]]
    prompt_batch = data.collate(prompt_only, 0)
    kls, answers = [], []
    for weight in (0.0, 5.0):  # learning the answers moves the prompts' KL from 0.03 to ~1 without it
        model = converted(copy.deepcopy(tiny_llama))
        settings = cfg(max_steps=30, prompt_distill=weight)
        report = train(model, None, examples, SALR_CFG, settings, tmp_path / f"run{weight}", teacher=tiny_llama)
        assert report["history"][-1]["loss"] < report["history"][0]["loss"]
        with torch.no_grad():
            kls.append(float(DistillLoss(model, tiny_llama)(**prompt_batch)))
            answers.append(float(AnswerLoss(model)(**batch)))
    assert kls[1] < 0.8 * kls[0], kls
    assert answers[1] < 1.5 * answers[0], answers  # the answers are not given up for it
    with pytest.raises(salr.SALRError, match="teacher"):
        train(converted(copy.deepcopy(tiny_llama)), None, examples, SALR_CFG, cfg(prompt_distill=1.0), tmp_path / "x")


def test_prompt_distill_config_errors():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(salr.SALRError, match="prompt_distill"):
            TrainConfig(prompt_distill=bad)
    with pytest.raises(salr.SALRError, match="--distill already"):
        TrainConfig(distill=True, prompt_distill=0.5)


def test_salr_train_prompt_distill_from_the_cli(stories_path, tmp_path, capsys):
    """`salr train --prompt-distill W`: the dense teacher is the model being converted; the run saves and reports
    the weight; a bad weight or the mix with --distill is one clear error."""
    records = tmp_path / "train.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_arithmetic(16, seed=2)))
    base = ["train", "--model", str(stories_path), "--data", str(records), "--residual-rank", "4", "--lora-rank", "4",
            "--max-steps", "2", "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert main([*base, "--prompt-distill", "0.5", "--output", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert report["prompt_distill"] == 0.5 and report["steps"] == 2
    salr.load(tmp_path / "run")
    capsys.readouterr()
    assert main([*base, "--prompt-distill", "-1", "--output", str(tmp_path / "bad")]) == 2
    assert "prompt_distill must be" in capsys.readouterr().err
    assert main([*base, "--distill", "--prompt-distill", "1", "--output", str(tmp_path / "bad2")]) == 2
    err = capsys.readouterr().err
    assert "drop --prompt-distill" in err and "Traceback" not in err

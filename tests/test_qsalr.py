"""QSALR through the pipeline: the residual absorbs pruning and quantization error, the report's fields, the
checkpoint round trip, `salr compress --quant`, fine-tuning (qsalr, qlora) and evaluation on quantized bases."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import salr
from salr.bases import QBitmapBase
from salr.cli import main
from salr.config import BLOCK_TUNING_STEPS
from salr.layer import SALRLinear
from salr.train import method_config, train


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SALRLinear)]


@pytest.mark.parametrize("quant,double_quant", [("nf4", False), ("nf4", True), ("int8", False)])
def test_residual_is_the_svd_of_pruning_plus_quantization_error(tiny_llama, quant, double_quant):
    dense = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)}
    # the paper's recipe (magnitude mask, plain SVD); tests/test_qsalr_decompose.py has the activation-aware ones
    config = salr.SALRConfig.from_preset(
        "paper", sparsity=0.5, residual_rank=8, r=4, quant=quant, quant_double=double_quant
    )
    report = salr.convert(tiny_llama, config, progress=False)
    for row in report["layers"]:
        # pruning error lives on pruned entries, quantization error on kept ones: the energies add up exactly
        assert row["pruned_energy"] + row["quantization_energy"] == pytest.approx(row["error_energy"], rel=1e-5)
        assert row["quantization_energy"] > 0 and row["residual_energy_after_svd"] <= row["theorem3_bound"]
    for name, layer in layers(tiny_llama):
        assert isinstance(layer.base, QBitmapBase) and layer.base.kind == quant
        w0, deq = dense[name].float(), layer.base.dequantize()
        r = layer.residual_rank
        residual = layer.B_cat[:, :r].float() @ layer.A_cat[:r].float()
        u, s, vh = torch.linalg.svd(w0 - deq)  # E = W0 - deq(Q(M ⊙ W0)): its best rank-r approximation
        torch.testing.assert_close(residual, (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5, rtol=1e-4)
    totals = report["totals"]
    assert totals["quant"] == quant and totals["quant_double"] == double_quant
    assert totals["quantization_energy"] == pytest.approx(sum(r["quantization_energy"] for r in report["layers"]))
    assert totals["sparsity"] == pytest.approx(0.5, abs=0.01)  # the mask's, whatever quantized to 0


def test_full_rank_residual_recovers_the_dense_layer(tiny_llama):
    x = torch.randn(3, 48)
    q_proj = copy.deepcopy(tiny_llama.model.layers[0].self_attn.q_proj)
    config = salr.SALRConfig(sparsity=0.5, residual_rank=48, r=0, quant="nf4", target_modules=["q_proj"])
    salr.convert(tiny_llama, config, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama.model.layers[0].self_attn.q_proj(x), q_proj(x), atol=1e-4, rtol=1e-4)


def test_quantized_model_saves_and_reloads_exactly_with_sizes(stories_path, tmp_path):
    model, tokenizer = salr.load_model(str(stories_path), dtype="bfloat16")
    config = salr.SALRConfig(sparsity=0.5, residual_rank=4, r=2, adapter_dtype="bfloat16", quant="nf4")
    salr.convert(model, config, progress=False)
    assert salr.pack_bases(model) == 0  # quantized bases are bitmaps already
    model.eval()  # converted layers start in training mode; eval takes the fused decode path, as the loaded model
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    salr.save(model, tmp_path / "q", config, tokenizer=tokenizer)
    meta = json.loads((tmp_path / "q" / "salr_config.json").read_text())
    assert meta["base_format"] == "qbitmap" and "model.safetensors" in meta["files"]
    loaded, _ = salr.load(tmp_path / "q")
    base = loaded.model.layers[0].mlp.up_proj.base
    assert isinstance(base, QBitmapBase) and base.dtype == torch.bfloat16 and base.absmax.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    sizes = salr.checkpoint.size_report(loaded, tmp_path / "q")
    assert sizes["ideal_bytes"] < sizes["checkpoint_bytes"] < sizes["dense_bytes"]
    assert sizes["base_bytes"] < sizes["checkpoint_bytes"]
    # a corrupted weights file is caught by the checksum before anything is loaded
    path = tmp_path / "q" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(salr.SALRError, match="sha256"):
        salr.load(tmp_path / "q")


def test_casting_a_loaded_quantized_checkpoint_keeps_the_format(stories_path, tmp_path):
    model, _ = salr.load_model(str(stories_path))
    config = salr.SALRConfig(sparsity=0.5, residual_rank=4, r=2, quant="nf4", quant_double=True)
    salr.convert(model, config, progress=False)
    salr.save(model, tmp_path / "q", config)
    loaded, _ = salr.load_model(str(tmp_path / "q"), dtype="bfloat16")
    base = loaded.model.layers[1].attention.wq.base if hasattr(loaded.model.layers[1], "attention") else None
    base = base or loaded.model.layers[1].self_attn.q_proj.base
    assert base.dtype == torch.bfloat16 and base.nested_absmax.dtype == torch.float32
    reference = model.model.layers[1].self_attn.q_proj.base
    assert torch.equal(base.dequantize(), reference.dequantize())


def test_compress_cli_reports_quantization_and_bytes(stories_path, tmp_path, capsys):
    out = tmp_path / "Q"
    argv = ["compress", "--model", str(stories_path), "--sparsity", "0.5", "--residual-rank", "8", "--lora-rank", "4"]
    assert main([*argv, "--quant", "nf4", "--quant-double", "--output", str(out)]) == 0
    report = json.loads((out / "salr_report.json").read_text())
    totals = report["totals"]
    assert totals["quant"] == "nf4" and totals["quant_double"] is True
    assert (totals["quant_scales"], totals["quant_rounding"]) == ("search", "gptq")  # salr+: calibrated
    assert set(totals) >= {"checkpoint_bytes", "ideal_bytes", "dense_bytes", "base_bytes", "quantization_energy"}
    assert totals["base_bytes"] < totals["checkpoint_bytes"] <= 1.2 * totals["ideal_bytes"]
    for row in report["layers"]:
        assert set(row) >= {"pruned_energy", "quantization_energy", "error_energy", "residual_energy_after_svd"}
    printed = capsys.readouterr().out
    assert "quantization: nf4 in blocks of 64 + double-quantized scales, search scales, gptq rounding" in printed
    assert "dense bf16 model" in printed
    loaded, _ = salr.load(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj.base, QBitmapBase)


def test_quant_blocksize_32_stores_finer_scales_and_reloads_exactly(stories_path, tmp_path):
    """`--quant-blocksize 32`: the same compression with twice the scales: less quantization error, more bytes,
    blocks of 32 in the file, and the reloaded model computes exactly what was saved."""
    argv = ["compress", "--model", str(stories_path), "--sparsity", "0.5", "--residual-rank", "8", "--lora-rank", "4",
            "--preset", "paper", "--quant", "nf4", "--quiet"]  # fmt: skip
    totals = {}
    for blocksize in (64, 32):
        out = tmp_path / f"q{blocksize}"
        assert main([*argv, "--quant-blocksize", str(blocksize), "--output", str(out)]) == 0
        totals[blocksize] = json.loads((out / "salr_report.json").read_text())["totals"]
        assert totals[blocksize]["quant_blocksize"] == blocksize
    assert totals[32]["quantization_energy"] < 0.95 * totals[64]["quantization_energy"]
    assert totals[64]["base_bytes"] < totals[32]["base_bytes"]
    assert totals[64]["ideal_bytes"] < totals[32]["ideal_bytes"]
    loaded, _ = salr.load(tmp_path / "q32")
    base = loaded.model.layers[0].mlp.up_proj.base
    assert isinstance(base, QBitmapBase) and base.blocksize == 32 and base.absmax.numel() == -(-base.nnz // 32)
    model, _ = salr.load_model(str(stories_path))
    config = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=8, r=4, quant="nf4", quant_blocksize=32)
    salr.convert(model, config, progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.base.dequantize(), base.dequantize())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--quant", "nf4", "--base-format", "dense"], "drop --base-format dense"),
        (["--quant-double"], "quant_double quantizes the scales"),
        (["--quant-blocksize", "32"], "quant_blocksize sizes the scale blocks"),
    ],
)
def test_bad_quant_arguments_give_one_clear_line(stories_path, tmp_path, capsys, extra, message):
    argv = ["compress", "--model", str(stories_path), "--residual-rank", "4", "--output", str(tmp_path / "x")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_qsalr_and_qlora_methods():
    base = salr.SALRConfig(sparsity=0.5, residual_rank=4, r=8, lora_alpha=16)
    qsalr = method_config("qsalr", base)
    assert (qsalr.quant, qsalr.sparsity, qsalr.residual_rank, qsalr.r, qsalr.train_residual) == (
        "nf4",
        0.5,
        4,
        8,
        True,
    )
    assert method_config("qsalr", salr.SALRConfig(quant="int8")).quant == "int8"
    qlora = method_config("qlora", base)
    # QLoRA: every weight kept and quantized, one LoRA block of SALR's trainable rank at SALR's LoRA scale
    assert (qlora.quant, qlora.sparsity, qlora.residual_rank, qlora.r, qlora.lora_scale) == ("nf4", 0.0, 0, 12, 2.0)


def test_qsalr_and_qlora_train_only_adapters_and_match_parameter_counts(tiny_llama, tmp_path):
    from tests.test_train import cfg, snapshot, tiny_examples

    base = salr.SALRConfig(sparsity=0.5, residual_rank=4, r=4, lora_alpha=8)
    counts = {}
    for method in ("qsalr", "qlora", "salr"):
        config = method_config(method, base)
        model = copy.deepcopy(tiny_llama)
        salr.convert(model, config, progress=False)
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if method == "qlora":
            qlora_base = model.model.layers[0].mlp.up_proj.base
        if method == "salr":
            continue
        before = snapshot(model)
        report = train(model, None, tiny_examples(), config, cfg(max_steps=6), tmp_path / method)
        assert report["final_loss"] < report["history"][0]["loss"]
        after = model.state_dict()
        for name, value in before.items():
            changed = not torch.equal(value, after[name])
            assert changed == name.endswith(("A_cat", "B_cat")), name  # codes, scales, bitmaps: bit for bit
        reloaded, _ = salr.load(tmp_path / method)
        assert isinstance(reloaded.model.layers[0].mlp.up_proj.base, QBitmapBase)
    assert counts["qsalr"] == counts["qlora"] == counts["salr"] > 0
    assert qlora_base.nnz == qlora_base.rows * qlora_base.cols  # QLoRA keeps every weight


def test_eval_prunes_and_quantizes_on_the_fly(stories_path, wikitext_path, tmp_path):
    out = tmp_path / "e.json"
    argv = ["eval", "--model", str(stories_path), "--task", "wikitext2", "--data", str(wikitext_path)]
    assert main([*argv, "--limit", "2", "--quant", "nf4", "--residual-rank", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["pruning"]["quant"] == "nf4" and report["pruning"]["totals"]["quantization_energy"] > 0
    assert report["pruning"]["block_tuning_steps"] == BLOCK_TUNING_STEPS  # a quantized base is tuned by default
    assert report["metrics"]["perplexity"] > 1
    argv += ["--limit", "2", "--quant", "nf4", "--residual-rank", "4", "--block-tuning-steps", "0"]
    assert main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["pruning"]["block_tuning_steps"] == 0


def test_moe_experts_get_quantized_bases_and_reload_exactly(tiny_mixtral, tmp_path):
    config = salr.SALRConfig(sparsity=0.5, residual_rank=4, r=2, quant="nf4")
    salr.convert(tiny_mixtral, config, progress=False)
    experts = tiny_mixtral.model.layers[0].mlp.experts
    assert all(isinstance(b, QBitmapBase) for b in [*experts.gate_up_proj.bases, *experts.down_proj.bases])
    tiny_mixtral.eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_mixtral(ids).logits
    salr.save(tiny_mixtral, tmp_path / "moe", config)
    loaded, _ = salr.load(tmp_path / "moe")
    assert isinstance(loaded.model.layers[1].mlp.experts.down_proj.bases[3], QBitmapBase)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_train_cli_on_a_qsalr_checkpoint(stories_path, tmp_path):
    gsm8k = stories_path.parents[2] / "gsm8k" / "train.jsonl"
    ckpt, run = tmp_path / "q", tmp_path / "run"
    argv = ["compress", "--model", str(stories_path), "--residual-rank", "4", "--lora-rank", "4", "--quant", "nf4"]
    assert main([*argv, "--quiet", "--output", str(ckpt)]) == 0
    argv = ["train", "--model", str(ckpt), "--data", str(gsm8k), "--limit", "8", "--output", str(run)]
    assert main([*argv, "--max-steps", "2", "--batch-size", "4", "--max-length", "384", "--no-progress"]) == 0
    trained, _ = salr.load(run)
    before, _ = salr.load(ckpt)
    layer, old = trained.model.layers[0].mlp.up_proj, before.model.layers[0].mlp.up_proj
    assert isinstance(layer.base, QBitmapBase) and torch.equal(layer.base.codes, old.base.codes)
    assert not torch.equal(layer.B_cat, old.B_cat)  # the adapters trained on the quantized base

"""`salr bench` on quantized bases (QSALR): the kernel case's JSON contract, the Triton interpreter check, checkpoint
bytes, and generation with a QSALR model beside SALR."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from salr.bench.checkpoint_size import checkpoint_case
from salr.bench.generation import generation_report
from salr.bench.models import random_llama
from salr.commands import bench as bench_cmd
from salr.errors import SALRError


def _run(argv):
    parser = argparse.ArgumentParser()
    bench_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_kernel_case_json_contract(tmp_path, quant):
    out = tmp_path / "k.json"
    argv = ["--kernel", "--quant", quant, "--shape", "96x136", "--tokens", "1", "--sparsity", "0.5"]
    assert _run([*argv, "--budget", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("dense_bf16_ms", "dense_fp32_ms", "bitmap_ms", "bitmap_bf16_ms", "speedup_vs_bitmap_bf16"):
        assert r[key] > 0
    assert r["quant"] == quant and r["backend"].startswith(("cpu-", "reference"))
    assert r["speedup_vs_dense_bf16"] == pytest.approx(r["dense_bf16_ms"] / r["bitmap_ms"])
    assert r["max_rel_err"] < 1e-2  # against the dequantized weight: the kernel is exact up to rounding
    # 1 bit per weight + half the weights at 4.5 bits (nf4) or 8.5 bits (int8), blocks of 64
    per_value = 4.5 if quant == "nf4" else 8.5
    assert r["bits_per_weight"] == pytest.approx(1 + r["density"] * per_value, rel=0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter mode only")
def test_triton_interpreter_quantized_kernel_check(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "t.json"
    argv = ["--kernel", "--backend", "triton", "--quant", "nf4", "--shape", "64x256", "--tokens", "3"]
    assert _run([*argv, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["backend"] == "triton-interpreter" and r["quant"] == "nf4" and r["snr_db"] > 40


def test_quant_is_refused_where_the_benchmark_has_no_quantized_case():
    with pytest.raises(SALRError, match="--quant applies to"):
        _run(["--train-memory", "--quant", "nf4"])


def test_checkpoint_case_with_nf4_bases():
    shape = {"vocab_size": 96, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1}
    shape.update(num_attention_heads=4, num_key_value_heads=2)
    model = random_llama("cpu", torch.bfloat16, **shape)
    plain = checkpoint_case(model, "tiny", sparsity=0.5, residual_rank=8, lora_rank=8)
    nf4 = checkpoint_case(model, "tiny", sparsity=0.5, residual_rank=8, lora_rank=8, quant="nf4")
    assert nf4["salr_config"]["quant"] == "nf4"
    # row offsets: 8 bytes per row against 256 * 3.25 / 8 = 104 payload bytes (~5 % of this tiny checkpoint)
    assert 0 <= nf4["over_ideal"] < 0.08
    # bases: 9 bits per weight at 50 % bf16 vs 3.25 with NF4, plus the 8-byte row offsets (0.25 bit/weight at 256
    # columns)
    assert plain["base_compression_vs_dense_bf16"] == pytest.approx(16 / 9, rel=0.05)
    assert 16 / (3.25 + 0.25) < nf4["base_compression_vs_dense_bf16"] < 16 / 3.25
    assert nf4["salr_checkpoint_bytes"] < plain["salr_checkpoint_bytes"]


@pytest.mark.slow
def test_generate_report_with_qsalr(stories_path):
    r = generation_report(str(stories_path), max_new_tokens=4, rounds=1, residual_rank=4, lora_rank=4, quant="nf4")
    assert set(r["results"]) == {"dense_bf16", "dense_fp32", "salr", "qsalr", "no_linears"}
    assert r["qsalr_config"]["quant"] == "nf4" and r["results"]["qsalr"]["peak_rss_mib"] > 0
    assert r["qsalr_speedup_vs_dense_bf16"] == pytest.approx(
        r["results"]["qsalr"]["decode_tokens_per_s"] / r["results"]["dense_bf16"]["decode_tokens_per_s"]
    )

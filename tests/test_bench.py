"""Benchmark plumbing (never timings): byte accounting, shape parsing, JSON contracts of `salr bench`, the
Llama-3-8B-shaped builder, checkpoint bytes on disk, generation and training helpers on tiny models."""

import argparse
import json
import os
import platform

import pytest
import torch

from salr import memory
from salr.bases import BitmapBase
from salr.bench import training as bench_training
from salr.bench.checkpoint_size import checkpoint_case, checkpoint_sizes
from salr.bench.generation import (
    _ZeroLinear,
    generation_bench,
    generation_compare,
    generation_report,
    pick_onednn,
    timed_linears_ms,
    without_decoder_linears,
)
from salr.bench.kernel import dense_bf16_paths, kernel_case, parse_shape, pruned_weight, weight_bytes
from salr.bench.models import LLAMA3_8B, TINYLLAMA_1B, bench_model, random_llama, salr_copy
from salr.bench.timing import cold_caches, in_child, onednn, time_interleaved
from salr.bench.training import _over_runtime, enable_checkpointing, method_model, train_memory, train_steps
from salr.commands import bench as bench_cmd
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.ops import cpu as cpu_kernel
from salr.pruning import unstructured_mask


def test_weight_bytes_at_half_sparsity():
    b = weight_bytes((4096, 4096), 4096 * 4096 // 2)
    assert b["dense_bytes"] == 2 * 4096 * 4096
    assert b["bitmap_ideal_bytes"] == 4096 * 4096 // 8 + 4096 * 4096
    assert b["bits_per_weight"] == pytest.approx(9.0)
    assert b["compression"] == pytest.approx(16 / 9)
    assert b["row_offsets_bytes"] == 8 * 4096


def test_pruned_weight_has_requested_sparsity():
    w = pruned_weight(64, 80, 0.5)
    assert (w == 0).sum().item() == 64 * 80 // 2
    kept = w[w != 0].abs().min()
    assert kept >= pruned_weight(64, 80, 0.0).abs()[w == 0].max()  # magnitude pruning: smallest go


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.9])
def test_pruned_weight_is_the_library_unstructured_mask(sparsity):
    rows, cols = 37, 53
    w = pruned_weight(rows, cols, sparsity, seed=3)
    assert (w != 0).sum().item() == round((1 - sparsity) * rows * cols)
    dense = pruned_weight(rows, cols, 0.0, seed=3)  # the same Gaussian draw, nothing pruned
    assert torch.equal(w != 0, unstructured_mask(dense, sparsity))
    assert torch.equal(w, dense * unstructured_mask(dense, sparsity))


def test_pruned_weight_rejects_bad_sparsity():
    with pytest.raises(SALRError, match="sparsity"):
        pruned_weight(4, 4, 1.0)


@pytest.mark.parametrize("text, shape", [("4096x4096", (4096, 4096)), ("14336X4096", (14336, 4096))])
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["4096", "ax4", "0x5", "3x4x5"])
def test_parse_shape_rejects(text):
    with pytest.raises(SALRError):
        parse_shape(text)


def _run(argv):
    parser = argparse.ArgumentParser()
    bench_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_single_case_json_contract(tmp_path, backend):
    out = tmp_path / "b.json"
    argv = ["--kernel", "--shape", "96x136", "--tokens", "3", "--budget", "0", "--json", str(out)]
    assert _run([*argv, "--backend", backend]) == 0
    r = json.loads(out.read_text())
    for key in ("dense_bf16_ms", "dense_fp32_ms", "bitmap_ms", "speedup_vs_dense_bf16", "speedup_vs_dense_fp32"):
        assert r[key] > 0
    assert r["speedup_vs_dense_bf16"] == pytest.approx(r["dense_bf16_ms"] / r["bitmap_ms"])
    assert r["shape"] == [96, 136] and r["tokens"] == 3 and r["density"] == pytest.approx(0.5, abs=1e-3)
    assert r["backend"] == "reference" if backend == "reference" else r["backend"].startswith(("cpu-", "reference"))
    assert r["max_rel_err"] < 1e-2  # bf16 output of the same bf16 weight


@pytest.mark.parametrize("choice, paths", [("auto", {"onednn", "native"}), ("on", {"onednn"}), ("off", {"native"})])
def test_dense_bf16_is_timed_on_torchs_paths_and_the_faster_is_the_baseline(tmp_path, choice, paths):
    out = tmp_path / "b.json"
    argv = ["--kernel", "--shape", "96x136", "--tokens", "1", "--budget", "0", "--onednn", choice]
    assert _run([*argv, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {p for p in ("onednn", "native") if f"dense_bf16_{p}_ms" in r} == paths
    assert r["dense_bf16_path"] in paths
    assert r["dense_bf16_ms"] == min(r[f"dense_bf16_{p}_ms"] for p in paths)
    assert r["dense_bf16_ms"] == r[f"dense_bf16_{r['dense_bf16_path']}_ms"]
    assert r["speedup_vs_dense_bf16"] == pytest.approx(r["dense_bf16_ms"] / r["bitmap_ms"])


def test_dense_bf16_paths_on_a_gpu_and_a_bad_choice():
    assert dense_bf16_paths("auto", torch.device("cuda")) == {"dense_bf16": True}
    with pytest.raises(SALRError, match="--onednn"):
        dense_bf16_paths("maybe", torch.device("cpu"))
    with pytest.raises(SALRError, match="--onednn"):
        pick_onednn(torch.nn.Linear(2, 2), "maybe")


def test_onednn_context_sets_and_restores_torchs_flag():
    before = torch.backends.mkldnn.enabled
    for enabled in (False, True):
        with onednn(enabled):
            assert torch.backends.mkldnn.enabled is enabled
        assert torch.backends.mkldnn.enabled is before
    with pytest.raises(RuntimeError), onednn(not before):
        raise RuntimeError("restored on the way out of an error too")
    assert torch.backends.mkldnn.enabled is before


def test_time_interleaved_runs_each_function_inside_its_own_context():
    seen = {"off": set(), "on": set(), "plain": set()}
    fns = {name: (lambda name=name: seen[name].add(torch.backends.mkldnn.enabled)) for name in seen}
    ms = time_interleaved(fns, torch.device("cpu"), min_rounds=3, budget_s=0,
                          contexts={"off": lambda: onednn(False), "on": lambda: onednn(True)})  # fmt: skip
    assert seen == {"off": {False}, "on": {True}, "plain": {torch.backends.mkldnn.enabled}}
    assert set(ms) == set(fns) and all(v > 0 for v in ms.values())


def test_decode_steps_run_under_the_chosen_onednn_setting_and_restore_it(tiny_llama, monkeypatch):
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    seen = []
    forward = tiny_llama.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["input_ids"].shape[1], torch.backends.mkldnn.enabled))
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_llama, "forward", spy)
    before = torch.backends.mkldnn.enabled
    runs = {setting: generation_bench(tiny_llama, ids, 3, decode_onednn=setting) for setting in (None, False, True)}
    assert torch.backends.mkldnn.enabled is before
    assert runs[None]["token_ids"] == runs[False]["token_ids"] == runs[True]["token_ids"]
    prefills = [enabled for n, enabled in seen if n == 5]
    decodes = [enabled for n, enabled in seen if n == 1]
    assert prefills == [before] * 3  # the prefill keeps torch's setting
    assert decodes == [before] * 3 + [False] * 3 + [True] * 3


def test_time_interleaved_runs_each_timed_call_after_an_untimed_one_and_before_call():
    log = []
    fns = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    before = lambda name: log.append(name.upper())  # noqa: E731
    time_interleaved(fns, torch.device("cpu"), min_rounds=4, budget_s=0, before_call=before)
    # one timed call per sample, right after its own before_call, which follows an untimed call of the same
    # function (the warm-up call of each function comes first)
    assert log[:2] == ["a", "b"]
    samples = log[2:]
    assert len(samples) % 3 == 0
    for i in range(0, len(samples), 3):
        untimed, flush, timed = samples[i : i + 3]
        assert untimed == timed and flush == timed.upper()
    assert samples[1::3].count("A") == samples[1::3].count("B") >= 4


@pytest.mark.skipif(not cpu_kernel.available(), reason="native kernel not built (python setup.py build_ext -i)")
def test_flush_from_caches_keeps_the_data_and_refuses_other_devices():
    t = torch.randn(1000, 37)
    before = t.clone()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    assert cpu_kernel.flush_from_caches([t, t[3:], torch.empty(0)]) is x86
    assert torch.equal(t, before)
    assert cpu_kernel.flush_from_caches([torch.empty(3, device="meta")]) is False


def test_cold_caches_flushes_each_functions_own_weights(monkeypatch):
    flushed = []
    monkeypatch.setattr(cpu_kernel, "flush_from_caches", lambda ts: flushed.append([id(t) for t in ts]) or True)
    a, b = torch.ones(4), torch.ones(5)
    before = cold_caches({"dense": [a], "bitmap": [b, a]})
    flushed.clear()
    before("bitmap")
    before("dense")
    assert flushed == [[id(b), id(a)], [id(a)]]


def test_cold_caches_without_a_flush_reads_a_buffer_larger_than_the_cache(monkeypatch):
    from salr.bench import timing

    tried, read = [], []
    monkeypatch.setattr(cpu_kernel, "flush_from_caches", lambda ts: tried.append(ts) or False)
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 1 << 16)
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: read.append(self.numel()))
    before = cold_caches({"dense": [torch.ones(4)]})
    before("dense")
    before("dense")
    assert len(tried) == 1  # asked once whether a flush exists, then only the buffer
    assert read == [2 * (1 << 16) // 4] * 2  # twice the last-level cache, read before every call


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_kernel_case_reports_its_cache_setting(cache):
    case = kernel_case((24, 40), 1, budget_s=0, cache=cache)
    assert case["cache"] == cache and case["bitmap_ms"] > 0 and case["max_rel_err"] < 1e-2
    with pytest.raises(SALRError, match="--cache"):
        kernel_case((24, 40), 1, budget_s=0, cache="lukewarm")


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_kernel_case_says_whether_its_weights_are_on_huge_pages(quant, monkeypatch):
    from salr import hugepages

    placed = kernel_case((24, 64), 1, budget_s=0, quant=quant)["weights_on_huge_pages"]
    assert placed is hugepages.huge_pages_available()
    monkeypatch.setenv("SALR_HUGE_PAGES", "0")
    assert kernel_case((24, 64), 1, budget_s=0, quant=quant)["weights_on_huge_pages"] is False


def test_generation_picks_one_onednn_setting_for_every_model(tiny_llama):
    assert pick_onednn(tiny_llama, "off") == {"choice": "off", "enabled": False}
    assert pick_onednn(tiny_llama, "on") == {"choice": "on", "enabled": True}
    auto = pick_onednn(tiny_llama, "auto")
    largest = max((m.weight for m in tiny_llama.modules() if isinstance(m, torch.nn.Linear)
                   and m is not tiny_llama.get_output_embeddings()), key=torch.numel)  # fmt: skip
    assert auto["probe_shape"] == list(largest.shape)
    assert auto["enabled"] == (auto["probe_ms"]["onednn"] <= auto["probe_ms"]["native"])


@pytest.mark.skipif(not cpu_kernel.available(), reason="native kernel not built (python setup.py build_ext -i)")
@pytest.mark.parametrize("tiles", ["fp32", "bf16"])
def test_many_token_label_names_the_tile_path(tmp_path, monkeypatch, tiles):
    """Above the gemv's token count the label says which tiles ran: sgemm on fp32 tiles, bf16 matmul on bf16 ones."""
    if tiles == "bf16":
        monkeypatch.setattr(cpu_kernel, "_native_bf16_matmul", lambda: True)
        monkeypatch.delenv("SALR_CPU_TILES", raising=False)
    else:
        monkeypatch.setenv("SALR_CPU_TILES", "fp32")
    out = tmp_path / "b.json"
    assert _run(["--kernel", "--shape", "96x136", "--tokens", "20", "--budget", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["backend"].endswith("-decode+bf16mm" if tiles == "bf16" else "-decode+sgemm")
    assert r["max_rel_err"] < 1e-2


def test_grid_json_has_every_case(tmp_path):
    out = tmp_path / "g.json"
    argv = ["--kernel", "--shape", "16x24", "--shape", "24x16", "--tokens", "1", "--tokens", "9"]
    assert _run([*argv, "--budget", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(c["shape"], c["tokens"]) for c in r["results"]] == [
        ([16, 24], 1), ([16, 24], 9), ([24, 16], 1), ([24, 16], 9),
    ]  # fmt: skip
    assert r["environment"]["threads"] >= 1


def test_bad_arguments_raise(monkeypatch):
    with pytest.raises(SALRError, match="--generate") as err:  # no mode: the error lists what can run
        _run([])
    for mode in ("--kernel", "--checkpoint", "--train-memory"):
        assert mode in str(err.value)
    with pytest.raises(SALRError, match="one benchmark"):
        _run(["--kernel", "--generate"])
    with pytest.raises(SystemExit):  # a usage error of argparse: "argument --batch: must be >= 1, got 0"
        _run(["--train-memory", "--batch", "0"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SALRError, match="CUDA"):
        _run(["--kernel", "--shape", "8x8", "--tokens", "1", "--backend", "triton"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
@pytest.mark.parametrize("mode", ["--generate", "--train-memory", "--kernel"])
def test_device_cuda_without_gpu_is_a_clear_error(mode):
    with pytest.raises(SALRError, match="no CUDA device"):
        _run([mode, "--device", "cuda"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter mode only")
def test_triton_interpreter_kernel_check(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # conftest set it before triton was imported
    out = tmp_path / "t.json"
    argv = ["--kernel", "--backend", "triton", "--shape", "128x256", "--tokens", "16", "--json", str(out)]
    assert _run(argv) == 0
    r = json.loads(out.read_text())
    assert r["backend"] == "triton-interpreter" and r["shape"] == [128, 256] and r["tokens"] == 16
    assert r["snr_db"] > 40  # bf16 output rounding gives ~55 dB; a wrong kernel gives < 10
    assert r["max_abs_err"] < 0.05 * r["max_abs_ref"]


def _tiny_llama_shape():
    return {"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "vocab_size": 96}  # fmt: skip


def test_random_llama_has_requested_shapes_and_runs():
    model = random_llama("cpu", torch.bfloat16, **_tiny_llama_shape())
    layer = model.model.layers[0]
    assert layer.self_attn.k_proj.weight.shape == (2 * 16, 64)  # kv heads * head_dim, hidden
    assert layer.mlp.down_proj.weight.shape == (64, 160)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.device.type == "cpu"
    std = float(layer.mlp.up_proj.weight.detach().float().std())
    assert 0.018 < std < 0.022 and float(layer.input_layernorm.weight.detach().min()) == 1.0
    assert bool(torch.isfinite(model.model.rotary_emb.inv_freq).all())
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 96) and bool(torch.isfinite(logits).all())
    assert LLAMA3_8B["intermediate_size"] == 14336 and LLAMA3_8B["num_key_value_heads"] == 8


def test_checkpoint_case_measures_files_on_disk():
    shape = {**_tiny_llama_shape(), "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1}
    model = random_llama("cpu", torch.bfloat16, **shape)
    c = checkpoint_case(model, "tiny", sparsity=0.5, residual_rank=8, lora_rank=8)
    linears = [m.weight for n, m in model.named_modules() if n.endswith("_proj")]
    n = sum(w.numel() for w in linears)
    # ideal = 1 bit + one bf16 value per kept weight (exactly half: per-layer magnitude threshold on random weights)
    adapters = 2 * 16 * sum(sum(w.shape) for w in linears)
    other = 2 * (2 * 96 * 256 + 3 * 256)  # embeddings + lm_head + 3 norms, dense in both
    assert c["adapter_bytes"] == adapters
    assert c["salr_ideal_bytes"] == pytest.approx(n // 8 + n + adapters + other, rel=1e-3)
    assert 0 <= c["over_ideal"] < 0.03  # row offsets (8 bytes/row) + safetensors header
    assert c["compression_vs_dense"] == pytest.approx(c["dense_checkpoint_bytes"] / c["salr_checkpoint_bytes"])
    assert c["dense_checkpoint_bytes"] > 2 * (n + 2 * 96 * 256)  # the dense file holds every bf16 weight


def test_checkpoint_sizes_json_contract():
    r = checkpoint_sizes(None, residual_rank=4, lora_rank=4, llama_layer=_tiny_llama_shape())
    (case,) = r["cases"]
    assert case["name"] == "llama3-8b-shaped-layer" and case["shape"]["hidden_size"] == 64
    assert case["shape"]["vocab_size"] == 96
    assert case["compression_vs_dense"] == pytest.approx(
        case["dense_checkpoint_bytes"] / case["salr_checkpoint_bytes"]
    )
    assert case["over_ideal"] == pytest.approx(case["salr_checkpoint_bytes"] / case["salr_ideal_bytes"] - 1)
    assert case["salr_config"]["residual_rank"] == 4 and case["salr_config"]["r"] == 4
    assert not [k for k in (*r, *case) if "target" in k]  # measurements only: no acceptance targets


def test_generation_compare_same_tokens_for_lossless_salr(stories):
    model, tok = stories
    model = model.float()
    salr_model, config = salr_copy(model, SALRConfig.from_preset("paper", sparsity=0.0, residual_rank=0, r=0))
    assert isinstance(salr_model.model.layers[0].mlp.up_proj.base, BitmapBase)
    assert config.adapter_dtype == "float32"
    ids = torch.tensor([[1, 50, 60, 70]])
    r = generation_compare({"dense": model, "salr": salr_model}, ids, max_new_tokens=6, rounds=2)
    assert r["dense"]["token_ids"] == r["salr"]["token_ids"] and len(r["dense"]["token_ids"]) == 7
    for v in r.values():
        assert v["decode_tokens_per_s"] > 0 and len(v["decode_tokens_per_s_rounds"]) == 2
    assert r["salr"]["model_bytes"] < r["dense"]["model_bytes"] * 1.2  # bitmap of a full weight: 1 bit + value


def test_train_steps_update_only_adapters(stories):
    model, _ = stories
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    counts = {}
    for method in ("lora", "salr"):
        m = method_model(model, method, SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=4))
        frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
        trained = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        stats = train_steps(m, ids, steps=2, lr=1e-2)
        assert len(stats["losses"]) == 2 and all(torch.isfinite(torch.tensor(stats["losses"])))
        assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)
        assert any(not torch.equal(p, trained[n]) for n, p in m.named_parameters() if n in trained)
        counts[method] = stats["trainable_parameters"]
    assert counts["lora"] == counts["salr"]  # LoRA gets SALR's total rank


def test_layers_option_reaches_the_children_and_rejects_loaded_models(monkeypatch):
    with pytest.raises(SALRError, match="--layers needs"):
        _run(["--train-memory", "--model", "default", "--layers", "2"])
    with pytest.raises(SystemExit):  # argparse: "argument --layers: must be >= 1, got 0"
        _run(["--train-memory", "--model", "tinyllama-shape", "--layers", "0"])
    seen = []

    def fake_child(fn, *args):
        seen.append(args)
        return {"peak_rss_mib": 2.0, "rss_runtime_mib": 1.0, "step_ms": 1.0}

    monkeypatch.setattr(bench_training, "in_child", fake_child)
    r = train_memory("tinyllama-shape", "cpu", layers=3)
    assert [a[-1] for a in seen] == [3, 3] and r["layers"] == 3
    assert bench_training._layer_overrides(3) == {"num_hidden_layers": 3}
    assert bench_training._layer_overrides(None) == {}


def test_child_process_reports_its_own_numbers():
    assert in_child(os.getpid) != os.getpid()
    assert 0 < memory.peak_rss_mib() and memory.rss_mib() <= memory.peak_rss_mib() + 1


@pytest.mark.slow
def test_train_memory_cpu_runs_both_methods(stories_path):
    r = train_memory(str(stories_path), "cpu", batch=2, seq=16, steps=2, residual_rank=4, lora_rank=4)
    assert set(r["results"]) == {"lora", "salr"} and r["peak_metric"] == "peak_rss_mib"
    assert r["lora_baseline_rank"] == 8 and not [k for k in r if "target" in k]
    assert r["salr_over_lora_peak"] == pytest.approx(
        r["results"]["salr"]["peak_rss_mib"] / r["results"]["lora"]["peak_rss_mib"]
    )


@pytest.mark.slow
def test_generate_report_on_stories(stories_path):
    r = generation_report(str(stories_path), max_new_tokens=4, rounds=1, residual_rank=4, lora_rank=4)
    assert set(r["results"]) == {"dense_bf16", "dense_fp32", "salr", "no_linears"}
    assert r["onednn"]["choice"] == "auto" and isinstance(r["onednn"]["enabled"], bool)
    measured = {k: v for k, v in r["results"].items() if k != "no_linears"}
    assert all(v["peak_rss_mib"] > v["rss_baseline_mib"] > 0 for v in measured.values())
    assert r["salr_speedup_vs_dense_bf16"] == pytest.approx(
        r["results"]["salr"]["decode_tokens_per_s"] / r["results"]["dense_bf16"]["decode_tokens_per_s"]
    )
    assert not [k for k in r if "target" in k]  # measurements only: no acceptance targets
    b = r["breakdown"]
    assert b["ms_per_token"]["salr"] == pytest.approx(1e3 / r["results"]["salr"]["decode_tokens_per_s"])
    assert b["linears_ms"]["salr"] == pytest.approx(b["ms_per_token"]["salr"] - b["outside_linears_ms"])


def test_generate_report_with_a_static_cache_gives_the_same_tokens(stories_path):
    """--static-cache: every model decodes with transformers' StaticCache; the tokens are the dynamic cache's."""
    kwargs = dict(max_new_tokens=6, rounds=1, residual_rank=4, lora_rank=4, memory=False)
    static = generation_report(str(stories_path), static_cache=True, **kwargs)
    plain = generation_report(str(stories_path), **kwargs)
    assert static["static_cache"] is True and plain["static_cache"] is False
    assert set(plain["attention"].values()) == {"salr_decode"}  # every model alike
    sdpa = generation_report(str(stories_path), attention="sdpa", **kwargs)
    assert set(sdpa["attention"].values()) == {"sdpa"}
    assert sdpa["results"]["salr"]["token_ids"] == plain["results"]["salr"]["token_ids"]
    timed = plain["breakdown"]["timed"]  # the hooked split runs with the dynamic cache only
    assert set(timed) == {"dense_bf16", "salr"} and "timed" not in static["breakdown"]
    for split in timed.values():
        assert split["linears_ms"] > 0 and split["step_ms"] == pytest.approx(split["linears_ms"] + split["outside_ms"])


def test_timed_linears_count_only_the_named_modules_while_decoding(tiny_llama, monkeypatch):
    """A clock that ticks one second per reading: each hooked call inside a decode step adds exactly 1 s, the
    prefill's calls add nothing, and the hooks are gone afterwards."""
    from salr.bench import generation

    ticks = iter(range(10**6))
    monkeypatch.setattr(generation.time, "perf_counter", lambda: float(next(ticks)))
    names = [f"model.layers.{i}.mlp.{proj}" for i in range(2) for proj in ("up_proj", "down_proj")]
    ids = torch.tensor([[1, 2, 3, 4]])
    timed = timed_linears_ms(tiny_llama, names, ids, max_new_tokens=3)
    assert timed["linears_ms"] == pytest.approx(1e3 * len(names))
    assert timed["outside_ms"] == pytest.approx(timed["step_ms"] - timed["linears_ms"]) and timed["outside_ms"] > 0
    assert all(not tiny_llama.get_submodule(n)._forward_hooks and not tiny_llama.get_submodule(n)._forward_pre_hooks
               for n in names) and not tiny_llama._forward_pre_hooks  # fmt: skip


def test_without_decoder_linears_stubs_exactly_the_converted_layers(tiny_llama):
    salr_model, _ = salr_copy(tiny_llama, SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=2, r=2))
    stub = without_decoder_linears(tiny_llama, salr_model)
    converted = {n for n, m in salr_model.named_modules() if type(m).__name__ == "SALRLinear"}
    stubbed = {n for n, m in stub.named_modules() if isinstance(m, _ZeroLinear)}
    assert converted and stubbed == converted
    x = torch.randn(1, 3, tiny_llama.config.hidden_size)
    layer = stub.get_submodule(sorted(stubbed)[0])
    assert torch.equal(layer(x)[..., :1], torch.zeros(1, 3, 1))
    assert isinstance(tiny_llama.get_submodule(sorted(stubbed)[0]), torch.nn.Linear)  # the original is untouched
    assert stub.lm_head.weight.data_ptr() == tiny_llama.lm_head.weight.data_ptr()  # shared, not copied
    assert stub.model.embed_tokens is not tiny_llama.model.embed_tokens  # the modules are copies


def test_tinyllama_shape_spec_builds_in_memory():
    assert TINYLLAMA_1B == {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                            "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}  # fmt: skip
    small = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 1, "vocab_size": 100}
    model, tokenizer = bench_model("tinyllama-shape", "bfloat16", **small)
    assert tokenizer is None and model.lm_head.weight.dtype == torch.bfloat16
    attn = model.model.layers[0].self_attn
    assert model.config.num_attention_heads == 32 and model.config.num_key_value_heads == 4
    assert attn.k_proj.weight.shape == (4 * 2, 64) and attn.q_proj.weight.shape == (64, 64)  # head_dim 64 / 32
    assert model.config.rope_parameters["rope_theta"] == 10000.0 and model.config.max_position_embeddings == 2048
    assert not model.config.tie_word_embeddings
    with pytest.raises(SALRError, match="not found"):
        bench_model("no-such-model-spec")


def test_checkpointing_keeps_losses_and_gradients(tiny_llama):
    """Gradient checkpointing (applied to both methods by --grad-checkpoint) changes memory, not the numbers."""
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    config = SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=4)
    grads = []
    for checkpointing in (False, True):
        model = method_model(tiny_llama, "salr", config).float().train()
        if checkpointing:
            enable_checkpointing(model)
            assert model.is_activation_checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_peak_above_runtime_ratio():
    results = {"lora": {"peak_rss_mib": 1400.0, "rss_runtime_mib": 400.0},
               "salr": {"peak_rss_mib": 1200.0, "rss_runtime_mib": 400.0}}  # fmt: skip
    assert _over_runtime(results, "peak_rss_mib") == {"salr_over_lora_peak_above_runtime": pytest.approx(0.8)}
    assert _over_runtime({"lora": {"peak_memory_mib": 1.0}}, "peak_memory_mib") == {}


def test_model_bytes_counts_wrapper_subclass_tensors_by_their_inner_tensors():
    """A buffer that is a wrapper tensor subclass (as torch's 2:4 semi-structured weights are) has no storage of its
    own: model_bytes counts the tensors inside it (the GPU suite's decode stage once failed on this)."""
    from torch.testing._internal.two_tensor import TwoTensor

    from salr.bench.timing import model_bytes

    module = torch.nn.Module()
    a, b = torch.zeros(4, 8), torch.zeros(4, 8)
    module.register_buffer("pair", TwoTensor(a, b))
    module.register_buffer("plain", torch.zeros(3, dtype=torch.bfloat16))
    module.register_buffer("alias", module.plain)  # shared: counted once
    assert model_bytes(module) == 2 * 4 * 8 * 4 + 3 * 2


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_static_cache_generation_gives_the_dynamic_cache_tokens():
    """graph_generation_bench (static KV cache, warm-up steps, cache rewound; the CUDA graph itself needs a GPU) gives
    the token ids of the plain greedy loop, for a dense model and its SALR copy, with 1 and 10 new tokens (the
    warm-up steps write past a 1-token budget: the cache is sized for them)."""
    from salr.bench.generation import generation_bench, generation_compare, graph_generation_bench
    from salr.bench.models import salr_copy

    dense = _tiny_llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    salr_model, _ = salr_copy(dense, SALRConfig(sparsity=0.5, residual_rank=8, r=4))
    for model in (dense, salr_model):
        for n in (1, 10):
            plain, static = generation_bench(model, ids, n), graph_generation_bench(model, ids, n)
            assert static["token_ids"] == plain["token_ids"] and len(static["token_ids"]) == n + 1
            assert static["cuda_graph"] is False and static["decode_tokens_per_s"] > 0
    report = generation_compare({"dense": dense}, ids, 4, 2, graph_generation_bench)
    assert report["dense"]["token_ids"] == generation_bench(dense, ids, 4)["token_ids"]
    with pytest.raises(SALRError, match="CUDA graph needs the model on a CUDA device"):
        graph_generation_bench(dense, ids, 2, capture=True)


def test_a_salr_checkpoint_as_the_bench_model_is_refused_naming_its_dense_model(stories, tmp_path):
    import salr
    from salr.bench.models import bench_model

    model, tokenizer = stories
    config = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=2)
    salr.convert(model, config, progress=False)
    salr.save(model, tmp_path / "ckpt", config, tokenizer=tokenizer, base_model="stories260K")
    with pytest.raises(SALRError, match=r"already a SALR checkpoint.*made from 'stories260K'\)\.$"):
        bench_model(str(tmp_path / "ckpt"))  # no salr_report.json: none named
    (tmp_path / "ckpt" / "salr_report.json").write_text("{}")
    with pytest.raises(SALRError, match=r"made from 'stories260K'\)\. The checkpoint's own sizes are in .*report"):
        bench_model(str(tmp_path / "ckpt"))

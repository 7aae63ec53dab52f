"""End-to-end greedy generation with a KV cache: dense bf16 / fp32 vs SALR, prefill ms and decode tokens/s.

`generation_report` (CPU) also splits decode time into the converted linears and everything else
(`decode_breakdown`) and measures each model's peak RSS in a child process; `cuda_generation_compare` (GPU) adds
SALR with 2:4 bases on sparse tensor cores and reports torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salr import ops
from salr.attention import use_decode_attention
from salr.bench.models import bench_model, cuda_model, salr_copy
from salr.bench.timing import (
    ONEDNN_PATHS,
    cold_caches,
    environment,
    in_child,
    model_bytes,
    onednn,
    onednn_contexts,
    onednn_paths,
    sync,
    sync_model,
    time_interleaved,
)
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.hugepages import place_on_huge_pages
from salr.memory import peak_rss_mib, rss_mib

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue and why sunsets are red."


def _decode_setting(decode_onednn: bool | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if decode_onednn is None else onednn(decode_onednn)


def generation_bench(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32, decode_onednn: bool | None = None
) -> dict[str, Any]:
    """Greedy generation of an already-built model (dense or with SALR layers) from `input_ids` [1, prompt]:
    prefill ms, decode tokens/s and the generated token ids (the first comes from the prefill). `decode_onednn`:
    the decode steps' oneDNN setting (`timing.onednn`; None: torch's); the prefill keeps torch's."""
    model.eval()
    with torch.inference_mode():
        sync_model(model)
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        sync_model(model)
        prefill_s = time.perf_counter() - t0
        past = out.past_key_values
        tokens = [token]
        with _decode_setting(decode_onednn):
            t0 = time.perf_counter()
            for _ in range(max_new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(token)
            sync_model(model)
            decode_s = time.perf_counter() - t0
    return {
        "prompt_tokens": int(input_ids.shape[-1]),
        "new_tokens": max_new_tokens,
        "prefill_ms": 1e3 * prefill_s,
        "decode_tokens_per_s": max_new_tokens / decode_s if decode_s > 0 else float("inf"),
        "token_ids": torch.cat(tokens, -1)[0].tolist(),
    }


GRAPH_WARMUP_STEPS = 3  # eager decode steps before a CUDA graph is captured (they also autotune Triton kernels)


def _rewind(cache: Any, length: int) -> None:
    """Set a StaticCache back to `length` cached tokens. transformers 5.x keeps each layer's write position in a
    device tensor (`cumulative_length`, advanced in place so a CUDA graph can replay the update); the slots after it
    are overwritten in order and masked until then."""
    for layer in cache.layers:
        filled = getattr(layer, "cumulative_length", None)
        if isinstance(filled, torch.Tensor):
            filled.fill_(length)


def graph_generation_bench(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    capture: bool | None = None,
    decode_onednn: bool | None = None,
) -> dict[str, Any]:
    """`generation_bench` with a static KV cache (transformers' StaticCache) and, on CUDA, each decode step replayed
    from one captured CUDA graph (what gpt-fast does): the host's per-layer Python and launch cost leaves the timed
    loop, for dense and SALR models alike. `capture` defaults to whether the model is on CUDA; without it the same
    static-cache steps run eagerly (how the CPU tests check the token ids). `decode_onednn` as generation_bench."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    capture = device.type == "cuda" if capture is None else capture
    if capture and device.type != "cuda":
        raise SALRError(f"a CUDA graph needs the model on a CUDA device, it is on {device}: pass capture=False")
    prompt = input_ids.shape[-1]
    model.eval()
    with torch.inference_mode(), contextlib.ExitStack() as decoding:
        cache = StaticCache(config=model.config, max_cache_len=prompt + max(max_new_tokens, GRAPH_WARMUP_STEPS) + 1)
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device))
        first = out.logits[:, -1:].argmax(-1)
        sync(device)
        prefill_s = time.perf_counter() - t0
        token, position = first.clone(), torch.tensor([prompt], device=device)  # the step's static inputs
        decoding.enter_context(_decode_setting(decode_onednn))

        def step() -> torch.Tensor:
            logits = model(input_ids=token, past_key_values=cache, cache_position=position).logits
            return logits[:, -1:].argmax(-1)

        # Eager warm-up steps (first-call work, Triton autotuning); on CUDA on a side stream, as torch.cuda.graphs
        # asks before a capture. They advance the cache, which is rewound to the prompt afterwards.
        side = torch.cuda.Stream(device) if capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # a None stream: a no-op, also on a CPU-only torch
            for _ in range(GRAPH_WARMUP_STEPS):
                step()
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
        _rewind(cache, prompt)
        replay = step
        if capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                next_token = step()  # recorded, not run: the cache does not advance

            def replay() -> torch.Tensor:
                graph.replay()
                return next_token

        tokens = [first]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(max_new_tokens):
            nxt = replay()
            tokens.append(nxt.clone())
            token.copy_(nxt)
            position += 1
        sync(device)
        decode_s = time.perf_counter() - t0
    return {
        "prompt_tokens": prompt,
        "new_tokens": max_new_tokens,
        "prefill_ms": 1e3 * prefill_s,
        "decode_tokens_per_s": max_new_tokens / decode_s if decode_s > 0 else float("inf"),
        "token_ids": torch.cat(tokens, -1)[0].tolist(),
        "cuda_graph": capture,
    }


def generation_compare(
    models: dict[str, nn.Module],
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    rounds: int = 3,
    bench: Callable[..., dict[str, Any]] = generation_bench,
) -> dict[str, dict[str, Any]]:
    """Greedy generation of the same prompt by each model, in interleaved rounds (order alternating); per model the
    median prefill ms and decode tokens/s over the rounds, every round's tokens/s, its bytes and the token ids.
    `bench` runs one generation (`generation_bench`, or `graph_generation_bench`)."""
    samples: dict[str, list[dict]] = {name: [] for name in models}
    for model in models.values():  # warm-up: first-call allocations, lazy init
        bench(model, input_ids, 2)
    for i in range(rounds):
        for name in list(models) if i % 2 == 0 else list(reversed(models)):
            samples[name].append(bench(models[name], input_ids, max_new_tokens))
    return {
        name: {
            "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
            "decode_tokens_per_s_rounds": [r["decode_tokens_per_s"] for r in runs],
            "model_bytes": model_bytes(models[name]),
            "token_ids": runs[0]["token_ids"],
        }
        for name, runs in samples.items()
    }


class _ZeroLinear(nn.Module):
    """Stands in for a linear layer at no cost: zeros of the right shape (for measuring everything else)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_decoder_linears(dense: nn.Module, salr_model: nn.Module) -> nn.Module:
    """A copy of `dense` whose layers that SALR converted (the SALRLinear names in `salr_model`) return zeros. The copy
    shares every parameter and buffer tensor with `dense` (inference only), so it costs no weight memory: on a
    1B-class model a full copy was 2.2 GB more at the benchmark's peak."""
    from salr.layer import SALRLinear

    shared = {id(t): t for t in (*dense.parameters(), *dense.buffers())}
    stub = copy.deepcopy(dense, memo=shared).eval()
    for name, module in salr_model.named_modules():
        if isinstance(module, SALRLinear):
            parent, _, child = name.rpartition(".")
            setattr(stub.get_submodule(parent), child, _ZeroLinear(module.out_features))
    return stub


def timed_linears_ms(
    model: nn.Module, names: list[str], input_ids: torch.Tensor, max_new_tokens: int, decode_onednn: bool | None = None
) -> dict[str, float]:
    """One `generation_bench` run of its own with forward hooks on the modules `names` (the converted linears): per
    decoded token, the step's milliseconds (`step_ms`), those spent inside the modules (`linears_ms`) and the rest
    (`outside_ms`), all from this one run. The hooks cost ~1 us a call, so the tokens/s runs stay unhooked.
    `decode_breakdown`'s split subtracts another model's run and also charges the linears with whatever the rest of
    a step loses beside them (docs/benchmarks.md, section 20); this one does not."""
    inside = {"s": 0.0, "model_calls": 0}
    started: dict[int, float] = {}  # by id(module)

    def count_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inside["model_calls"] += 1  # the first is the prefill, not counted

    def start(module: nn.Module, args: tuple) -> None:
        started[id(module)] = time.perf_counter()

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        if inside["model_calls"] > 1:
            inside["s"] += time.perf_counter() - started[id(module)]

    handles = [model.register_forward_pre_hook(count_call, with_kwargs=True)]
    for name in names:
        module = model.get_submodule(name)
        handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    try:
        run = generation_bench(model, input_ids, max_new_tokens, decode_onednn)
    finally:
        for handle in handles:
            handle.remove()
    step = 1e3 / run["decode_tokens_per_s"]
    linears = 1e3 * inside["s"] / max(max_new_tokens, 1)
    return {"step_ms": step, "linears_ms": linears, "outside_ms": step - linears}


def decode_breakdown(results: dict[str, dict], salr_model: nn.Module) -> dict[str, Any]:
    """Split decode ms per token into the converted linears and everything else (attention, norms, lm_head,
    Python), from the `no_linears` run; the speedup of the linears alone; and the end-to-end ceiling if the
    linears ran exactly at their byte ratio (bf16 dense bytes / bitmap + adapter bytes): memory-bound decoding
    cannot beat it."""
    from salr.layer import SALRLinear

    ms = {name: 1e3 / r["decode_tokens_per_s"] for name, r in results.items()}
    rest = ms["no_linears"]
    dense_bytes = salr_bytes = 0
    for module in salr_model.modules():
        if isinstance(module, SALRLinear):
            dense_bytes += module.out_features * module.in_features * 2
            salr_bytes += module.base.nbytes + sum(p.numel() * p.element_size() for p in (module.A_cat, module.B_cat))
    byte_ratio = dense_bytes / salr_bytes
    dense_linears, salr_linears = ms["dense_bf16"] - rest, ms["salr"] - rest
    return {
        "ms_per_token": ms,
        "outside_linears_ms": rest,
        "linears_ms": {"dense_bf16": dense_linears, "salr": salr_linears},
        "linears_speedup": dense_linears / salr_linears if salr_linears > 0 else float("inf"),
        "linears_byte_ratio": byte_ratio,
        "speedup_ceiling_at_byte_ratio": ms["dense_bf16"] / (rest + dense_linears / byte_ratio),
    }


def _child_generation_memory(
    path: str, kind: str, prompt_ids: list[int], max_new_tokens: int, threads: int
) -> dict[str, float]:
    """Runs in a fresh process: load one model from disk (`kind` a torch dtype name or "salr"), generate, report
    resident memory (MiB)."""
    torch.set_num_threads(threads)
    baseline = rss_mib()
    if kind == "salr":
        from salr.checkpoint import load

        model, _ = load(path, verify_checksums=False)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, kind)).eval()
    loaded = rss_mib()
    generation_bench(model, torch.tensor([prompt_ids]), max_new_tokens)
    return {
        "rss_baseline_mib": baseline,
        "rss_after_load_mib": loaded,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_over_baseline_mib": peak_rss_mib() - baseline,
    }


def _generation_memory(
    models: dict[str, nn.Module], configs: dict[str, SALRConfig], input_ids: torch.Tensor, max_new_tokens: int
) -> dict[str, dict[str, float]]:
    """Save each model ("dense_bf16", "dense_fp32", and the SALR ones, those with a config) and measure the RSS of a
    child that loads it and generates (`_child_generation_memory`)."""
    from salr.checkpoint import save

    kinds = {"dense_bf16": "bfloat16", "dense_fp32": "float32", **{name: "salr" for name in configs}}
    out = {}
    with tempfile.TemporaryDirectory(prefix="salr-bench-") as tmp:
        for name, kind in kinds.items():
            path = Path(tmp, name)
            if kind == "salr":
                save(models[name], path, configs[name])
            else:
                models[name].save_pretrained(path)
            args = (str(path), kind, input_ids[0].tolist(), max_new_tokens, torch.get_num_threads())
            out[name] = in_child(_child_generation_memory, *args)
    return out


def pick_onednn(model: nn.Module, choice: str = "auto") -> dict[str, Any]:
    """Whether every model of the run decodes (the steps after the prefill) with torch's CPU matmuls on oneDNN
    (`timing.onednn`): "on" / "off" as asked, or with "auto" the faster of the two for a one-token bf16 linear of the
    model's largest decoder weight (timed here, side by side, the weight flushed from the caches before each call). One
    setting for all models keeps the comparison even: dense and SALR models both run their bf16 attention, norms and
    lm_head under it."""
    onednn_paths(choice)  # a bad choice raises
    if choice != "auto":
        return {"choice": choice, "enabled": choice == "on"}
    head = model.get_output_embeddings()
    weight = max((m.weight for m in model.modules() if isinstance(m, nn.Linear) and m is not head), key=torch.numel)
    w = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(1, w.shape[1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def linear() -> torch.Tensor:
        return torch.nn.functional.linear(x, w)

    contexts = onednn_contexts(ONEDNN_PATHS)
    with torch.inference_mode():
        flush = cold_caches(dict.fromkeys(contexts, [w, x]))  # the weight from memory, as when decoding
        ms = time_interleaved(dict.fromkeys(contexts, linear), torch.device("cpu"), budget_s=0.5, contexts=contexts,
                              before_call=flush)  # fmt: skip
    return {"choice": "auto", "enabled": ms["onednn"] <= ms["native"], "probe_shape": list(w.shape), "probe_ms": ms}


def _prompt_ids(tokenizer: Any, prompt: str, prompt_tokens: int | None, vocab_size: int) -> torch.Tensor:
    """The tokenized prompt (random ids without a tokenizer) [1, n], repeated or cut to `prompt_tokens` if given."""
    if tokenizer is not None:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        ids = torch.randint(0, vocab_size, (1, prompt_tokens or 32), generator=torch.Generator().manual_seed(0))
    if prompt_tokens:  # repeat the prompt to the requested length
        ids = ids.repeat(1, -(-prompt_tokens // ids.shape[1]))[:, :prompt_tokens]
    return ids


def generation_report(
    spec: str = "default",
    max_new_tokens: int = 32,
    rounds: int = 3,
    sparsity: float = 0.5,
    residual_rank: int = 64,
    lora_rank: int = 16,
    prompt: str = DEFAULT_PROMPT,
    prompt_tokens: int | None = None,
    memory: bool = True,
    quant: str = "none",
    quant_double: bool = False,
    static_cache: bool = False,
    onednn_choice: str = "auto",
    attention: str = "salr",
) -> dict[str, Any]:
    """`salr bench --generate` on the CPU: dense bf16, dense fp32 and SALR (bitmap base, bf16 adapters unmerged)
    decode the same prompt in one process, next to the dense model with its converted linears stubbed out
    (`no_linears`, for `decode_breakdown`); with `quant` also QSALR (`qsalr`: the same conversion with quantized
    bases). With `memory`, the peak RSS of each model (not `no_linears`) comes from a child process that loads it
    from disk (a saved checkpoint) and generates. `spec` may be "tinyllama-shape" (random, built in memory). All
    models decode under one oneDNN setting (`pick_onednn`); prefills and the memory children keep torch's. Every
    model attends through `attention`: "salr" (salr.attention's one-token path, what salr's loaders set) or "sdpa"
    (transformers' own)."""
    dense_bf16, tokenizer = bench_model(spec, "bfloat16")
    input_ids = _prompt_ids(tokenizer, prompt, prompt_tokens, dense_bf16.config.vocab_size)
    dense_fp32 = copy.deepcopy(dense_bf16).float().eval()
    t0 = time.perf_counter()
    salr_model, config = salr_copy(dense_bf16, SALRConfig(sparsity=sparsity, residual_rank=residual_rank, r=lora_rank))
    convert_s = time.perf_counter() - t0
    models = {"dense_bf16": dense_bf16, "dense_fp32": dense_fp32, "salr": salr_model}
    configs = {"salr": config}
    if quant != "none":
        qconfig = SALRConfig(sparsity=sparsity, residual_rank=residual_rank, r=lora_rank, quant=quant,
                             quant_double=quant_double)  # fmt: skip
        models["qsalr"], configs["qsalr"] = salr_copy(dense_bf16, qconfig)
    # every model on huge pages where the system offers them, as salr.checkpoint.load places a loaded one
    huge_page_bytes = {name: place_on_huge_pages(model) for name, model in models.items()}
    onednn_pick = pick_onednn(dense_bf16, onednn_choice)
    # The same model with its decoder linears stubbed out: what decoding costs outside the layers SALR replaces.
    models["no_linears"] = without_decoder_linears(dense_bf16, salr_model)
    for model in models.values():
        if attention == "sdpa":
            model.set_attn_implementation("sdpa")
        else:
            use_decode_attention(model)
    # static_cache: every model decodes with transformers' StaticCache (no per-step cache growth), eagerly
    bench = functools.partial(graph_generation_bench, capture=False) if static_cache else generation_bench
    bench = functools.partial(bench, decode_onednn=onednn_pick["enabled"])
    results = generation_compare(models, input_ids, max_new_tokens, rounds, bench)
    if memory:
        for name, rss in _generation_memory(models, configs, input_ids, max_new_tokens).items():
            results[name].update(rss)
    breakdown = decode_breakdown(results, salr_model)
    if not static_cache:  # the hooked run decodes with the dynamic cache, as the timed runs do
        from salr.layer import SALRLinear

        names = [name for name, module in salr_model.named_modules() if isinstance(module, SALRLinear)]
        timed = {
            name: timed_linears_ms(models[name], names, input_ids, max_new_tokens, onednn_pick["enabled"])
            for name in ("dense_bf16", "salr", "qsalr")
            if name in models
        }
        breakdown["timed"] = timed
        salr_linears = timed["salr"]["linears_ms"]
        breakdown["timed_linears_speedup"] = timed["dense_bf16"]["linears_ms"] / salr_linears if salr_linears else None
    salr_tps = results["salr"]["decode_tokens_per_s"]
    same = sum(a == b for a, b in zip(results["salr"]["token_ids"], results["dense_bf16"]["token_ids"], strict=True))
    return {
        "benchmark": "generate",
        "model": spec,
        "device": "cpu",
        "static_cache": static_cache,
        "salr_config": config.to_dict(),
        "convert_seconds": convert_s,
        "prompt_tokens": int(input_ids.shape[1]),
        "new_tokens": max_new_tokens,
        "rounds": rounds,
        "results": results,
        "salr_speedup_vs_dense_bf16": salr_tps / results["dense_bf16"]["decode_tokens_per_s"],
        "salr_speedup_vs_dense_fp32": salr_tps / results["dense_fp32"]["decode_tokens_per_s"],
        "salr_tokens_matching_dense_bf16": same / len(results["salr"]["token_ids"]),
        "breakdown": breakdown,
        "onednn": onednn_pick,
        "attention": {name: model.config._attn_implementation for name, model in models.items()},
        "huge_page_bytes": huge_page_bytes,
        "environment": environment(),
        **(_qsalr_fields(results, configs["qsalr"]) if "qsalr" in results else {}),
    }


def _qsalr_fields(results: dict[str, dict], config: SALRConfig) -> dict[str, Any]:
    """QSALR's decode speed against dense bf16 and SALR bf16 from the same interleaved run."""
    tps = results["qsalr"]["decode_tokens_per_s"]
    same = sum(a == b for a, b in zip(results["qsalr"]["token_ids"], results["dense_bf16"]["token_ids"], strict=True))
    return {
        "qsalr_config": config.to_dict(),
        "qsalr_speedup_vs_dense_bf16": tps / results["dense_bf16"]["decode_tokens_per_s"],
        "qsalr_speedup_vs_salr": tps / results["salr"]["decode_tokens_per_s"],
        "qsalr_tokens_matching_dense_bf16": same / len(results["qsalr"]["token_ids"]),
    }


def _cuda_peak_memory(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> dict[str, float]:
    """torch.cuda.max_memory_allocated (MiB) during one generation of `model` alone, and its excess over what was
    allocated before (the resident models)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    generation_bench(model, input_ids, max_new_tokens)
    peak = torch.cuda.max_memory_allocated()
    return {"peak_memory_mib": peak / 2**20, "peak_over_resident_mib": (peak - base) / 2**20}


def _cuda_case(
    spec: str,
    config: SALRConfig,
    max_new_tokens: int,
    prompt_tokens: int,
    rounds: int,
    llama_overrides: dict,
    cuda_graph: bool = False,
) -> dict[str, Any]:
    """One model spec of `cuda_generation_compare` (each decode step replayed from a CUDA graph with `cuda_graph`;
    the peak memory is then left out, as a graph holds its own memory pool)."""
    from salr.bases.semi_structured import SemiStructuredBase

    dense = cuda_model(spec, **llama_overrides)
    salr_model, config = salr_copy(dense, config)
    # the same SALR layers with 2:4 bases on sparse tensor cores (salr_copy swaps them in on the GPU)
    salr_24, _ = salr_copy(dense, SALRConfig.from_dict({**config.to_dict(), "pattern": "2:4"}), bitmap=False)
    ids = torch.randint(0, dense.config.vocab_size, (1, prompt_tokens), device="cuda")
    models = {"dense_bf16": dense, "salr": salr_model, "salr_2to4": salr_24}
    bench = graph_generation_bench if cuda_graph else generation_bench
    results = generation_compare(models, ids, max_new_tokens, rounds, bench)
    if not cuda_graph:
        for name, model in models.items():
            results[name].update(_cuda_peak_memory(model, ids, max_new_tokens))
    dense_tps = results["dense_bf16"]["decode_tokens_per_s"]
    return {
        "model": spec,
        "cuda_graph": cuda_graph,
        "salr_config": config.to_dict(),
        "results": results,
        "salr_speedup_vs_dense_bf16": results["salr"]["decode_tokens_per_s"] / dense_tps,
        "salr_2to4_speedup_vs_dense_bf16": results["salr_2to4"]["decode_tokens_per_s"] / dense_tps,
        "salr_2to4_semi_structured_layers": sum(isinstance(m, SemiStructuredBase) for m in salr_24.modules()),
    }


def cuda_generation_compare(
    specs: Iterable[str] = ("llama3-8b", "default"),
    max_new_tokens: int = 64,
    prompt_tokens: int = 128,
    rounds: int = 3,
    sparsity: float = 0.5,
    residual_rank: int = 64,
    lora_rank: int = 16,
    llama_overrides: dict | None = None,
    cuda_graph: bool = False,
) -> dict[str, Any]:
    """`salr bench --device cuda --generate`: per model spec ("llama3-8b" = random weights with Llama-3-8B shapes,
    built on the GPU), dense bf16 vs SALR (bitmap bases, Triton kernel as the op's CUDA backend, bf16 adapters
    unmerged) vs SALR at 2:4 (bases on sparse tensor cores), all resident on the GPU and timed in interleaved
    rounds. Peak memory is torch.cuda.max_memory_allocated during one generation of each model alone."""
    if not torch.cuda.is_available():
        raise SALRError("--device cuda but no CUDA device is available")
    if ops.triton_kernels() is None:
        raise SALRError("the CUDA bitmap backend needs triton: pip install triton")
    config = SALRConfig(sparsity=sparsity, residual_rank=residual_rank, r=lora_rank)
    cases = []
    for spec in specs:
        cases.append(
            _cuda_case(spec, config, max_new_tokens, prompt_tokens, rounds, llama_overrides or {}, cuda_graph)
        )
        torch.cuda.empty_cache()  # the case's models are gone
    env = {**environment(), "gpu": torch.cuda.get_device_name()}
    return {"benchmark": "generate", "device": "cuda", "prompt_tokens": prompt_tokens, "new_tokens": max_new_tokens,
            "cases": cases, "environment": env}  # fmt: skip

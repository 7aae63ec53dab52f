"""Benchmarks behind `salr bench`: the bitmap kernel (`kernel_case`), end-to-end generation (`generation_compare`,
`cuda_generation_compare`), checkpoint bytes (`checkpoint_sizes`) and fine-tuning memory (`train_memory`).

Whatever is compared is timed in one process with interleaved repetitions (A B C A B C ..., the order alternating),
and medians are reported, so drifting machine load affects every contender alike. Outputs are checked against a
reference (`max_rel_err`) so a fast wrong kernel cannot pass unnoticed. Peak memory on the CPU is the resident set
size of a child process that does only that one thing (ru_maxrss is per process); on CUDA it is
torch.cuda.max_memory_allocated. Every number is measured when the function runs; nothing is cached or estimated.
"""

from __future__ import annotations

import concurrent.futures
import copy
import gc
import logging
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from salr import bitmap_format, ops
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.memory import peak_rss_mib, reset_peak_rss, rss_mib
from salr.ops import cpu as cpu_kernel

logger = logging.getLogger(__name__)

SHAPES: list[tuple[int, int]] = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (14336, 4096), (4096, 14336)]
TOKENS: list[int] = [1, 4, 16, 128, 512]
MIN_SAMPLE_S = 2e-3  # each timed sample runs the function enough times to last at least this long


def parse_shape(text: str) -> tuple[int, int]:
    """ "4096x4096" -> (4096, 4096), as (out, in) = (rows, cols) of the weight."""
    try:
        rows, cols = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise SALRError(f"shape must look like OUTxIN, e.g. 4096x4096; got {text!r}") from None
    if rows <= 0 or cols <= 0:
        raise SALRError(f"shape dimensions must be positive, got {text!r}")
    return rows, cols


def pruned_weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """fp32 Gaussian weight with the `sparsity` fraction of smallest magnitudes set to zero (unstructured)."""
    if not 0.0 <= sparsity < 1.0:
        raise SALRError(f"sparsity must be in [0, 1), got {sparsity}")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    k = int(round(sparsity * w.numel()))
    if k:
        thresh = w.abs().flatten().kthvalue(k).values
        w[w.abs() <= thresh] = 0
    return w


def weight_bytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Checkpoint-bytes accounting of one weight: dense vs the bitmap format's ideal payload (1 bit/weight +
    kept values) and the row offsets it also stores."""
    dense = bitmap_format.dense_nbytes(shape, dtype)
    ideal = bitmap_format.ideal_bitmap_nbytes(shape, nnz, dtype)
    return {
        "dense_bytes": dense,
        "bitmap_ideal_bytes": ideal,
        "row_offsets_bytes": 8 * shape[0],
        "compression": dense / ideal,
        "bits_per_weight": 8 * ideal / (shape[0] * shape[1]),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, min_rounds: int = 5, budget_s: float = 1.0
) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds (order alternates) until
    `min_rounds` are done and `budget_s` has passed (at most 100 rounds)."""
    inner = {}
    for name, fn in fns.items():  # warm up, then pick the calls per sample
        fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        inner[name] = max(1, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < 100):
        for name in list(fns) if rounds % 2 == 0 else list(reversed(fns)):
            fn, n = fns[name], inner[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / n)
        rounds += 1
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def kernel_case(
    shape: tuple[int, int],
    tokens: int,
    sparsity: float = 0.5,
    backend: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    budget_s: float = 1.0,
) -> dict:
    """Time y = x @ W.T for one layer shape and token count: dense bf16, dense fp32, bitmap (bf16 values)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SALRError("--device cuda but no CUDA device is available")
    rows, cols = shape
    w32 = pruned_weight(rows, cols, sparsity, seed).to(dev)
    w16 = w32.to(torch.bfloat16)
    bw = bitmap_format.encode(w16)
    g = torch.Generator().manual_seed(seed + 1)
    x32 = torch.randn(tokens, cols, generator=g).to(dev)
    x16 = x32.to(torch.bfloat16)
    args = (bw.bitmask, bw.values, bw.row_offsets, rows, cols)

    def bitmap() -> torch.Tensor:
        return ops.bitmap_linear_with(backend, x16, *args)

    with torch.inference_mode():
        y = bitmap().double()
        ref = F.linear(x16.float(), w16.float()).double()
        err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        ms = time_interleaved(
            {
                "dense_bf16": lambda: F.linear(x16, w16),
                "dense_fp32": lambda: F.linear(x32, w32),
                "bitmap": bitmap,
            },
            dev,
            budget_s=budget_s,
        )
    ran = _backend_label(backend, dev, tokens)
    return {
        "shape": [rows, cols],
        "tokens": tokens,
        "sparsity": sparsity,
        "density": bw.nnz / (rows * cols),
        "device": str(dev),
        "backend": ran,
        "dense_bf16_ms": ms["dense_bf16"],
        "dense_fp32_ms": ms["dense_fp32"],
        "bitmap_ms": ms["bitmap"],
        "speedup_vs_dense_bf16": ms["dense_bf16"] / ms["bitmap"],
        "speedup_vs_dense_fp32": ms["dense_fp32"] / ms["bitmap"],
        "max_rel_err": err,
        **weight_bytes(shape, bw.nnz, torch.bfloat16),
    }


def _backend_label(backend: str, device: torch.device, tokens: int) -> str:
    name = ops.backend_name(device) if backend == "auto" else backend
    if name == "cpu":
        name = f"cpu-{cpu_kernel.isa()}"
    if name.startswith("cpu-"):
        name += "-gemv" if tokens <= cpu_kernel.GEMV_MAX_TOKENS else "-decode+sgemm"
    return name


def environment() -> dict:
    """What the numbers were measured on (threads and load matter on a shared 2-core machine)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": cpu_kernel.isa() if cpu_kernel.available() else "none (native kernel not built)",
        "loadavg_1m": load[0],
    }


def kernel_grid(
    shapes: Iterable[tuple[int, int]] = SHAPES,
    tokens: Iterable[int] = TOKENS,
    sparsity: float = 0.5,
    backend: str = "auto",
    device: str = "cpu",
    budget_s: float = 1.0,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Every (shape, tokens) case; `progress(case)` is called after each one."""
    results = []
    for shape in shapes:
        for m in tokens:
            case = kernel_case(shape, m, sparsity, backend, device, budget_s=budget_s)
            results.append(case)
            if progress:
                progress(case)
    return {"environment": environment(), "results": results}


def format_row(case: dict) -> str:
    shape = "x".join(str(s) for s in case["shape"])
    return (
        f"{shape:>11} {case['tokens']:>5} {case['dense_bf16_ms']:>10.3f} {case['dense_fp32_ms']:>10.3f} "
        f"{case['bitmap_ms']:>10.3f} {case['speedup_vs_dense_bf16']:>8.2f}x {case['speedup_vs_dense_fp32']:>8.2f}x  "
        f"{case['backend']}"
    )


TABLE_HEADER = (
    f"{'shape':>11} {'M':>5} {'bf16 ms':>10} {'fp32 ms':>10} {'bitmap ms':>10} {'vs bf16':>9} {'vs fp32':>9}  backend"
)


# -------------------- Triton kernel


def triton_kernel_grid(
    shapes: Iterable[tuple[int, int]], tokens: Iterable[int], sparsity: float = 0.5, device: str = "cpu"
) -> dict:
    """The Triton bitmap kernel: on a GPU, timings (dense cuBLAS vs Triton bitmap vs 2:4, `bench_gpu_kernel`); on
    the CPU under TRITON_INTERPRET=1, correctness only (`snr_db`, `max_abs_err` against float64)."""
    from salr.kernels import gpu_bench  # noqa: I001

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SALRError("--device cuda but no CUDA device is available")
        results = [gpu_bench.bench_gpu_kernel(shape, m, sparsity) for shape in shapes for m in tokens]
    else:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SALRError(
                "backend 'triton' needs CUDA (--device cuda) or, for a CPU correctness check only, "
                "TRITON_INTERPRET=1 in the environment"
            )
        results = [gpu_bench.check_triton_on_cpu(shape, m, sparsity) for shape in shapes for m in tokens]
    return {"environment": environment(), "results": results}


# -------------------- generation


def _sync_model(model: nn.Module) -> None:
    p = next(model.parameters(), None)
    if p is not None:
        _sync(p.device)


def generation_bench(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32) -> dict:
    """End-to-end greedy generation timing of an already-built model (dense or with BitmapBase layers):
    prefill milliseconds and decode tokens/second, with a KV cache. The caller loads/converts the model."""
    model.eval()
    with torch.inference_mode():
        _sync_model(model)
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        _sync_model(model)
        prefill_s = time.perf_counter() - t0
        past = out.past_key_values
        tokens = [token]
        t0 = time.perf_counter()
        for _ in range(max_new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        _sync_model(model)
        decode_s = time.perf_counter() - t0
    return {
        "prompt_tokens": int(input_ids.shape[-1]),
        "new_tokens": max_new_tokens,
        "prefill_ms": 1e3 * prefill_s,
        "decode_tokens_per_s": max_new_tokens / decode_s if decode_s > 0 else float("inf"),
        "token_ids": torch.cat(tokens, -1)[0].tolist(),
    }


def salr_copy(
    model: nn.Module,
    sparsity: float = 0.5,
    residual_rank: int = 64,
    lora_rank: int = 16,
    bitmap: bool = True,
    inplace: bool = False,
    pattern: str = "unstructured",
) -> tuple[nn.Module, SALRConfig]:
    """A SALR version of a dense model (a deep copy unless `inplace`, which saves a second copy of an 8B model):
    magnitude-pruned base, residual SVD, adapters in the model's dtype and unmerged, bitmap bases when `bitmap`.
    With pattern="2:4" on a GPU, `convert` puts the bases on sparse tensor cores (pass bitmap=False)."""
    from salr.config import parse_nm
    from salr.convert import convert, pack_bases

    dtype = next(model.parameters()).dtype
    config = SALRConfig(
        sparsity=None if parse_nm(pattern) else sparsity,  # an N:M pattern sets its own sparsity
        pattern=pattern,
        residual_rank=residual_rank,
        r=lora_rank,
        adapter_dtype=str(dtype).removeprefix("torch."),
    )
    salr_model = model if inplace else copy.deepcopy(model)
    convert(salr_model, config, progress=False)
    if bitmap:
        pack_bases(salr_model)
    return salr_model.eval(), config


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors once): what the weights occupy in memory."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def generation_compare(
    models: dict[str, nn.Module], input_ids: torch.Tensor, max_new_tokens: int = 32, rounds: int = 3
) -> dict[str, dict]:
    """Greedy generation of the same prompt by each model, in interleaved rounds (order alternating); per model the
    median prefill ms and decode tokens/s over the rounds, every round's numbers, and the generated token ids."""
    samples: dict[str, list[dict]] = {name: [] for name in models}
    for model in models.values():  # warm-up: first-call allocations, lazy init
        generation_bench(model, input_ids, 2)
    for i in range(rounds):
        for name in list(models) if i % 2 == 0 else list(reversed(models)):
            samples[name].append(generation_bench(models[name], input_ids, max_new_tokens))
    out = {}
    for name, runs in samples.items():
        out[name] = {
            "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
            "decode_tokens_per_s_rounds": [r["decode_tokens_per_s"] for r in runs],
            "model_bytes": model_bytes(models[name]),
            "token_ids": runs[0]["token_ids"],
        }
    return out


class _ZeroLinear(nn.Module):
    """Stands in for a linear layer at no cost: zeros of the right shape (for measuring everything else)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_decoder_linears(dense: nn.Module, salr_model: nn.Module) -> nn.Module:
    """A copy of `dense` whose layers that SALR converted (the SALRLinear names in `salr_model`) return zeros."""
    from salr.layer import SALRLinear

    stub = copy.deepcopy(dense).eval()
    for name, module in salr_model.named_modules():
        if isinstance(module, SALRLinear):
            parent, _, child = name.rpartition(".")
            setattr(stub.get_submodule(parent), child, _ZeroLinear(module.out_features))
    return stub


def decode_breakdown(results: dict[str, dict], salr_model: nn.Module) -> dict:
    """Split decode time per token into the converted linears and everything else (attention, norms, lm_head,
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


def _child_generation_memory(path: str, kind: str, prompt_ids: list[int], max_new_tokens: int, threads: int) -> dict:
    """Runs in a fresh process: load one model from disk, generate, report resident memory (MiB)."""
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


def in_child(fn: Callable, *args) -> dict:
    """fn(*args) in a fresh spawned Python process (for a per-run peak RSS); returns its result."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def _prompt_ids(tokenizer, prompt: str, prompt_tokens: int | None, vocab_size: int) -> torch.Tensor:
    if tokenizer is not None:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        ids = torch.randint(0, vocab_size, (1, prompt_tokens or 32), generator=torch.Generator().manual_seed(0))
    if prompt_tokens:  # repeat the prompt to the requested length
        ids = ids.repeat(1, -(-prompt_tokens // ids.shape[1]))[:, :prompt_tokens]
    return ids


DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue and why sunsets are red."


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
    target: float = 1.3,
) -> dict:
    """`salr bench --generate` on the CPU: dense bf16, dense fp32 and SALR (bitmap base, bf16 adapters unmerged)
    decode the same prompt in one process; peak RSS of each comes from a child process that loads that model from
    disk (a saved checkpoint) and generates. `target` is the SALR / dense-bf16 decode tokens/s ratio to check."""
    from salr.checkpoint import save
    from salr.loaders import load_model

    dense_bf16, tokenizer = load_model(spec, dtype="bfloat16")
    input_ids = _prompt_ids(tokenizer, prompt, prompt_tokens, dense_bf16.config.vocab_size)
    dense_fp32 = copy.deepcopy(dense_bf16).float().eval()
    t0 = time.perf_counter()
    salr_model, config = salr_copy(dense_bf16, sparsity, residual_rank, lora_rank)
    convert_s = time.perf_counter() - t0
    models = {"dense_bf16": dense_bf16, "dense_fp32": dense_fp32, "salr": salr_model}
    # The same model with its decoder linears stubbed out: what decoding costs outside the layers SALR replaces.
    models["no_linears"] = without_decoder_linears(dense_bf16, salr_model)
    results = generation_compare(models, input_ids, max_new_tokens, rounds)
    if memory:
        with tempfile.TemporaryDirectory(prefix="salr-bench-") as tmp:
            paths = {"dense_bf16": Path(tmp, "bf16"), "dense_fp32": Path(tmp, "fp32"), "salr": Path(tmp, "salr")}
            dense_bf16.save_pretrained(paths["dense_bf16"])
            dense_fp32.save_pretrained(paths["dense_fp32"])
            save(salr_model, paths["salr"], config)
            kinds = {"dense_bf16": "bfloat16", "dense_fp32": "float32", "salr": "salr"}
            for name, path in paths.items():
                results[name].update(
                    in_child(
                        _child_generation_memory, str(path), kinds[name], input_ids[0].tolist(), max_new_tokens,
                        torch.get_num_threads(),
                    )
                )  # fmt: skip
    speedup = results["salr"]["decode_tokens_per_s"] / results["dense_bf16"]["decode_tokens_per_s"]
    breakdown = decode_breakdown(results, salr_model)
    same = sum(a == b for a, b in zip(results["salr"]["token_ids"], results["dense_bf16"]["token_ids"], strict=True))
    return {
        "benchmark": "generate",
        "model": spec,
        "device": "cpu",
        "salr_config": config.to_dict(),
        "convert_seconds": convert_s,
        "prompt_tokens": int(input_ids.shape[1]),
        "new_tokens": max_new_tokens,
        "rounds": rounds,
        "results": results,
        "salr_speedup_vs_dense_bf16": speedup,
        "salr_speedup_vs_dense_fp32": results["salr"]["decode_tokens_per_s"]
        / results["dense_fp32"]["decode_tokens_per_s"],
        "salr_tokens_matching_dense_bf16": same / len(results["salr"]["token_ids"]),
        "target_speedup_vs_dense_bf16": target,
        "target_met": speedup >= target,
        "breakdown": breakdown,
        "environment": environment(),
    }


# -------------------- Llama-3-8B shapes

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


def random_llama(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides
) -> nn.Module:
    """A LlamaForCausalLM with Llama-3-8B shapes (LLAMA3_8B, any field overridable) and random weights (N(0, 0.02),
    norms 1), built on the meta device and materialised directly on `device` (an 8B model never touches the CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    fields = {**LLAMA3_8B, "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False}
    config = LlamaConfig(**{**fields, **overrides})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    model.to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its tables are buffers to_empty left empty
    return model.eval()


# -------------------- checkpoint bytes


def checkpoint_case(model: nn.Module, name: str, sparsity: float, residual_rank: int, lora_rank: int) -> dict:
    """Save `model` dense (save_pretrained, safetensors) and as a SALR checkpoint (bitmap bases, adapters in the
    model's dtype) into a temporary directory and report the bytes of the weight files on disk."""
    from salr.checkpoint import WEIGHTS_NAME, save, size_report

    salr_model, config = salr_copy(model, sparsity, residual_rank, lora_rank)
    with tempfile.TemporaryDirectory(prefix="salr-ckpt-") as tmp:
        model.save_pretrained(Path(tmp, "dense"))
        dense_file = sum(p.stat().st_size for p in Path(tmp, "dense").glob("*.safetensors"))
        save(salr_model, Path(tmp, "salr"), config)
        sizes = size_report(salr_model, Path(tmp, "salr"))
        assert sizes["checkpoint_bytes"] == Path(tmp, "salr", WEIGHTS_NAME).stat().st_size
    adapters = sum(p.numel() * p.element_size() for n, p in salr_model.named_parameters() if n.endswith("_cat"))
    return {
        "name": name,
        "salr_config": config.to_dict(),
        "dense_checkpoint_bytes": dense_file,
        "salr_checkpoint_bytes": sizes["checkpoint_bytes"],
        "salr_ideal_bytes": sizes["ideal_bytes"],
        "adapter_bytes": adapters,
        "over_ideal": sizes["checkpoint_bytes"] / sizes["ideal_bytes"] - 1.0,
        "compression_vs_dense": dense_file / sizes["checkpoint_bytes"],
    }


def checkpoint_sizes(
    spec: str | None = "default",
    sparsity: float = 0.5,
    residual_rank: int = 64,
    lora_rank: int = 16,
    llama_layer: dict | None = None,
) -> dict:
    """`salr bench --checkpoint`: dense bf16 vs SALR checkpoint bytes for a model (`spec`, skipped if None) and for
    one Llama-3-8B-shaped decoder layer (a 1-layer LlamaForCausalLM with a 256-token vocabulary so the embeddings,
    kept dense in both, do not dominate; `llama_layer` overrides its shape, e.g. for tests). Targets: SALR within 3 %
    of the format's ideal (9 bits/weight at 50 % + adapters), and the 8B-shaped layer >= 1.65x smaller than dense."""
    from salr.loaders import load_model

    cases = []
    if spec:
        model, _ = load_model(spec, dtype="bfloat16")
        cases.append(checkpoint_case(model, spec, sparsity, residual_rank, lora_rank))
        del model
    layer_shape = {"num_hidden_layers": 1, "vocab_size": 256, **(llama_layer or {})}
    layer = random_llama("cpu", torch.bfloat16, **layer_shape)
    case = checkpoint_case(layer, "llama3-8b-shaped-layer", sparsity, residual_rank, lora_rank)
    case["shape"] = {k: layer.config.to_dict()[k] for k in LLAMA3_8B}
    cases.append(case)
    return {
        "benchmark": "checkpoint",
        "cases": cases,
        "target_max_over_ideal": 0.03,
        "target_llama_layer_compression": 1.65,
        "within_ideal_target": all(c["over_ideal"] <= 0.03 for c in cases),
        "llama_layer_target_met": case["compression_vs_dense"] >= 1.65,
        "environment": environment(),
    }


# -------------------- fine-tuning memory


def train_steps(model: nn.Module, input_ids: torch.Tensor, steps: int = 3, lr: float = 1e-4) -> dict:
    """`steps` AdamW steps on the trainable parameters (causal-LM loss on input_ids); median step ms and the loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SALRError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr)
    times, losses = [], []
    for _ in range(steps):
        _sync(input_ids.device)
        t0 = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(input_ids.device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {
        "step_ms": 1e3 * statistics.median(times[1:] if len(times) > 1 else times),
        "losses": losses,
        "trainable_parameters": sum(p.numel() for p in params),
    }


def _method_model(
    model: nn.Module, method: str, sparsity: float, residual_rank: int, lora_rank: int, inplace: bool = False
) -> nn.Module:
    # LoRA gets the same trainable rank as SALR's fused A_cat/B_cat (residual + LoRA rows), on a dense base.
    if method == "lora":
        return salr_copy(model, 0.0, 0, residual_rank + lora_rank, bitmap=False, inplace=inplace)[0]
    return salr_copy(model, sparsity, residual_rank, lora_rank, inplace=inplace)[0]


def _child_train_memory(spec: str, method: str, batch: int, seq: int, steps: int, ranks: tuple, threads: int) -> dict:
    """Runs in a fresh process (CPU): build one method's model, train `steps` steps, report peak RSS (MiB)."""
    from salr.loaders import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(spec, dtype="bfloat16")
    model = _method_model(model, method, *ranks, inplace=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    gc.collect()
    before = rss_mib()
    reset = reset_peak_rss()  # so the peak is the training's, not the conversion's (SVD, dense + bitmap bases)
    stats = train_steps(model, ids, steps)
    return {
        **stats,
        "rss_before_training_mib": before,
        "peak_rss_mib": peak_rss_mib(),
        "peak_covers": "training steps only" if reset else "conversion and training (VmHWM could not be reset)",
        "model_bytes": model_bytes(model),
    }


def train_memory(
    spec: str = "default",
    device: str = "cpu",
    batch: int = 2,
    seq: int = 128,
    steps: int = 3,
    sparsity: float = 0.5,
    residual_rank: int = 64,
    lora_rank: int = 16,
    target: float = 0.75,
) -> dict:
    """`salr bench --train-memory`: fine-tuning peak memory and step time, SALR (bitmap base, trainable A_cat/B_cat)
    vs LoRA (dense base, LoRA of the same total rank) on the same model and batch.

    CUDA: `spec` "llama3-8b" builds the random Llama-3-8B-shaped model on the GPU, anything else is loaded; the peak is
    torch.cuda.max_memory_allocated during the training steps (after the model is built). CPU: each method runs in a
    child process and the peak is its RSS during the training steps (VmHWM reset after conversion; the ~430 MiB of
    torch + transformers are in both)."""
    ranks = (sparsity, residual_rank, lora_rank)
    results = {}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SALRError("--device cuda but no CUDA device is available")
        for method in ("lora", "salr"):
            model = _method_model(_cuda_model(spec), method, *ranks, inplace=True)
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            stats = train_steps(model, ids, steps)
            results[method] = {
                **stats,
                "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
                "model_bytes": model_bytes(model),
            }
            del model, ids
            torch.cuda.empty_cache()
        peak_key = "peak_memory_mib"
    elif device == "cpu":
        for method in ("lora", "salr"):
            results[method] = in_child(
                _child_train_memory, spec, method, batch, seq, steps, ranks, torch.get_num_threads()
            )
        peak_key = "peak_rss_mib"
    else:
        raise SALRError(f"device must be cpu or cuda, got {device!r}")
    ratio = results["salr"][peak_key] / results["lora"][peak_key]
    return {
        "benchmark": "train-memory",
        "model": spec,
        "device": device,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "sparsity": sparsity,
        "residual_rank": residual_rank,
        "lora_rank": lora_rank,
        "lora_baseline_rank": residual_rank + lora_rank,
        "peak_metric": peak_key,
        "results": results,
        "salr_over_lora_peak": ratio,
        "target_salr_over_lora": target,
        "target_met": ratio <= target,
        "environment": environment(),
    }


# -------------------- CUDA generation


def _cuda_model(spec: str, **llama_overrides) -> nn.Module:
    if spec == "llama3-8b":
        return random_llama("cuda", torch.bfloat16, **llama_overrides)
    from salr.loaders import load_model

    return load_model(spec, dtype="bfloat16")[0].to("cuda")


def cuda_generation_compare(
    specs: Iterable[str] = ("llama3-8b", "default"),
    max_new_tokens: int = 64,
    prompt_tokens: int = 128,
    rounds: int = 3,
    sparsity: float = 0.5,
    residual_rank: int = 64,
    lora_rank: int = 16,
    llama_overrides: dict | None = None,
) -> dict:
    """`salr bench --device cuda --generate`: dense bf16 vs SALR (bitmap bases, Triton kernel as the op's CUDA
    backend, bf16 adapters unmerged) vs SALR at 2:4 (bases on sparse tensor cores), all resident on the GPU and
    timed in interleaved rounds, per model spec
    ("llama3-8b" = random weights with Llama-3-8B shapes, built on the GPU). Peak memory is
    torch.cuda.max_memory_allocated during one generation of each model alone."""
    from salr.bases.semi_structured import SemiStructuredBase

    if not torch.cuda.is_available():
        raise SALRError("--device cuda but no CUDA device is available")
    if ops.triton_kernels() is None:
        raise SALRError("the CUDA bitmap backend needs triton: pip install triton")
    cases = []
    for spec in specs:
        dense = _cuda_model(spec, **(llama_overrides or {}))
        salr_model, config = salr_copy(dense, sparsity, residual_rank, lora_rank)
        # the same SALR layers with 2:4 bases on sparse tensor cores (convert swaps them in on the GPU)
        salr_24, _ = salr_copy(dense, sparsity, residual_rank, lora_rank, bitmap=False, pattern="2:4")
        ids = torch.randint(0, dense.config.vocab_size, (1, prompt_tokens), device="cuda")
        models = {"dense_bf16": dense, "salr": salr_model, "salr_2to4": salr_24}
        results = generation_compare(models, ids, max_new_tokens, rounds)
        for name, model in models.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            generation_bench(model, ids, max_new_tokens)
            results[name]["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
            results[name]["peak_over_resident_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        cases.append(
            {
                "model": spec,
                "salr_config": config.to_dict(),
                "results": results,
                "salr_speedup_vs_dense_bf16": results["salr"]["decode_tokens_per_s"]
                / results["dense_bf16"]["decode_tokens_per_s"],
                "salr_2to4_speedup_vs_dense_bf16": results["salr_2to4"]["decode_tokens_per_s"]
                / results["dense_bf16"]["decode_tokens_per_s"],
                "salr_2to4_semi_structured_layers": sum(isinstance(m, SemiStructuredBase) for m in salr_24.modules()),
            }
        )
        del dense, salr_model, salr_24, models
        torch.cuda.empty_cache()
    env = environment()
    env["gpu"] = torch.cuda.get_device_name()
    return {"benchmark": "generate", "device": "cuda", "prompt_tokens": prompt_tokens, "new_tokens": max_new_tokens,
            "cases": cases, "environment": env}  # fmt: skip

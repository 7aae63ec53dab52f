"""Timing and measurement helpers shared by the benchmarks: interleaved medians, device sync, the environment the
numbers were measured on, bytes a model occupies, and a spawned child process for a per-run peak RSS."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salr.errors import SALRError
from salr.hugepages import huge_pages_available
from salr.ops import cpu as cpu_kernel

logger = logging.getLogger(__name__)

MIN_SAMPLE_S = 2e-3  # each timed sample runs the function enough times to last at least this long
MAX_ROUNDS = 100


def sync(device: torch.device) -> None:
    """Wait for queued work on `device` (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_model(model: nn.Module) -> None:
    """`sync` on the device of the model's first parameter."""
    p = next(model.parameters(), None)
    if p is not None:
        sync(p.device)


@contextlib.contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Send torch's CPU matmuls to oneDNN (`enabled`, torch's default) or to torch's own kernels while inside.
    Neither is always the faster for bf16: on an AMD Zen 4 (AVX512-BF16, no AMX) torch 2.13's one-token bf16 linear
    took 2.97 ms of 4096x4096 through oneDNN and 1.54 ms through its own gemv (docs/benchmarks.md, section 17), so
    the benchmarks time dense bf16 both ways and compare against the faster."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


ONEDNN_CHOICES = ("auto", "on", "off")  # --onednn: time dense bf16 on both of torch's CPU paths, or on one
ONEDNN_PATHS = {"onednn": True, "native": False}  # torch's two CPU bf16 paths: oneDNN enabled, and torch's own kernels


def onednn_paths(choice: str) -> dict[str, bool]:
    """The paths of ONEDNN_PATHS that `--onednn choice` asks for: both with "auto", else the one it names."""
    if choice not in ONEDNN_CHOICES:
        raise SALRError(f"--onednn must be one of {', '.join(ONEDNN_CHOICES)}; got {choice!r}")
    return {name: on for name, on in ONEDNN_PATHS.items() if choice == "auto" or on == (choice == "on")}


def onednn_contexts(settings: dict[str, bool]) -> dict[str, Callable[[], AbstractContextManager]]:
    """time_interleaved's `contexts` that run each named function with oneDNN enabled or not, as `settings` says."""
    return {name: functools.partial(onednn, enabled) for name, enabled in settings.items()}


def last_level_cache_bytes() -> int | None:
    """The CPU's largest cache in bytes (Linux sysfs, cpu0), or None where it is not known."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        try:
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except ValueError:
            continue
    return max(sizes, default=None)


def cold_caches(weights: dict[str, list[torch.Tensor]]) -> Callable[[str], None]:
    """`before_call` for time_interleaved that takes function `name`'s weights out of the CPU caches: a clflush of
    exactly those tensors (salr.ops.cpu.flush_from_caches), or, without the native kernel, a read of a buffer twice the
    last-level cache, which evicts everything (the interpreter's code and data too, so it costs the Python side more
    than decoding does). Decoding visits each layer once per token, so its weights come from memory; timed back to
    back, a weight that fits the cache (a 4096x4096 bitmap does, its dense bf16 matrix does not) would be there."""
    if all(cpu_kernel.flush_from_caches(ts) for ts in weights.values()):
        return lambda name: cpu_kernel.flush_from_caches(weights[name])
    buffer = torch.ones(2 * (last_level_cache_bytes() or 32 << 20) // 4, dtype=torch.float32)
    return lambda name: buffer.sum()


def _calls_per_sample(fn: Callable[[], object], device: torch.device) -> int:
    """Warm `fn` up, then how many calls make one sample last at least MIN_SAMPLE_S."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return max(1, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-7)))


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    min_rounds: int = 5,
    budget_s: float = 1.0,
    contexts: dict[str, Callable[[], AbstractContextManager]] | None = None,
    before_call: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds (order alternates) until
    `min_rounds` are done and `budget_s` seconds have passed (at most MAX_ROUNDS rounds). `contexts[name]()` (e.g.
    `onednn(False)`) is entered around each of that function's samples, not around each call. With `before_call`
    every sample is one timed call, after an untimed call of the same function and then before_call(name) (e.g. to
    flush that function's weights from the caches): the timed call finds its own code, the interpreter's path and
    its buffers warm, as a layer does when decoding, whatever ran before it (a oneDNN bf16 call before a flushed
    4096x4096 bitmap gemv had slowed it by up to 14 %, docs/benchmarks.md section 18)."""
    contexts = contexts or {}
    no_context = contextlib.nullcontext
    inner = {}
    for name, fn in fns.items():
        with contexts.get(name, no_context)():
            if before_call:
                fn()  # warm-up (first-call work), untimed
                sync(device)
                inner[name] = 1
            else:
                inner[name] = _calls_per_sample(fn, device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < MAX_ROUNDS):
        for name in list(fns) if rounds % 2 == 0 else list(reversed(fns)):
            fn, n = fns[name], inner[name]
            with contexts.get(name, no_context)():
                if before_call:
                    fn()
                    sync(device)
                    before_call(name)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                sync(device)
                samples[name].append((time.perf_counter() - t0) / n)
        rounds += 1
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def environment() -> dict[str, Any]:
    """What the numbers were measured on (threads and load matter on a shared machine)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": cpu_kernel.isa() if cpu_kernel.available() else "none (native kernel not built)",
        "cpu_bf16_dot": cpu_kernel.available() and cpu_kernel.bf16_dot(),  # vdpbf16ps in the few-token bf16 gemv
        "loadavg_1m": load[0],
        "onednn_enabled": torch.backends.mkldnn.enabled,  # torch's setting when the report was written
        "huge_pages": huge_pages_available(),  # weights placed on transparent huge pages (salr.hugepages)
        # glibc's allocator policy changes peak RSS (docs/benchmarks.md, training memory); children inherit it
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"},
    }


def _stored_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold `t`'s data: itself, or the inner tensors of a wrapper subclass (torch's 2:4
    semi-structured tensors: packed values + metadata), which has no storage of its own."""
    if hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _stored_tensors(inner)
    else:
        yield t


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors once): what the weights occupy in memory."""
    seen, total = set(), 0
    for t in (s for p in [*model.parameters(), *model.buffers()] for s in _stored_tensors(p)):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a fresh spawned Python process (ru_maxrss is per process, so its peak RSS is this run's alone);
    returns its result. `fn` must be importable by name (a module-level function)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()

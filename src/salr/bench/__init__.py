"""Benchmarks behind `salr bench`, one module per concern:

- `kernel`: y = x @ W.T for one layer shape, dense bf16 / fp32 vs the bitmap op (CPU), and the Triton bitmap kernel
  vs cuBLAS dense and 2:4 (GPU; under TRITON_INTERPRET=1 on the CPU, correctness only);
- `generation`: end-to-end greedy decoding, dense vs SALR (prefill ms, decode tokens/s, peak memory);
- `checkpoint_size`: checkpoint bytes on disk, dense bf16 vs SALR;
- `training`: fine-tuning peak memory and step time, SALR vs LoRA of the same trainable rank;
- `models`: the models compared (random Llama-3-8B shapes, the SALR copy of a dense model);
- `timing`: interleaved timing, device sync, the environment, bytes of a model, a child process for peak RSS.

Dense bf16 on the CPU is timed through both of torch's paths, oneDNN and its own kernels (`timing.onednn`), and the
faster is the baseline: neither wins everywhere (on an AMD Zen 4, oneDNN's one-token bf16 linear took twice as long as
torch's own). Whatever is compared is timed in one process with interleaved repetitions (A B C A B C ..., the order
alternating), and medians are reported, so drifting machine load affects every contender alike. Outputs are checked
against a reference (`max_rel_err`, `snr_db`) so a fast wrong kernel cannot pass unnoticed. Peak memory on the CPU is
the resident set size of a child process that does only that one thing (ru_maxrss is per process); on CUDA it is
torch.cuda.max_memory_allocated. Every number is measured when the function runs; nothing is cached or estimated, and
no pass/fail targets are applied: the reports hold the measurements only.
"""

from salr.bench.checkpoint_size import checkpoint_sizes
from salr.bench.generation import cuda_generation_compare, generation_report
from salr.bench.kernel import (
    CACHE_CHOICES,
    SHAPES,
    TABLE_HEADER,
    TOKENS,
    format_row,
    kernel_grid,
    parse_shape,
    triton_kernel_grid,
)
from salr.bench.timing import ONEDNN_CHOICES
from salr.bench.training import train_memory

__all__ = [
    "CACHE_CHOICES",
    "ONEDNN_CHOICES",
    "SHAPES",
    "TABLE_HEADER",
    "TOKENS",
    "checkpoint_sizes",
    "cuda_generation_compare",
    "format_row",
    "generation_report",
    "kernel_grid",
    "parse_shape",
    "train_memory",
    "triton_kernel_grid",
]

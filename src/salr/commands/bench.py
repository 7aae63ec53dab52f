"""`salr bench --kernel`: time the bitmap kernel against torch dense bf16 / fp32 and write JSON."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from salr import bench
from salr.errors import SALRError
from salr.io import atomic_write_json
from salr.sparse.ops import BACKENDS

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark the bitmap kernel against dense torch matmuls")
    p.add_argument("--kernel", action="store_true", help="layer-level kernel benchmark (the only mode so far)")
    p.add_argument("--shape", action="append", type=bench.parse_shape, metavar="OUTxIN",
                   help="weight shape, repeatable (default: the whole grid)")  # fmt: skip
    p.add_argument("--tokens", action="append", type=int, metavar="M", help="tokens per call, repeatable")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured magnitude sparsity of the weight")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="bitmap kernel backend (auto: the op's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, help="torch / kernel threads (default: torch's)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case (at least 5 rounds)")
    p.add_argument("--json", metavar="OUT", help="write the results here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.kernel:
        raise SALRError("choose a benchmark: --kernel (end-to-end --generate is not wired up yet)")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shape or bench.SHAPES
    tokens = args.tokens or bench.TOKENS
    if any(m <= 0 for m in tokens):
        raise SALRError("--tokens must be positive")
    print(bench.TABLE_HEADER, flush=True)
    report = bench.kernel_grid(
        shapes, tokens, args.sparsity, args.backend, args.device, args.budget,
        progress=lambda case: print(bench.format_row(case), flush=True),
    )  # fmt: skip
    if len(report["results"]) == 1:  # one case: its fields at the top level (the checks read them there)
        report = {**report["results"][0], "environment": report["environment"]}
    if args.json:
        atomic_write_json(args.json, report)
        logger.info("wrote %s", args.json)
    sys.stdout.flush()
    return 0

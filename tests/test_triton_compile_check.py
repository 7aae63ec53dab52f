"""benchmarks/triton_compile_check.py: salr's Triton kernels compiled for a GPU architecture without a GPU (a stub
driver, Triton's own ptxas), with the shared memory each variant needs. Run in a child process: the tests' own
process has TRITON_INTERPRET=1 set, and the check needs Triton's compiler instead."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: pip install --no-deps triton")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "triton_compile_check.py"


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--one-config", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return proc, json.loads(out.read_text())


def test_dense_decode_kernel_compiles_for_sm90(tmp_path):
    proc, report = _run(tmp_path, "--dtype", "bfloat16", "--only", "bitmap 96x256 bfloat16 M=300 grad")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert report["arch"] == 90 and report["failed_cases"] == [] and len(report["cases"]) == 1
    (variant,) = report["cases"][0]["new_variants"]
    assert variant["kernel"] == "_bitmap_decode_kernel" and 0 < variant["shared_bytes"] <= 232448 and variant["fits"]


def test_a_case_over_the_shared_memory_limit_fails_the_check(tmp_path):
    """On sm_86 (99 KiB per block) the one-config NF4 prefill tile in fp32 needs more: the case fails, exit 1."""
    proc, report = _run(tmp_path, "--arch", "86", "--dtype", "float32", "--only", "nf4 96x256 float32 M=17 forward")
    assert proc.returncode == 1
    assert report["failed_cases"] == ["nf4 96x256 float32 M=17 forward"]
    assert report["variants_over_shared_memory"] == 1 and "shared memory" in report["cases"][0]["error"]

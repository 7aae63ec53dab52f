"""benchmarks/gpu_suite.py without a GPU: it refuses at once with one clear line, and its CPU-side parts (arguments,
stage runner, pytest summary, markdown) work on synthetic results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_cuda_fails_fast_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs an NVIDIA GPU" in lines[0] and "torch.cuda.is_available() is False" in lines[0]
    assert not (tmp_path / "out").exists()  # it stopped before building or writing anything


def test_bad_arguments_are_refused(suite):
    with pytest.raises(suite.SuiteError, match="must be positive"):
        suite.parse_args(["--out", "x", "--steps", "0"])
    with pytest.raises(suite.SuiteError, match="must be positive"):
        suite.parse_args(["--out", "x", "--stage-timeout", "0"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "x", "--only", "nonsense"])
    assert suite.parse_args(["--out", "x", "--only", "tests", "--only", "kernels"]).stages == ["kernels", "tests"]
    assert suite.parse_args(["--out", "x"]).stages == list(suite.STAGES)


def test_issue_grid_is_what_the_kernel_stage_covers(suite):
    assert suite.KERNEL_SHAPES == [(4096, 4096), (14336, 4096), (4096, 14336)]
    assert suite.KERNEL_TOKENS == [1, 16, 128, 2048]
    assert all((ROOT / f).is_file() for f in suite.CUDA_TEST_FILES)


def test_run_stages_records_failures_and_keeps_going(suite, capsys):
    args = suite.parse_args(["--out", "x", "--only", "kernels", "--only", "tests"])
    calls = []

    def broken(a):
        calls.append("kernels")
        raise RuntimeError("CUDA out of memory")

    def fine(a):
        calls.append("tests")
        return {"command": "pytest", "returncode": 0, "counts": {"passed": 3}}

    functions = {"kernels": broken, "tests": fine}
    seen = []
    stages = suite.run_stages(
        args, lambda name: suite.run_stage(name, args, functions), lambda s: seen.append(list(s))
    )
    assert calls == ["kernels", "tests"]
    assert seen == [["kernels"], ["kernels", "tests"]]  # the report is rewritten after each stage
    assert stages["kernels"]["error"] == "RuntimeError: CUDA out of memory"
    assert "in broken" in stages["kernels"]["traceback"]  # where it failed, for the report
    assert stages["tests"]["counts"] == {"passed": 3} and stages["tests"]["seconds"] >= 0
    assert "kernels" in capsys.readouterr().out


def test_child_stage_that_hangs_or_dies_is_recorded(suite, monkeypatch):
    """run_child: a stage's process that outlives --stage-timeout or exits without its JSON becomes an `error`."""
    args = suite.parse_args(["--out", "x", "--stage-timeout", "5"])

    def hang(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], output="compiling kernel 17 of 40")

    monkeypatch.setattr(suite.subprocess, "run", hang)
    result = suite.run_child("decode", args, ["--out", "x"])
    assert result["error"] == "timed out after 5 s (--stage-timeout)"
    assert result["output_tail"] == "compiling kernel 17 of 40"

    def crash(cmd, **kw):
        assert cmd[-4:-2] == ["--only", "train"] and cmd[-2] == "--child"
        return subprocess.CompletedProcess(cmd, -11, stdout="", stderr="Segmentation fault")

    monkeypatch.setattr(suite.subprocess, "run", crash)
    result = suite.run_child("train", args, ["--out", "x"])
    assert result == {"error": "the stage's process exited with code -11 without a result",
                      "output_tail": "Segmentation fault"}  # fmt: skip


def test_child_command_line_drops_the_stage_choice(suite):
    argv = ["--out", "o", "--only", "kernels", "--only=tests", "--rounds", "2"]
    assert suite._stage_argv(argv) == ["--out", "o", "--rounds", "2"]


@pytest.mark.parametrize(
    "text,counts",
    [
        ("....s\n4 passed, 1 skipped in 2.31s\n", {"passed": 4, "skipped": 1}),
        ("F.\n=== 1 failed, 1 passed, 2 deselected in 9.0s ===\n", {"failed": 1, "passed": 1, "deselected": 2}),
        ("no tests ran in 0.01s\n", {}),
    ],
)
def test_pytest_summary(suite, text, counts):
    assert suite.pytest_summary(text) == counts


def _kernel_case(shape, m, dense_ms, bitmap_ms, ss_ms):
    return {"shape": list(shape), "tokens": m, "dense_ms": dense_ms, "bitmap_triton_ms": bitmap_ms,
            "bitmap_speedup_vs_dense": dense_ms / bitmap_ms, "semi_structured_ms": ss_ms,
            "semi_structured_speedup_vs_dense": None if ss_ms is None else dense_ms / ss_ms}  # fmt: skip


def test_markdown_renders_every_stage(suite):
    tps = {"dense_bf16": 40.0, "salr": 60.0, "salr_2to4": 50.0}
    report = {
        "gpu": "NVIDIA H200",
        "date": "2026-12-01 22:00 UTC",
        "seconds": 300.0,
        "stages": {
            "kernels": {
                "seconds": 60.0,
                "cases": [
                    _kernel_case((4096, 4096), 1, 0.02, 0.0125, None),
                    {**_kernel_case((4096, 14336), 2048, 1.0, 1.25, 0.8), "bitmap_path": "decode+cublas"},
                ],
            },  # fmt: skip
            "decode": {
                "seconds": 90.0,
                "cases": [
                    {
                        "model": "llama3-8b",
                        "salr_speedup_vs_dense_bf16": 1.5,
                        "salr_2to4_speedup_vs_dense_bf16": 1.25,
                        "results": {k: {"decode_tokens_per_s": v} for k, v in tps.items()},
                    }
                ],
            },  # fmt: skip
            "train": {
                "seconds": 100.0,
                "batch": 4,
                "seq": 256,
                "salr_over_lora_peak": 0.7,
                "results": {
                    "lora": {"peak_memory_mib": 30000.0, "step_ms": 900.0},
                    "salr": {"peak_memory_mib": 21000.0, "step_ms": 1000.0},
                },
            },  # fmt: skip
            "tests": {"seconds": 50.0, "command": "pytest -q", "returncode": 0, "counts": {"passed": 40}},
            "qkernels": {
                "seconds": 30.0,
                "cases": [
                    {
                        "shape": [4096, 4096],
                        "tokens": 1,
                        "dense_ms": 0.02,
                        "bitmap_bf16_triton_ms": 0.0125,
                        "qbitmap_triton_ms": 0.01,
                        "qbitmap_speedup_vs_dense": 2.0,
                        "qbitmap_snr_db": 41.23,
                    }
                ],
            },  # fmt: skip
        },
    }
    md = suite.markdown(report)
    assert "NVIDIA H200" in md
    assert (
        "| 4096x4096 | 1 | 0.0200 | 0.0125 | - | 1.60x | ≥ 1.50x | n/a | n/a | ≥ 1.20x |" in md
    )  # no path: older JSON
    assert "| 4096x14336 | 2048 | 1.0000 | 1.2500 | decode+cublas | 0.80x | ≥ 0.90x | 0.8000 | 1.25x | ≥ 1.20x |" in md
    assert "| llama3-8b | 40.0 | 60.0 | 50.0 | 1.50x | 1.25x |" in md
    assert "| lora | 30000 | 900 |" in md and "**0.70**" in md
    assert "exit 0, {'passed': 40}" in md
    assert "| 4096x4096 | 1 | 0.0200 | 0.0125 | 0.0100 | 2.00x | 41.2 |" in md
    failed = {**report, "stages": {"train": {"seconds": 1.0, "error": "RuntimeError: boom"}}}
    assert "failed: `RuntimeError: boom`" in suite.markdown(failed)
    json.dumps(report)  # the report the suite writes is plain JSON


def test_main_child_and_parent_write_their_json(suite, monkeypatch, tmp_path):
    """The suite's two roles, with the GPU check and the stage bodies replaced: a child writes its one stage's
    result, the parent rewrites gpu_suite.json and .md after every stage."""
    monkeypatch.setattr(suite, "require_cuda", lambda: "Fake GPU")
    monkeypatch.setitem(suite.STAGE_FUNCTIONS, "tests", lambda a: {"command": "pytest", "returncode": 0, "counts": {}})
    child_json = tmp_path / "child.json"
    assert suite.main(["--out", str(tmp_path / "o"), "--only", "tests", "--child", str(child_json)]) == 0
    assert json.loads(child_json.read_text()) == {"command": "pytest", "returncode": 0, "counts": {}}

    monkeypatch.setattr(suite, "run_child", lambda name, args, argv: suite.run_stage(name, args))
    monkeypatch.setitem(suite.STAGE_FUNCTIONS, "kernels", lambda a: 1 / 0)
    assert suite.main(["--out", str(tmp_path / "o"), "--only", "kernels", "--only", "tests"]) == 1  # one failed
    report = json.loads((tmp_path / "o" / "gpu_suite.json").read_text())
    assert report["gpu"] == "Fake GPU" and list(report["stages"]) == ["kernels", "tests"]
    assert report["stages"]["kernels"]["error"] == "ZeroDivisionError: division by zero"
    assert "failed: `ZeroDivisionError" in (tmp_path / "o" / "gpu_suite.md").read_text()


def test_tests_stage_runs_pytest_with_one_config_per_kernel(suite, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen.update(cmd=cmd, env=kw["env"])
        return subprocess.CompletedProcess(cmd, 0, stdout="3 passed in 1.0s\n", stderr="")

    monkeypatch.setattr(suite.subprocess, "run", fake_run)
    result = suite.stage_tests(suite.parse_args(["--out", "x"]))
    assert seen["env"]["SALR_TRITON_AUTOTUNE"] == "0" and result["counts"] == {"passed": 3}
    assert all(f in seen["cmd"] for f in suite.CUDA_TEST_FILES)


def test_train_stages_measure_without_and_with_checkpointing(suite, monkeypatch):
    import salr.bench.training as training

    calls = []

    def fake(spec, device, batch, seq, steps, checkpointing=False):
        calls.append((spec, device, batch, seq, steps, checkpointing))
        results = {
            "lora": {"peak_memory_mib": 100.0, "step_ms": 1.0},
            "salr": {"peak_memory_mib": 70.0, "step_ms": 2.0},
        }
        return {"batch": batch, "seq": seq, "gradient_checkpointing": checkpointing, "salr_over_lora_peak": 0.7,
                "results": results}  # fmt: skip

    monkeypatch.setattr(training, "train_memory", fake)
    args = suite.parse_args(["--out", "x"])
    plain, ckpt = suite.STAGE_FUNCTIONS["train"](args), suite.STAGE_FUNCTIONS["train_ckpt"](args)
    assert calls == [("llama3-8b", "cuda", 4, 256, 3, False), ("llama3-8b", "cuda", 4, 256, 3, True)]
    stages = {"train": {**plain, "seconds": 1.0}, "train_ckpt": {**ckpt, "seconds": 1.0}}
    md = suite.markdown({"gpu": "G", "date": "d", "seconds": 1.0, "stages": stages})
    assert "batch 4 x 256." in md and "batch 4 x 256, gradient checkpointing." in md


def test_failed_tests_are_named_from_verbose_output(suite):
    out = (
        "[gw3] [ 45%] PASSED tests/test_kernels_triton.py::test_a[1-33-37-dtype0]\n"
        "[gw1] [ 46%] FAILED tests/test_semi_structured.py::test_gpu_path\n"
        "tests/test_kernels_triton_qbitmap.py::test_b[nf4] ERROR\n"
        "FAILED tests/test_semi_structured.py::test_gpu_path - AssertionError: boom\n"
    )
    assert suite.failed_tests(out) == ["tests/test_kernels_triton_qbitmap.py::test_b[nf4]",
                                       "tests/test_semi_structured.py::test_gpu_path"]  # fmt: skip


def test_decode_stages_without_and_with_cuda_graphs(suite, monkeypatch):
    import salr.bench.generation as generation

    calls = []
    monkeypatch.setattr(generation, "cuda_generation_compare", lambda *a, **kw: calls.append((a, kw)) or {"cases": []})
    args = suite.parse_args(["--out", "x"])
    suite.STAGE_FUNCTIONS["decode"](args)
    suite.STAGE_FUNCTIONS["decode_graph"](args)
    assert [kw["cuda_graph"] for _, kw in calls] == [False, True]
    assert all(a == (["llama3-8b"], 32, 128, 3) for a, _ in calls)

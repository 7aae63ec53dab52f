"""Benchmark plumbing (never timings): byte accounting, shape parsing, the JSON contract of `salr bench --kernel`."""

import argparse
import json

import pytest

from salr import bench
from salr.commands import bench as bench_cmd
from salr.errors import SALRError


def test_weight_bytes_at_half_sparsity():
    b = bench.weight_bytes((4096, 4096), 4096 * 4096 // 2)
    assert b["dense_bytes"] == 2 * 4096 * 4096
    assert b["bitmap_ideal_bytes"] == 4096 * 4096 // 8 + 4096 * 4096
    assert b["bits_per_weight"] == pytest.approx(9.0)
    assert b["compression"] == pytest.approx(16 / 9)
    assert b["row_offsets_bytes"] == 8 * 4096


def test_pruned_weight_has_requested_sparsity():
    w = bench.pruned_weight(64, 80, 0.5)
    assert (w == 0).sum().item() == 64 * 80 // 2
    kept = w[w != 0].abs().min()
    assert kept >= bench.pruned_weight(64, 80, 0.0).abs()[w == 0].max()  # magnitude pruning: smallest go


@pytest.mark.parametrize("text, shape", [("4096x4096", (4096, 4096)), ("14336X4096", (14336, 4096))])
def test_parse_shape(text, shape):
    assert bench.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["4096", "ax4", "0x5", "3x4x5"])
def test_parse_shape_rejects(text):
    with pytest.raises(SALRError):
        bench.parse_shape(text)


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


def test_grid_json_has_every_case(tmp_path):
    out = tmp_path / "g.json"
    argv = ["--kernel", "--shape", "16x24", "--shape", "24x16", "--tokens", "1", "--tokens", "9"]
    assert _run([*argv, "--budget", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(c["shape"], c["tokens"]) for c in r["results"]] == [
        ([16, 24], 1), ([16, 24], 9), ([24, 16], 1), ([24, 16], 9),
    ]  # fmt: skip
    assert r["environment"]["threads"] >= 1


def test_bad_arguments_raise():
    with pytest.raises(SALRError, match="--kernel"):
        _run([])
    with pytest.raises(SALRError, match="CUDA"):
        _run(["--kernel", "--shape", "8x8", "--tokens", "1", "--backend", "triton"])

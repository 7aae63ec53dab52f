"""salr merge: the dense merge is exact, the sparse merge never leaves a pruned position nonzero (any layer, any
adapter), the re-pruned merge keeps each row's zero count (or N:M) and is closer to the dense merge than the mask,
and `salr merge RUN` writes a plain transformers checkpoint with the sparsity measured on its weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import salr
from salr.bases import DenseBase
from salr.cli import main
from salr.convert import salr_modules
from salr.experts import SALRExpertsProjection
from salr.layer import SALRLinear
from salr.merge import REPORT_NAME, base_mask, merge_model, merged_weight, reprune, resolve_run
from salr.train import TrainConfig, train

CONFIG = salr.SALRConfig.from_preset("paper", residual_rank=4, r=2)


def trained_like(model: torch.nn.Module, config: salr.SALRConfig = CONFIG, seed: int = 1) -> torch.nn.Module:
    """Convert and move the LoRA blocks away from B = 0, as training would."""
    salr.convert(model, config, progress=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in salr_modules(model):
            m.B_cat.add_(torch.randn(m.B_cat.shape, generator=g) * 0.05)
    return model


def _layer(out_dim, in_dim, sparsity, r_res, r_lora, seed, scale=2.0, signed_zeros=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_dim, in_dim, generator=g)
    w[torch.rand(out_dim, in_dim, generator=g) < sparsity] = 0.0
    if signed_zeros:
        w[w == 0] = -0.0  # a -0.0 is a pruned position too
    A = torch.randn(r_res + r_lora, in_dim, generator=g)
    B = torch.randn(out_dim, r_res + r_lora, generator=g) * 10
    return SALRLinear(DenseBase(w), None, A, B, residual_rank=r_res, lora_scale=scale)


@settings(max_examples=40, deadline=None)
@given(
    out_dim=st.integers(1, 24),
    in_dim=st.integers(1, 40),
    sparsity=st.floats(0.0, 1.0),
    r_res=st.integers(0, 4),
    r_lora=st.integers(0, 4),
    seed=st.integers(0, 2**16),
    signed_zeros=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_sparse_merge_never_leaves_a_pruned_position_nonzero(
    out_dim, in_dim, sparsity, r_res, r_lora, seed, signed_zeros, dtype
):
    layer = _layer(out_dim, in_dim, sparsity, r_res, r_lora, seed, signed_zeros=signed_zeros)
    layer.base = DenseBase(layer.base.weight.to(dtype))
    pruned = ~base_mask(layer)
    merged = merged_weight(layer, "sparse")
    assert merged.dtype == dtype and merged.shape == (out_dim, in_dim)
    assert not merged[pruned].any()
    assert torch.equal(merged[~pruned], layer.merged_weight()[~pruned])  # the kept positions are the dense merge's
    dense = merged_weight(layer, "dense")
    assert torch.equal(dense, layer.merged_weight())


def test_sparse_merge_of_experts_keeps_each_experts_mask():
    g = torch.Generator().manual_seed(0)
    bases = [DenseBase(torch.randn(6, 8, generator=g) * (torch.rand(6, 8, generator=g) > 0.5)) for _ in range(3)]
    proj = SALRExpertsProjection(bases, torch.randn(3, 5, 8, generator=g), torch.randn(3, 6, 5, generator=g), 3, 2.0)
    merged = merged_weight(proj, "sparse")
    mask = torch.stack([b.weight != 0 for b in bases])
    assert merged.shape == (3, 6, 8) and not merged[~mask].any()
    assert torch.equal(merged[mask], proj.merged_weight()[mask])


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reprune_keeps_the_zero_count_of_each_row_and_is_closer_than_the_mask(nm):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 32, generator=g)
    if nm is None:
        w[torch.rand(16, 32, generator=g) < torch.linspace(0.2, 0.8, 16)[:, None]] = 0  # a different count per row
    else:
        w = w * salr.pruning.nm_mask(w, *nm)
    layer = SALRLinear(DenseBase(w), None, torch.randn(6, 32, generator=g), torch.randn(16, 6, generator=g), 4, 2.0)
    dense = merged_weight(layer, "dense")
    e2, e3 = merged_weight(layer, "sparse", "mask"), merged_weight(layer, "sparse", "reprune", nm)
    assert torch.equal((e3 != 0).sum(1), (w != 0).sum(1))
    if nm is not None:
        assert ((e3 != 0).reshape(16, 8, 4).sum(-1) == 2).all()
    assert torch.equal(e3[e3 != 0], dense[e3 != 0])
    # E3 <= E2 for every matrix: with the same zeros per row, dropping the smallest entries loses the least
    assert (dense - e3).norm() < (dense - e2).norm()
    assert torch.equal(reprune(dense, w != 0, nm), e3)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_mixtral"])
def test_merge_model_dense_is_exact_and_sparse_keeps_the_base_sparsity(family, request):
    original = request.getfixturevalue(family)
    dense_model = trained_like(copy.deepcopy(original))
    model = trained_like(original)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    report = merge_model(dense_model, "dense")
    assert not salr_modules(dense_model)
    with torch.no_grad():
        assert (dense_model(ids).logits - ref).abs().max() < 1e-5
    assert report["totals"]["sparsity"] < 0.01 and report["totals"]["nonzero_at_pruned"] > 0
    sparse = merge_model(model, "sparse")
    t = sparse["totals"]
    assert t["nonzero_at_pruned"] == 0 and t["sparsity"] >= t["base_sparsity"] > 0.45
    expected = 12 if family == "tiny_mixtral" else 14  # mixtral: q/k/v/o + 2 expert params, x 2 layers
    assert len(sparse["layers"]) == expected
    for row in sparse["layers"]:
        assert row["sparsity"] >= row["base_sparsity"] and row["nonzero_at_pruned"] == 0


def _train_run(tiny_llama, out, max_steps=2, save_every=0):
    model = tiny_llama
    salr.convert(model, CONFIG, progress=False)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(8):
        prompt = torch.randint(3, 128, (8 + i % 3,), generator=gen).tolist()
        examples.append({"input_ids": prompt + prompt[:4], "labels": [-100] * len(prompt) + prompt[:4]})
    cfg = TrainConfig(lr=1e-2, max_steps=max_steps, batch_size=4, warmup_steps=1, save_every=save_every)
    cfg.progress = False
    train(model, None, examples, CONFIG, cfg, out)
    return model


def test_salr_merge_cli_writes_a_transformers_checkpoint_with_measured_sparsity(tiny_llama, tmp_path, capsys):
    run = tmp_path / "run"
    model = _train_run(tiny_llama, run)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(5))
    model.eval()
    argv = ["merge", str(run), "--mode", "sparse", "--out", str(tmp_path / "m"), "--check-windows", "2"]
    assert main([*argv, "--check-length", "16"]) == 0
    out = capsys.readouterr().out
    assert "measured sparsity" in out and "accuracy cost on 2 windows" in out
    report = json.loads((tmp_path / "m" / REPORT_NAME).read_text())
    assert report["mode"] == "sparse" and report["rule"] == "mask"
    assert {"name", "shape", "sparsity"} <= set(report["layers"][0]) and "sparsity" in report["totals"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # stock transformers
    zeros = numel = 0
    for row in report["layers"]:
        weight = merged.get_submodule(row["name"]).weight
        assert float((weight == 0).float().mean()) == pytest.approx(row["sparsity"])
        base = dict(salr_modules(model))[row["name"]].base.to_dense()
        assert not weight[base == 0].any()
        zeros, numel = zeros + int((weight == 0).sum()), numel + weight.numel()
    assert report["totals"]["sparsity"] == pytest.approx(zeros / numel)
    acc = report["accuracy"]
    assert acc["tokens"] == 30 and acc["perplexity_merged"] > 0 and 0 <= acc["top1_agreement"] <= 1
    with torch.no_grad():  # the sparse merge drops (1 - M) ⊙ ΔW: close to, not equal to, the SALR model
        diff = (merged(ids).logits - model(ids).logits).abs().max()
    assert 0 < diff < 1.0


def test_merge_of_an_unfinished_run_uses_its_latest_checkpoint(tiny_llama, tmp_path):
    run = tmp_path / "run"
    _train_run(tiny_llama, run, max_steps=2, save_every=1)
    (run / "salr_config.json").unlink()  # as if the run were still going: no final model yet
    assert resolve_run(run).name == "step-0000002"
    with pytest.raises(salr.SALRError, match="neither a SALR checkpoint"):
        resolve_run(tmp_path)


def test_merge_refuses_a_foreign_output_directory(tiny_llama, tmp_path):
    salr.save(trained_like(tiny_llama), tmp_path / "ckpt", CONFIG)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert main(["merge", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--check-windows", "0"]) == 2
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_merge_never_replaces_its_source_a_run_a_model_or_files_it_did_not_write(tiny_llama, tmp_path, capsys):
    """Every model directory has a config.json: a merge replaces only an earlier merge (merge_report.json), and
    only when that holds nothing the new merge does not write."""
    run, ckpt, dense = tmp_path / "run", tmp_path / "ckpt", tmp_path / "dense"
    tiny_llama.config.save_pretrained(dense)  # stands for a user's transformers model directory
    salr.save(trained_like(copy.deepcopy(tiny_llama)), ckpt, CONFIG)
    _train_run(tiny_llama, run, max_steps=2, save_every=1)
    for target in (run, ckpt, dense):
        before = _listing(target)
        assert main(["merge", str(run), "--out", str(target), "--check-windows", "0", "--quiet"]) == 2
        assert "not an earlier model directory (no merge_report.json)" in capsys.readouterr().err
        assert _listing(target) == before
    out = tmp_path / "merged"
    argv = ["merge", str(run), "--out", str(out), "--check-windows", "0", "--quiet"]
    assert main(argv) == 0 and main(argv) == 0  # an earlier merge is replaced
    (out / "notes.txt").write_text("mine")
    assert main(argv) == 2
    assert "holds notes.txt, which salr did not write there" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / REPORT_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_a_mask_preserving_method_merges_exactly_in_both_modes():
    """A FusedAdapters layer whose update is M ⊙ (B A) (LoSA's LoSALinear does this): merged through its own
    merged_weight(), the sparse merge equals the dense one and keeps the base's sparsity exactly."""

    class MaskedUpdate(SALRLinear):
        def delta_weight(self):
            return super().delta_weight() * (self.base.to_dense() != 0)

    layer = _layer(12, 20, 0.5, 0, 3, seed=7)
    layer.__class__ = MaskedUpdate
    dense, sparse = merged_weight(layer, "dense"), merged_weight(layer, "sparse")
    assert torch.equal(dense, sparse) and torch.equal(dense, layer.merged_weight())
    assert torch.equal(dense == 0, layer.base.to_dense() == 0)
    model = torch.nn.Sequential(layer)
    report = merge_model(model, "dense")
    assert isinstance(model[0], torch.nn.Linear) and torch.equal(model[0].weight, dense)
    assert report["totals"]["nonzero_at_pruned"] == 0
    assert report["totals"]["sparsity"] == report["totals"]["base_sparsity"]

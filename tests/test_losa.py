"""salr.losa: the schedules, RMI on synthetic layers with known redundancy, the LP for block sparsities, rank
allocation to the exact budget, the masked LoRA update that never writes a pruned position, progressive N:M
masks, and whole LoSA runs (unstructured and 2:4, Wanda and SparseGPT) whose merged sparsity is the target."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import salr
from salr.bases import DenseBase
from salr.calibration import LayerStats
from salr.cli import main
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.losa import LoSAConfig, LoSALinear, train_losa
from salr.losa.allocate import (
    allocate_ranks,
    block_importance,
    block_sparsities,
    linear_cka,
    reconstruction_error,
    rmi_matrix,
    sample_gram,
)
from salr.losa.config import apportion, mean_rank, round_sparsity, sparsity_box
from salr.losa.loop import attach, prune_round
from salr.losa.prune import progressive_nm_mask, prune_weight, row_keep_mask
from salr.pruning import sparsegpt
from salr.train import TrainConfig, method_config

# ----------------------------------------------------------------------------- schedules


def test_cubic_sparsity_schedule_reaches_the_target():
    values = [round_sparsity(0.5, t, 5) for t in range(1, 6)]
    assert values == pytest.approx([0.244, 0.392, 0.468, 0.496, 0.5])
    assert round_sparsity(0.7, 5, 5) == 0.7 and round_sparsity(0.5, 1, 1) == 0.5
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def test_sparsity_box_and_mean_rank():
    assert [sparsity_box(s) for s in (0.3, 0.5, 0.55, 0.65)] == [0.01, 0.01, 0.02, 0.03]
    assert sparsity_box(0.8, previous=0.03) == 0.03  # the reference code keeps the last δ above 70 %
    # LoSA's 6, 7, 8, 9, 10 as fractions of the final mean rank
    assert [mean_rank(10, t, 5, 0.6) for t in range(1, 6)] == pytest.approx([6, 7, 8, 9, 10])


@pytest.mark.parametrize("total", [5, 12, 60, 61, 1250])
def test_steps_split_one_to_six_sums_exactly(total):
    parts = apportion(total, [1, 1, 1, 1, 6], minimum=1)
    assert sum(parts) == total and min(parts) >= 1
    if total == 1250:
        assert parts == [125, 125, 125, 125, 750]  # the reference code's step counts for 7B


def test_config_validation():
    assert LoSAConfig(rounds=3).weights() == [1.0, 1.0, 6.0]  # cut from the front: the last round stays long
    assert LoSAConfig(rounds=7).weights() == [1, 1, 1, 1, 6, 6, 6]
    for bad in ({"rounds": 0}, {"prune_method": "magnitude"}, {"round_weights": "1,x"}, {"max_rank_factor": 0.5}):
        with pytest.raises(salr.SALRError):
            LoSAConfig(**bad)


# ----------------------------------------------------------------------------- RMI


def test_linear_cka_properties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 40, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen))
    assert linear_cka(sample_gram(x), sample_gram(x)) == pytest.approx(1.0)
    assert linear_cka(sample_gram(x), sample_gram(3.0 * x @ q)) == pytest.approx(1.0)  # orthogonal + scale
    y = torch.randn(16, 40, generator=gen)
    related = linear_cka(sample_gram(x), sample_gram(x + 0.3 * y))
    assert related > 0.9 and linear_cka(sample_gram(x), sample_gram(y)) < related - 0.2
    assert linear_cka(sample_gram(x), sample_gram(torch.ones(16, 40))) == 0.0  # constant: no information


def test_rmi_finds_the_redundant_layers():
    """A 6-layer 'network' whose layers 1-3 barely change the residual stream (redundant with each other and
    with layer 0) while layers 4 and 5 write new directions: the redundant ones are the least important, so they
    are pruned more, and the new-information layers less."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(24, 8, 32, generator=gen)
    feats = [h]
    for i in range(1, 6):
        step = 0.05 if i <= 3 else 3.0
        h = h + step * torch.randn(h.shape, generator=gen)
        feats.append(h)
    grams = [sample_gram(f) for f in feats[:6]]
    rmi = rmi_matrix(grams)
    assert torch.allclose(rmi, rmi.T) and torch.allclose(torch.diagonal(rmi), torch.ones(6, dtype=rmi.dtype))
    assert min(rmi[i, j] for i in range(4) for j in range(4)) > 0.95
    imp = block_importance(rmi)
    assert int(imp.argmax()) == 5 and set(imp.argsort()[:3].tolist()) <= {0, 1, 2, 3}
    ratios = block_sparsities(imp, 0.5, 0.01)
    assert sum(ratios) / 6 == pytest.approx(0.5, abs=1e-12)
    assert ratios[5] == pytest.approx(0.49) and max(ratios[:4]) == pytest.approx(0.51)


@pytest.mark.parametrize("n", [5, 6, 30])
@pytest.mark.parametrize("mean,delta", [(0.5, 0.01), (0.392, 0.01), (0.65, 0.03), (0.005, 0.01)])
def test_block_sparsities_is_the_lp_vertex(n, mean, delta):
    imp = torch.rand(n, generator=torch.Generator().manual_seed(n))
    x = block_sparsities(imp, mean, delta)
    lo, hi = max(0.0, mean - delta), min(1.0, mean + delta)
    assert math.fsum(x) / n == pytest.approx(mean, abs=1e-12)
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in x)
    order = imp.argsort().tolist()  # less important -> more sparsity
    assert all(x[a] >= x[b] - 1e-12 for a, b in zip(order, order[1:], strict=False))
    if mean >= delta:
        assert sum(lo < v < hi for v in x) <= 1  # bang-bang: at most one block strictly inside (the median)


# ----------------------------------------------------------------------------- ranks and errors


@pytest.mark.parametrize("seed", range(6))
def test_rank_allocation_sums_exactly_to_the_budget(seed):
    gen = torch.Generator().manual_seed(seed)
    errors = (torch.rand(30, generator=gen) ** 4 * torch.logspace(0, 3, 30)).tolist()  # skewed, heavy clipping
    for budget in (30, 180, 240, 300, 480):
        ranks = allocate_ranks(errors, budget, max_rank=16)
        assert sum(ranks) == budget and min(ranks) >= 1 and max(ranks) <= 16
        order = sorted(range(30), key=lambda i: errors[i])
        assert ranks[order[-1]] >= ranks[order[0]]  # more error, at least as much rank
    with pytest.raises(salr.SALRError, match="not reachable"):
        allocate_ranks(errors, 481, max_rank=16)


def test_rank_allocation_single_pass_reproduces_the_reference_shortfall():
    errors = [math.exp(i / 3) for i in range(30)]  # exponentially growing with depth
    faithful = allocate_ranks(errors, 300, max_rank=16, exact=False)
    assert sum(faithful) < 300  # clipping at 16 loses rank the single pass cannot hand back
    assert sum(allocate_ranks(errors, 300, max_rank=16)) == 300
    uniform = allocate_ranks([1.0] * 4, 10, max_rank=8)
    assert sum(uniform) == 10 and max(uniform) - min(uniform) <= 1


def test_reconstruction_error_is_mean_relative_channel_error():
    d = [torch.ones(2, 3, 4)]
    s = [torch.ones(2, 3, 4) * torch.tensor([1.0, 1.0, 0.5, 0.0])]
    # channels: 0, 0, (0.5² · 6) / 6 = 0.25, 1 -> mean 0.3125
    assert reconstruction_error(d, s) == pytest.approx(0.3125)
    assert reconstruction_error(d, d) == 0.0


# ----------------------------------------------------------------------------- the masked layer


def _losa_layer(out=12, inp=16, rank=4, sparsity=0.5, seed=0, dropout=0.0) -> LoSALinear:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen)
    w = w * row_keep_mask(w.abs(), sparsity)
    A = torch.randn(rank, inp, generator=gen) * 0.3
    B = torch.randn(out, rank, generator=gen) * 0.3
    return LoSALinear(DenseBase(w), torch.randn(out, generator=gen), A, B, lora_scale=2.0, lora_dropout=dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.3])  # one fused GEMM without dropout, the masked branch with it
def test_masked_update_never_writes_a_pruned_position(dropout):
    layer = _losa_layer(dropout=dropout)
    pruned = layer.base.to_dense() == 0
    assert pruned.float().mean() == 0.5 and torch.equal(layer.mask, ~pruned)
    opt = torch.optim.AdamW([layer.A_cat, layer.B_cat], lr=0.05)
    x = torch.randn(64, 16)
    for _ in range(5):
        loss = (layer(x) - x[:, :12] * 3).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    merged = layer.merged_weight()
    assert torch.equal(merged == 0, pruned)  # the merged weight has exactly the base's zeros
    assert torch.equal(merged * layer.mask, merged)  # the generic sparse merge M ⊙ W is exact for LoSA
    delta = layer.delta_weight()
    assert torch.count_nonzero(delta[pruned]) == 0 and torch.count_nonzero(delta[~pruned]) == (~pruned).sum()
    layer.eval()
    with torch.no_grad():  # forward == merged linear map
        torch.testing.assert_close(layer(x), x @ merged.T + layer.bias, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-5, atol=1e-5)


def test_unmasked_training_ablation_updates_pruned_positions_but_merges_sparse():
    """masked_training=False trains B A like a LoRA on the pruned base (the forward reaches pruned positions), and
    merging masks the update, so the merged model is still exactly as sparse as the base."""
    layer = _losa_layer()
    layer.masked_training = False
    pruned = layer.base.to_dense() == 0
    x = torch.randn(64, 16)
    opt = torch.optim.AdamW([layer.A_cat, layer.B_cat], lr=0.05)
    for _ in range(3):
        (layer(x) - x[:, :12] * 3).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    full = layer.base.to_dense() + (layer.B_cat * layer.rank_scale) @ layer.A_cat
    with torch.no_grad():  # training forward: base + the unmasked update
        torch.testing.assert_close(layer(x), x @ full.T + layer.bias, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(layer(x), x @ layer.merged_weight().T + layer.bias, rtol=1e-3, atol=1e-3)
    merged = layer.merged_weight()
    assert torch.equal(merged == 0, pruned) and torch.equal(merged, full * layer.mask)
    layer.merge()
    assert layer.merged and torch.equal(layer.base.to_dense(), merged)  # the merge is the masked one


def test_a_layer_cast_as_load_model_casts_keeps_working():
    """salr.loaders.cast_weights casts parameters and persistent buffers but not rank_scale (non-persistent, like
    RoPE's inv_freq): the layer must still multiply its bf16 factors, forward and backward."""
    layer = _losa_layer()
    from salr.loaders import cast_weights

    model = torch.nn.Sequential(layer)
    model.config = type("Config", (), {})()
    cast_weights(model, torch.bfloat16)
    assert layer.B_cat.dtype == torch.bfloat16 and layer.rank_scale.dtype == torch.float32
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert torch.isfinite(layer.B_cat.grad).all() and layer.B_cat.grad.abs().sum() > 0


def test_active_rank_switches_components_off_and_scale_is_fixed():
    layer = _losa_layer(rank=6)
    layer.set_rank(2)
    expected = (layer.B_cat[:, :2] * 2.0) @ layer.A_cat[:2] * layer.mask
    torch.testing.assert_close(layer.delta_weight(), expected.detach())
    x = torch.randn(8, 16)
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.A_cat.grad[2:]) == 0 and torch.count_nonzero(layer.B_cat.grad[:, 2:]) == 0
    assert torch.count_nonzero(layer.A_cat.grad[:2]) > 0
    layer.set_rank(99)  # clipped to the capacity
    assert layer.active_rank == 6


def test_merge_prune_unmerge_keeps_the_update_in_the_factors():
    """Wanda path: after merge -> prune -> unmerge the base is M_new ⊙ W (its original values on the survivors) and
    the merged model equals base + M_new ⊙ ΔW."""
    layer = _losa_layer(sparsity=0.25)
    w_before = layer.base.to_dense().clone()
    layer.merge()
    assert layer.merged and torch.equal(layer.merged_weight(), layer.base.to_dense())
    merged = layer.base.to_dense()
    new = merged * row_keep_mask(merged.abs(), 0.5)
    layer.base = DenseBase(new)
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.mask, layer.base.to_dense() != 0)
    assert (layer.mask.float().mean()) == 0.5 and not (layer.mask & (w_before == 0)).any()
    torch.testing.assert_close(layer.base.to_dense(), w_before * layer.mask, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.merged_weight(), new, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- masks


def test_progressive_nm_masks_stay_nm_and_end_exact():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=gen)
    keep_prev = torch.ones_like(w, dtype=torch.bool)
    for s in (0.122, 0.196, 0.234, 0.248, 0.5):
        scores = torch.where(keep_prev, w.abs(), torch.full_like(w, -1.0))  # pruned earlier -> lowest
        keep = progressive_nm_mask(scores, 2, 4, s)
        groups = keep.reshape(8, 8, 4).sum(-1)
        assert (groups >= 2).all()  # never more than M - N pruned in a group
        assert (~keep).sum(1).eq(round(s * 32)).all()
        assert not (keep & ~keep_prev).any()  # masks only grow
        keep_prev = keep
    assert (keep_prev.reshape(8, 8, 4).sum(-1) == 2).all()  # exact 2:4 at the end


def test_prune_weight_wanda_and_sparsegpt():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen)
    stats = LayerStats((x.T @ x).double(), 200)
    w = torch.randn(12, 16, generator=gen)
    w[:, 0] = 0  # an already pruned column stays pruned
    for method in ("wanda", "sparsegpt"):
        for pattern, s in (("unstructured", 0.5), ("2:4", 0.3), ("2:4", 0.5)):
            p = prune_weight(w, stats, s, pattern, method)
            assert ((p == 0).sum(1) == round(s * 16)).all(), (method, pattern)
            if pattern == "2:4":
                assert ((p != 0).reshape(12, 4, 4).sum(-1) >= 2).all()
            if method == "wanda":
                assert (p[:, 0] == 0).all() and torch.equal(p[p != 0], w[p != 0])


def test_sparsegpt_with_a_given_mask_prunes_exactly_it():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(100, 16, generator=gen)
    w = torch.randn(6, 16, generator=gen)
    keep = torch.rand(6, 16, generator=gen) > 0.4
    pruned, mask = sparsegpt(w, x.T @ x, 0.4, keep_mask=keep)
    assert torch.equal(mask, keep) and torch.equal(pruned != 0, keep)
    plain = w * keep  # the OBS update makes the output error smaller than just masking
    err = lambda v: float(((v - w) @ x.T).pow(2).sum())  # noqa: E731
    assert err(pruned) < err(plain)


# ----------------------------------------------------------------------------- whole runs


def tiny_examples(n: int = 40, seed: int = 0, vocab: int = 128) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (8 + i % 5,), generator=gen).tolist()
        out.append({"input_ids": prompt + prompt[:6], "labels": [-100] * len(prompt) + prompt[:6]})
    return out


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "max_steps": 10, "batch_size": 4, "max_length": 64, "progress": False, **kw})


def _losa_config(pattern="unstructured", sparsity=0.5) -> salr.SALRConfig:
    base = salr.SALRConfig(sparsity=None if pattern != "unstructured" else sparsity, pattern=pattern,
                           residual_rank=0, r=4, lora_alpha=8, calibration="self")  # fmt: skip
    return method_config("losa", base)


@pytest.mark.parametrize(
    "pattern,method",
    [("unstructured", "wanda"), ("unstructured", "sparsegpt"), ("2:4", "wanda"), ("2:4", "sparsegpt")],
)
def test_losa_run_reaches_the_target_and_saves_a_plain_sparse_model(tiny_llama, tmp_path, pattern, method):
    config = _losa_config(pattern)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 12))
    losa = LoSAConfig(prune_method=method, rmi_fraction=0.5)
    report = train_losa(tiny_llama, None, tiny_examples(), config, _cfg(), losa, tmp_path / "run", calibration=calib)
    assert report["steps"] == 10 and [r["steps"] for r in report["rounds"]] == [1, 1, 1, 1, 6]
    assert report["merged_sparsity"] == pytest.approx(0.5, abs=1e-3)
    targets = [round_sparsity(0.5, t, 5) for t in range(1, 6)]
    measured = [r["measured_sparsity"] for r in report["rounds"]]
    assert measured == pytest.approx(targets, abs=0.02)
    for r in report["rounds"]:
        assert sum(r["ranks"]) == r["rank_budget"] and max(r["ranks"]) <= math.ceil(1.6 * 4)
    assert report["trainable_parameters"] == 4 * sum(
        m.in_features + m.out_features for m in tiny_llama.modules() if isinstance(m, torch.nn.Linear)
    ) - 4 * (tiny_llama.lm_head.in_features + tiny_llama.lm_head.out_features)  # equal to a uniform rank-4 LoRA
    if pattern == "2:4":
        for name, module in tiny_llama.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert ((module.weight != 0).reshape(module.out_features, -1, 4).sum(-1) == 2).all(), name
    with torch.no_grad():
        expected = tiny_llama(ids).logits
    reloaded, _ = salr.load(tmp_path / "run")  # the run is a SALR checkpoint (adapter-free) of the same model
    merged_report = json.loads((tmp_path / "run" / "merged" / "merge_report.json").read_text())
    assert merged_report["totals"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.011) for row in merged_report["layers"])
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 11))
    run = json.loads((tmp_path / "run" / "run.json").read_text())  # the run's arguments, as salr train records them
    assert run["method"] == "losa" and run["run_id"] == report["run_id"]
    assert run["losa_config"]["prune_method"] == method and run["salr_config"]["pattern"] == pattern


def test_losa_refuses_no_calibration_and_a_foreign_output(tiny_llama, tmp_path):
    config = SALRConfig(**{**_losa_config().to_dict(), "calibration": "none", "criterion": "magnitude",
                           "residual_init": "svd"})  # fmt: skip
    with pytest.raises(SALRError, match="calibration"):
        train_losa(tiny_llama, None, tiny_examples(), config, _cfg(), LoSAConfig(), tmp_path / "run")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(SALRError, match="not a salr run"):
        train_losa(tiny_llama, None, tiny_examples(), _losa_config(), _cfg(), LoSAConfig(), foreign, calibration=calib)
    assert not any(isinstance(m, LoSALinear) for m in tiny_llama.modules())  # refused before touching the model
    with pytest.raises(SALRError, match=r"5 rounds of at least one step each: 2 steps are too few.*--max-steps >= 5"):
        train_losa(tiny_llama, None, tiny_examples(), _losa_config(), _cfg(max_steps=2), LoSAConfig(), tmp_path / "r2",
                   calibration=calib)  # fmt: skip
    assert not (tmp_path / "r2").exists()  # refused before the run directory is made


def test_rmi_gives_blocks_different_sparsities_and_training_moves_the_merged_weights(tiny_llama, tmp_path):
    config = _losa_config()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(tiny_llama)
    report = train_losa(
        tiny_llama, None, tiny_examples(), config, _cfg(max_steps=6), LoSAConfig(save_merged=False),
        tmp_path / "run", calibration=calib,
    )  # fmt: skip
    last = report["rounds"][-1]
    assert sorted(last["block_sparsity"]) == pytest.approx([0.49, 0.51])  # 2 blocks: one each side of the box
    assert not (tmp_path / "run" / "merged").exists()
    # the fine-tuned update is in the merged weights: the survivors differ from the dense model's values
    w, w0 = tiny_llama.model.layers[1].mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight
    kept = w != 0
    assert (w[kept] - w0[kept]).abs().max() > 1e-4


def test_prune_round_never_writes_pruned_positions_between_rounds(tiny_llama):
    """After a round, every LoSA layer's mask is its base's nonzeros, masks only grow from round to round, and the
    layer's merged weight is zero wherever it is masked."""
    config = _losa_config()
    losa = LoSAConfig(rmi_allocation=False)
    layers = attach(tiny_llama, config, losa)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    state: dict = {}
    previous = {n: torch.ones_like(m.mask) for n, m in layers}
    for t in range(1, 6):
        for _, m in layers:  # pretend training moved the factors
            m.B_cat.data.normal_(0, 0.1)
        prune_round(tiny_llama, calib, config, losa, t, state)
        for name, m in layers:
            assert torch.equal(m.mask, m.base.to_dense() != 0)
            assert not (m.mask & ~previous[name]).any(), name
            assert torch.count_nonzero(m.merged_weight()[~m.mask]) == 0
            previous[name] = m.mask.clone()


def test_cli_train_losa_on_stories(stories_path, tmp_path, capsys):
    run = tmp_path / "run"
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in salr_data_records()))
    code = main([
        "train", "--model", str(stories_path), "--method", "losa", "--data", str(data_file), "--output", str(run),
        "--max-steps", "5", "--batch-size", "4", "--max-length", "256", "--lora-rank", "2", "--residual-rank", "2",
        "--calibration", str(data_file), "--calibration-samples", "4", "--calibration-length", "32",
        "--rounds", "2", "--round-weights", "1,4", "--prune-method", "sparsegpt", "--no-rank-allocation",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "losa: 5 steps" in out
    report = json.loads((run / "train_report.json").read_text())
    assert report["losa_config"]["prune_method"] == "sparsegpt" and report["losa_config"]["rounds"] == 2
    assert all(max(r["ranks"]) - min(r["ranks"]) <= 1 for r in report["rounds"])  # rank allocation off: uniform
    assert report["rounds"][-1]["ranks"] == [4] * 5 and report["trainable_parameters"] > 0
    assert report["merged_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert main(["eval", "--model", str(run), "--task", "wikitext2", "--data", str(data_file), "--limit", "1"]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--model", str(stories_path), "--method", "losa", "--data", str(data_file), "--output",
              str(tmp_path / "r2"), "--prune-method", "magnitude"])  # fmt: skip


def salr_data_records() -> list[dict[str, str]]:
    from salr import data

    return data.synthetic_arithmetic(24, seed=3)


def test_losa_layers_copy_and_compare_like_salr_layers(tiny_llama):
    """LoSA layers are SALRLinear: the helpers that walk SALR layers (salr_modules, mark_trainable) see them."""
    from salr.convert import salr_modules

    layers = attach(copy.deepcopy(tiny_llama), _losa_config(), LoSAConfig())
    assert layers and all(isinstance(m, salr.SALRLinear) for _, m in layers)
    assert len(salr_modules(layers[0][1])) == 1


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_salr_merge_of_a_trained_losa_layer_keeps_its_zeros_and_its_function(mode):
    """`salr merge` (salr.merge.merge_model) on a model of LoSA layers: both modes give LoSA's own merged weight,
    so the merged model has exactly the base's zeros and computes what the LoSA model computed."""
    from salr.merge import merge_model

    model = torch.nn.Sequential(_losa_layer(seed=1), torch.nn.ReLU(), _losa_layer(out=5, inp=12, seed=2))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.B_cat.add_(0.1)  # a nonzero update everywhere, so a fill-in would show
    x = torch.randn(7, 16)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    bases = [(layer.base.to_dense() == 0).clone() for layer in (model[0], model[2])]
    report = merge_model(model, mode)
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2], torch.nn.Linear)
    for pruned, linear in zip(bases, (model[0], model[2]), strict=True):
        assert torch.equal(linear.weight == 0, pruned)
    assert report["totals"]["nonzero_at_pruned"] == 0 and report["totals"]["sparsity"] == pytest.approx(0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)

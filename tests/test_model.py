import copy

import pytest
import torch

import salr
from salr.errors import SALRError
from salr.experts import SALRExperts
from salr.layer import SALRLinear


def _ids(vocab=128, seed=0):
    torch.manual_seed(seed)
    return torch.randint(0, vocab, (2, 12))


def test_all_linear_targets_every_projection_but_never_lm_head_or_embeddings(tiny_llama):
    report = salr.convert(tiny_llama, salr.SALRConfig.from_preset("paper", residual_rank=4, r=2), progress=False)
    names = [row["name"] for row in report["layers"]]
    assert len(names) == 2 * 7
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert not isinstance(tiny_llama.lm_head, SALRLinear)
    assert isinstance(tiny_llama.model.layers[1].mlp.down_proj, SALRLinear)


def test_target_and_exclude_modules_follow_peft_semantics(tiny_llama):
    config = salr.SALRConfig.from_preset(
        "paper", residual_rank=2, r=2, target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.1\..*"
    )
    report = salr.convert(tiny_llama, config, progress=False)
    assert [r["name"] for r in report["layers"]] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]


def test_regex_target_modules(tiny_llama):
    config = salr.SALRConfig.from_preset("paper", residual_rank=2, r=2, target_modules=r".*mlp\.(gate|up)_proj")
    report = salr.convert(tiny_llama, config, progress=False)
    assert len(report["layers"]) == 4


def test_unknown_target_module_is_a_clear_error(tiny_llama):
    with pytest.raises(SALRError, match=r"\['qkv'\] match no linear layer.*available"):
        salr.convert(tiny_llama, salr.SALRConfig.from_preset("paper", target_modules=["qkv"]), progress=False)


def test_rank_above_layer_size_is_a_clear_error(tiny_llama):
    with pytest.raises(SALRError, match="residual_rank 100 exceeds min"):
        salr.convert(tiny_llama, salr.SALRConfig.from_preset("paper", residual_rank=100), progress=False)


def test_nm_on_indivisible_layer_names_the_layer(stories):
    model, _ = stories  # down_proj has 172 inputs: divisible by 4, not by 8
    with pytest.raises(SALRError, match=r"4:8 needs the input dimension of model\.layers\.0\.mlp\.down_proj"):
        salr.convert(
            model, salr.SALRConfig.from_preset("paper", pattern="4:8", sparsity=None, residual_rank=4), progress=False
        )


@pytest.mark.parametrize("pattern,granularity", [("unstructured", "layer"), ("unstructured", "row"), ("2:4", "layer")])
def test_report_rows_are_consistent(stories, pattern, granularity):
    model, _ = stories
    sparsity = None if pattern == "2:4" else 0.5
    config = salr.SALRConfig.from_preset(
        "paper", sparsity=sparsity, pattern=pattern, granularity=granularity, residual_rank=8, r=4
    )
    report = salr.convert(model, config, progress=False)
    for row in report["layers"]:
        assert abs(row["sparsity"] - 0.5) <= 0.01
        assert row["residual_energy_after_svd"] == pytest.approx(row["svd_tail_energy"], rel=1e-4)
        assert row["residual_energy_after_svd"] <= row["theorem3_bound"]
    totals = report["totals"]
    assert totals["target_layers"] == 35
    assert abs(totals["sparsity"] - 0.5) < 0.01
    assert totals["nonzero_parameters"] < totals["parameters"]
    assert totals["adapter_parameters"] == sum((8 + 4) * sum(r["shape"]) for r in report["layers"])


def test_global_granularity_reaches_total_sparsity_with_uneven_layers(stories):
    model, _ = stories
    report = salr.convert(
        model,
        salr.SALRConfig.from_preset("paper", sparsity=0.6, granularity="global", residual_rank=2, r=0),
        progress=False,
    )
    assert abs(report["totals"]["sparsity"] - 0.6) < 0.005
    per_layer = [row["sparsity"] for row in report["layers"]]
    assert max(per_layer) - min(per_layer) > 0.05


def test_zero_sparsity_with_lora_only_is_the_dense_model(tiny_llama):
    ids = _ids()
    dense = tiny_llama(ids).logits
    salr.convert(tiny_llama, salr.SALRConfig.from_preset("paper", sparsity=0.0, residual_rank=0, r=4), progress=False)
    assert torch.allclose(tiny_llama(ids).logits, dense, atol=1e-5)


def test_residual_brings_pruned_model_closer_to_dense(tiny_llama):
    ids = _ids()
    dense = tiny_llama(ids).logits
    naive, full = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    salr.convert(naive, salr.SALRConfig.from_preset("paper", residual_rank=0, r=0), progress=False)
    salr.convert(full, salr.SALRConfig.from_preset("paper", residual_rank=16, r=0), progress=False)
    assert (full(ids).logits - dense).pow(2).mean() < 0.5 * (naive(ids).logits - dense).pow(2).mean()


def test_mixtral_fused_experts_are_pruned_per_expert_with_own_adapters(tiny_mixtral):
    ids = _ids()
    dense = tiny_mixtral(ids).logits
    lossless = copy.deepcopy(tiny_mixtral)
    salr.convert(lossless, salr.SALRConfig.from_preset("paper", sparsity=0.0, residual_rank=0, r=2), progress=False)
    assert torch.allclose(lossless(ids).logits, dense, atol=1e-5)  # our expert forward == transformers'

    report = salr.convert(tiny_mixtral, salr.SALRConfig.from_preset("paper", residual_rank=4, r=2), progress=False)
    experts = tiny_mixtral.model.layers[0].mlp.experts
    assert isinstance(experts, SALRExperts)
    assert experts.gate_up_proj.A_cat.shape == (4, 6, 32) and experts.down_proj.B_cat.shape == (4, 32, 6)
    rows = [r for r in report["layers"] if "experts" in r["name"]]
    assert len(rows) == 2 * 2 * 4  # layers x projections x experts
    for row in rows:
        assert abs(row["sparsity"] - 0.5) <= 0.01
        assert row["residual_energy_after_svd"] <= row["theorem3_bound"]
    masks = (torch.stack([b.to_dense() for b in experts.gate_up_proj.bases]) != 0).reshape(4, -1).float().mean(1)
    assert torch.allclose(masks, torch.full((4,), 0.5), atol=0.01)
    # Per-expert adapters receive gradients only for the experts that were routed to.
    tiny_mixtral(ids).logits.sum().backward()
    assert experts.gate_up_proj.A_cat.grad is not None
    assert torch.isfinite(tiny_mixtral(ids).logits).all()


def test_merge_and_unload_gives_plain_linear_with_same_logits(tiny_llama):
    ids = _ids()
    salr.convert(tiny_llama, salr.SALRConfig.from_preset("paper", residual_rank=4, r=2), progress=False)
    with torch.no_grad():
        for module in tiny_llama.modules():
            if isinstance(module, SALRLinear):
                module.B_cat.add_(0.01)
    before = tiny_llama(ids).logits
    salr.merge_and_unload(tiny_llama)
    assert not any(isinstance(m, SALRLinear) for m in tiny_llama.modules())
    assert torch.allclose(tiny_llama(ids).logits, before, atol=1e-4)


def test_merge_and_unload_mixtral_restores_native_experts(tiny_mixtral):
    ids = _ids()
    experts_type = type(tiny_mixtral.model.layers[0].mlp.experts)
    salr.convert(tiny_mixtral, salr.SALRConfig.from_preset("paper", residual_rank=4, r=2), progress=False)
    with torch.no_grad():
        for name, p in tiny_mixtral.named_parameters():
            if name.endswith("B_cat"):
                p.add_(0.01)
    before = tiny_mixtral(ids).logits
    salr.merge_and_unload(tiny_mixtral)
    experts = tiny_mixtral.model.layers[0].mlp.experts
    assert type(experts) is experts_type and experts.gate_up_proj.shape == (4, 96, 32)
    assert torch.allclose(tiny_mixtral(ids).logits, before, atol=1e-4)


def test_a_model_directory_without_tokenizer_files_is_named_as_such(tiny_llama, tmp_path):
    """It said "the tokenizer cannot be loaded (ValueError: Couldn't instantiate the backend tokenizer from one of:
    )"."""
    tiny_llama.save_pretrained(tmp_path / "m")
    with pytest.raises(SALRError, match=r"m has no tokenizer files \(tokenizer.json, tokenizer_config.json"):
        salr.load_model(str(tmp_path / "m"))

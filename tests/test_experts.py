"""Fused MoE experts (transformers-5 Mixtral layout): bitmap bases like linear layers, exact reload, the one
residual-freezing mechanism and LoRA dropout cover experts too."""

from __future__ import annotations

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import salr
from salr.bases import BitmapBase
from salr.checkpoint import size_report
from salr.experts import SALRExperts
from salr.train import TrainConfig, method_config, train


def small_mixtral() -> MixtralForCausalLM:
    """Experts large enough that the format's fixed costs (row offsets, file header) are small."""
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


def test_expert_bases_are_bitmaps_on_disk_within_3_percent_of_ideal_and_reload_exactly(tmp_path):
    model = small_mixtral()
    config = salr.SALRConfig.from_preset("paper", residual_rank=8, r=4)
    salr.convert(model, config, progress=False)
    assert salr.pack_bases(model) == 4 + 2 * 4  # q, k, v, o + 2 projections x 4 experts (the router is no Linear)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, SALRExperts)
    assert all(isinstance(b, BitmapBase) for b in [*experts.gate_up_proj.bases, *experts.down_proj.bases])
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    salr.save(model, tmp_path / "ckpt", config)
    sizes = size_report(model, tmp_path / "ckpt")
    assert sizes["checkpoint_bytes"] <= 1.03 * sizes["ideal_bytes"], sizes
    loaded, _ = salr.load(tmp_path / "ckpt")
    loaded_experts = loaded.model.layers[0].mlp.experts
    assert all(isinstance(b, BitmapBase) for b in loaded_experts.down_proj.bases)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def _examples(n: int = 16) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 128, (8 + i % 5,), generator=gen).tolist()
        out.append({"input_ids": prompt + prompt[:6], "labels": [-100] * len(prompt) + prompt[:6]})
    return out


def test_frozen_residual_covers_fused_experts(tiny_mixtral, tmp_path):
    # `salr train --method salr-frozen-residual` on a MoE model: the experts' residual blocks stay at their SVD
    # init (with weight decay too), their LoRA blocks train
    config = method_config("salr-frozen-residual", salr.SALRConfig.from_preset("paper", residual_rank=4, r=2))
    salr.convert(tiny_mixtral, config, progress=False)
    experts = tiny_mixtral.model.layers[0].mlp.experts
    before = {n: p.detach().clone() for n, p in experts.named_parameters()}
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=8, warmup_steps=1, weight_decay=0.1, progress=False)
    report = train(tiny_mixtral, None, _examples(), config, cfg, tmp_path / "run")
    for proj in ("gate_up_proj", "down_proj"):
        module = getattr(experts, proj)
        A0, B0 = before[f"{proj}.A_cat"], before[f"{proj}.B_cat"]
        assert torch.equal(module.A_cat[:, :4], A0[:, :4]) and torch.equal(module.B_cat[..., :4], B0[..., :4])
        assert not torch.equal(module.A_cat[:, 4:], A0[:, 4:])
    trainable = sum(p.numel() for p in tiny_mixtral.parameters() if p.requires_grad)
    frozen = sum(m.residual_rank * (m.in_features + m.out_features) * getattr(m, "num_experts", 1)
                 for m in tiny_mixtral.modules() if isinstance(m, salr.layer.FusedAdapters))  # fmt: skip
    assert report["trainable_parameters"] == trainable - frozen


def test_lora_dropout_reaches_expert_adapters(tiny_mixtral):
    salr.convert(
        tiny_mixtral, salr.SALRConfig.from_preset("paper", residual_rank=4, r=2, lora_dropout=0.5), progress=False
    )
    proj = tiny_mixtral.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(proj.lora_dropout, torch.nn.Dropout)
    with torch.no_grad():
        proj.B_cat.add_(0.1)  # a nonzero LoRA block, so dropout on its input changes the output
    x = torch.randn(5, 32)
    proj.eval()
    y_eval = proj(x, 0)
    proj.train()
    torch.manual_seed(0)
    assert not torch.allclose(proj(x, 0), y_eval)
    with torch.no_grad():
        proj.B_cat[..., 4:] = 0  # without a LoRA contribution dropout changes nothing: the residual is never dropped
    proj.eval()
    y_eval = proj(x, 0)
    proj.train()
    assert torch.allclose(proj(x, 0), y_eval)

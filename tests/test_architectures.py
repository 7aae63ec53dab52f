"""The paper's architectures, first try (issue 12): tiny random-weight Llama-2 (MHA), Llama-3 (GQA), Mixtral,
DeepSeek-V2-Lite-like (MLA attention, shared + routed experts) and Qwen3-MoE, built from transformers 5.23's config
classes and saved as Hugging Face directories: compress, train a few steps, save, reload (identical logits), merge.
The same first try on other families users bring (biases, fused projections, extra norms, parallel blocks). What
salr cannot convert is refused naming the module, before anything is converted."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import salr
from salr.compress import compress
from salr.convert import merge_and_unload, salr_modules
from salr.experts import SALRExperts
from salr.layer import SALRLinear
from salr.train import TrainConfig, train

VOCAB = 320  # the test tokenizer's
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, max_position_embeddings=128)
ARCHITECTURES = {
    # Llama-2: multi-head attention (as many KV heads as query heads)
    "llama2-mha": (LlamaForCausalLM, LlamaConfig(**COMMON, intermediate_size=128, num_attention_heads=4,
                                                 num_key_value_heads=4, tie_word_embeddings=False)),
    # Llama-3: grouped-query attention, large RoPE base
    "llama3-gqa": (LlamaForCausalLM, LlamaConfig(**COMMON, intermediate_size=128, num_attention_heads=8,
                                                 num_key_value_heads=2, rope_theta=500000.0)),
    "mixtral": (MixtralForCausalLM, MixtralConfig(**COMMON, intermediate_size=96, num_attention_heads=4,
                                                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    # DeepSeek-V2-Lite: MLA (no q compression, kv_lora_rank latent), first layer dense, then shared + routed experts
    "deepseek-v2-lite": (DeepseekV2ForCausalLM, DeepseekV2Config(
        **COMMON, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
        n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, topk_method="greedy")),
    "qwen3-moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **COMMON, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=4, num_experts_per_tok=2)),
}  # fmt: skip
CONFIG = salr.SALRConfig(sparsity=0.5, residual_rank=4, r=4)

# Other families, one per feature the converter must carry through: biases on q/k/v (Qwen2), fused q/k/v and gate/up
# projections (Phi-3), fused query_key_value and a parallel residual (GPT-NeoX), partial rotary with dense biases
# (Phi), logit soft-capping and pre/post norms (Gemma 2), sliding-window layer types (Gemma 3), post-norms with q/k
# norms (OLMo 2), a parallel block with LayerNorm and a logit scale (Cohere). Token ids within the small vocabulary.
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMALL = dict(**COMMON, **IDS, intermediate_size=128, num_attention_heads=4)
FAMILIES = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SMALL, num_key_value_heads=2)),
    "phi3": (Phi3ForCausalLM, Phi3Config(**SMALL, num_key_value_heads=2)),
    "gpt-neox": (GPTNeoXForCausalLM, GPTNeoXConfig(**SMALL)),
    "phi": (PhiForCausalLM, PhiConfig(**SMALL)),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=16)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16)),
    "olmo2": (Olmo2ForCausalLM, Olmo2Config(**SMALL, num_key_value_heads=2)),
    "cohere": (CohereForCausalLM, CohereConfig(**SMALL, num_key_value_heads=2)),
}


def examples(n: int = 16) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(3, VOCAB, (8 + i % 5,), generator=gen).tolist()
        out.append({"input_ids": prompt + prompt[:6], "labels": [-100] * len(prompt) + prompt[:6]})
    return out


IDS = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def compressed(cls: type, config: object, tmp_path, make_tokenizer) -> tuple[dict, torch.nn.Module, object, object]:
    """A random `cls(config)` saved as a Hugging Face directory with the test tokenizer and compressed as `salr
    compress` does: (report, SALR model, tokenizer, dense model), after checking that every linear layer but the LM
    head, no more, became a SALR layer and that the model really is pruned."""
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "hf")
    make_tokenizer().save_pretrained(tmp_path / "hf")
    report = compress(str(tmp_path / "hf"), CONFIG, tmp_path / "ckpt")
    model, tokenizer = salr.load(tmp_path / "ckpt")
    dense, _ = salr.load_model(str(tmp_path / "hf"))
    head = dense.get_output_embeddings()
    linears = {n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    converted = {n for n, m in model.named_modules() if isinstance(m, SALRLinear)}
    assert converted == linears, linears ^ converted
    assert not torch.allclose(logits(model, IDS), logits(dense, IDS))  # really pruned
    return report, model, tokenizer, dense


def trained_reloaded_merged(model: torch.nn.Module, tokenizer: object, name: str, tmp_path) -> torch.nn.Module:
    """Train 3 steps (every adapter moves, experts included), save the run and reload it (the same logits, bit for
    bit), merge it (no SALR module left, the same function up to rounding); returns the merged model."""
    cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=4, warmup_steps=0, max_length=64, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, tokenizer, examples(), CONFIG, cfg, tmp_path / "run", base_model=name)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    trained = logits(model, IDS)
    reloaded, _ = salr.load(tmp_path / "run")
    assert torch.equal(logits(reloaded, IDS), trained)
    merged = merge_and_unload(reloaded)
    assert not salr_modules(merged) and not any(isinstance(m, SALRExperts) for m in merged.modules())
    torch.testing.assert_close(logits(merged, IDS), trained, rtol=1e-4, atol=1e-4)
    return merged


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_compress_train_save_reload_merge(arch, tmp_path, make_tokenizer):
    report, model, tokenizer, dense = compressed(*ARCHITECTURES[arch], tmp_path, make_tokenizer)
    experts = [m for m in model.modules() if isinstance(m, SALRExperts)]
    assert len(experts) == {"mixtral": 2, "qwen3-moe": 2, "deepseek-v2-lite": 1}.get(arch, 0)
    assert report["totals"]["target_layers"] > 0 and abs(report["totals"]["sparsity"] - 0.5) < 0.02
    merged = trained_reloaded_merged(model, tokenizer, arch, tmp_path)
    # plain dense modules again: the model's own experts class
    assert type(merged.model.layers[-1].mlp).__name__ == type(dense.model.layers[-1].mlp).__name__


@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_families_compress_generate_train_reload_merge(family, tmp_path, make_tokenizer):
    _, model, tokenizer, _ = compressed(*FAMILIES[family], tmp_path, make_tokenizer)
    generated = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)  # the decode path, KV cache and all
    assert generated.shape == (1, IDS.shape[1] + 4)
    trained_reloaded_merged(model, tokenizer, family, tmp_path)


@pytest.mark.parametrize(
    "build, module, why",
    [
        (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)),
         "transformer.h.0.attn.c_attn", "a transformers Conv1D"),
        (lambda: GptOssForCausalLM(GptOssConfig(
            vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["full_attention"])),
         "model.layers.0.mlp.experts.gate_up_proj.*GptOssExperts", "transposed weights"),
    ],
    ids=["gpt2-conv1d", "gpt-oss-experts"],
)  # fmt: skip
def test_what_cannot_be_converted_is_refused_naming_the_module(build, module, why):
    model = build()
    with pytest.raises(salr.SALRError, match=rf"{module}.*{why}"):
        salr.convert(model, CONFIG, progress=False)
    assert not salr_modules(model) and not any(isinstance(m, SALRExperts) for m in model.modules())

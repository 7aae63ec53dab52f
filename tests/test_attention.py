"""salr.attention: one-token decode steps on the CPU outside torch's SDPA kernel, the same numbers as it gives."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import salr
from salr.attention import MIN_HEAD_TOKENS, NAME, decode_attention, use_decode_attention


class _Layer(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def _sdpa(query, key, value, mask, scale):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
    out = F.scaled_dot_product_attention(query.float(), key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads, kv_heads", [(32, 4), (9, 3), (8, 8)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_decode_steps_match_sdpa_in_fp32(heads, kv_heads, mask_kind):
    gen = torch.Generator().manual_seed(heads + kv_heads)
    length, dim = max(MIN_HEAD_TOKENS // heads + 3, 40), 16
    query = torch.randn(2, heads, 1, dim, generator=gen).bfloat16()
    key = (torch.randn(2, kv_heads, length, dim, generator=gen) * 2).bfloat16()
    value = torch.randn(2, kv_heads, length, dim, generator=gen).bfloat16()
    mask = None
    if mask_kind is not None:  # left padding in the first row: its first 5 cached positions are not attended
        keep = torch.ones(2, 1, 1, length, dtype=torch.bool)
        keep[0, ..., :5] = False
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    got, weights = decode_attention(_Layer(heads // kv_heads), query, key, value, mask, scaling=0.3)
    assert weights is None and got.dtype == torch.bfloat16 and got.shape == (2, 1, heads, dim)
    expected = _sdpa(query, key, value, mask, 0.3)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the output
    if mask_kind is not None:  # the padded positions really are ignored
        value[0, :, :5] = 100.0
        again, _ = decode_attention(_Layer(heads // kv_heads), query, key, value, mask, scaling=0.3)
        torch.testing.assert_close(again, got)


def test_everything_else_goes_to_transformers_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr("salr.attention.sdpa_attention_forward", lambda *a, **k: calls.append(k) or ("sdpa", None))
    layer = _Layer(2)
    q, k = torch.randn(1, 8, 1, 16).bfloat16(), torch.randn(1, 4, 400, 16).bfloat16()
    cases = {
        "prefill": (torch.randn(1, 8, 3, 16).bfloat16(), k, {}),
        "fp32": (q.float(), k.float(), {}),
        "short context": (q, k[:, :, : MIN_HEAD_TOKENS // 8 - 1], {}),
        "dropout": (q, k, {"dropout": 0.1}),
        "soft-capping": (q, k, {"softcap": 30.0}),
        "position bias": (q, k, {"position_bias": torch.zeros(1, 8, 1, 400)}),
    }
    for name, (query, key, extra) in cases.items():
        assert decode_attention(layer, query, key, key, None, **extra)[0] == "sdpa", name
    assert len(calls) == len(cases)
    out, _ = decode_attention(layer, q, k, k, None)  # the fast path itself does not call it
    assert isinstance(out, torch.Tensor) and len(calls) == len(cases)


def test_loaded_models_use_it_and_generate_what_sdpa_generates(tmp_path, make_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    make_tokenizer().save_pretrained(tmp_path / "hf")
    model, _ = salr.load_model(str(tmp_path / "hf"), dtype="bfloat16")
    assert model.config._attn_implementation == NAME
    ids = torch.randint(3, 320, (1, 70), generator=torch.Generator().manual_seed(1))  # 16 heads x 70+ tokens: fast
    with torch.inference_mode():
        fast = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
        model.set_attn_implementation("sdpa")
        slow = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.logits, slow.logits, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02)
    # a runtime setting: a saved model is a plain transformers one
    use_decode_attention(model)
    model.save_pretrained(tmp_path / "saved")
    assert "salr" not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))


def test_only_sdpa_models_switch():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    eager = LlamaForCausalLM(config)
    eager.set_attn_implementation("eager")
    assert not use_decode_attention(eager) and eager.config._attn_implementation == "eager"
    sdpa = LlamaForCausalLM(config)
    sdpa.set_attn_implementation("sdpa")
    assert use_decode_attention(sdpa) and sdpa.config._attn_implementation == NAME
    assert not use_decode_attention(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gpt-neox", "phi", "gemma3", "olmo2", "cohere"])
def test_each_family_decodes_as_with_sdpa(family, monkeypatch):
    """The fast path on the families of test_architectures (biases, fused projections, partial rotary, sliding
    windows, q/k norms, parallel blocks), threshold lifted, bf16, a left-padded batch: SDPA's logits step by step."""
    from test_architectures import FAMILIES

    monkeypatch.setattr("salr.attention.MIN_HEAD_TOKENS", 0)
    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config).to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0

    def steps() -> torch.Tensor:
        with torch.inference_mode():
            out = model(ids[:, :16], attention_mask=mask[:, :16], use_cache=True)
            past, logits = out.past_key_values, []
            for t in range(16, 24):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits.append(out.logits[:, -1].float())
        return torch.stack(logits, 1)

    expected = steps()
    assert use_decode_attention(model)
    torch.testing.assert_close(steps(), expected, rtol=0.02, atol=0.02)

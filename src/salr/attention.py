"""A faster attention for one-token decode steps on the CPU, registered with transformers' AttentionInterface.

Torch's CPU kernel behind `scaled_dot_product_attention` is slow for a single bf16 / fp16 query: its time grows by
~1.8 us per cached token at 32 heads, so at a 2,000-token context one call takes 3.5 ms, ~14x what the same
arithmetic costs as two matmuls and a softmax (0.26 ms; docs/benchmarks.md, section 22). A 1B-class model then
spends more of each token in attention than in its linear layers. `decode_attention` computes those steps in fp32
(the query and the cache widened, scores, softmax and the weighted sum, the result rounded once to the model's
dtype: SDPA's own error, since its kernel also works in fp32 inside) and hands every other call to transformers' own
SDPA implementation unchanged: prefill, training, the GPU, fp32 models, masks with a position bias, soft-capping,
paged caches and short contexts where the kernel is still as fast.

`use_decode_attention(model)` switches a model that runs transformers' "sdpa" to it; salr's loaders do this for the
models they load (salr.load_model, salr.load), for dense baselines and SALR models alike. It is a runtime setting:
`save_pretrained` does not write it, so saved checkpoints stay plain transformers ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "salr_decode"
# Below this many (query head, cached token) pairs the SDPA kernel is as fast (measured on a Zen 4 VM, 2 threads:
# 9 heads at 48 tokens read 40 us against 59 us, 32 heads at 48 tokens 117 us against 66 us).
MIN_HEAD_TOKENS = 1024
_FAST_DTYPES = (torch.bfloat16, torch.float16)
_SDPA_ONLY = ("softcap", "position_bias", "cache", "s_aux", "sinks")  # what the fast path does not implement


def _fast_path_applies(query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict[str, Any]) -> bool:
    return (
        query.shape[2] == 1
        and query.device.type == "cpu"
        and query.dtype in _FAST_DTYPES
        and dropout == 0.0
        and query.shape[1] % key.shape[1] == 0
        and query.shape[1] * key.shape[2] >= MIN_HEAD_TOKENS
        and not any(kwargs.get(name) is not None for name in _SDPA_ONLY)
        and not kwargs.get("output_attentions", False)
    )


def decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [b, Hq, q, d], key / value [b, Hkv, L, d] (Hq a multiple of
    Hkv), attention_mask None or [b, 1 or Hq, q, L] (bool: True attends; float: added) -> ([b, q, Hq, dv], None)."""
    if not _fast_path_applies(query, key, dropout, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, _, dim = query.shape
    kv_heads, groups = key.shape[1], heads // key.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, groups, dim).float() * scale  # the query heads that share each cached head
    scores = torch.matmul(q, key.float().transpose(-1, -2))  # [b, Hkv, groups, L]
    if attention_mask is not None:
        mask = attention_mask[..., -key.shape[2] :]  # [b, 1 or Hq, 1, L]
        mask = mask.reshape(batch, kv_heads, groups, -1) if mask.shape[1] == heads else mask
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    out = torch.matmul(scores.softmax(dim=-1), value.float())  # [b, Hkv, groups, dv]
    return out.reshape(batch, heads, 1, -1).transpose(1, 2).to(query.dtype), None


def register() -> None:
    """Make NAME a transformers attention implementation with SDPA's masks (idempotent)."""
    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_decode_attention(model: nn.Module) -> bool:
    """Switch `model` from transformers' "sdpa" attention to `decode_attention`; returns whether it did (models on
    another implementation, eager or flash, and models that cannot switch, are left alone)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
        return False
    register()
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME

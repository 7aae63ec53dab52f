"""Greedy completion helpers shared by the demo, the bench and the tests."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def format_prompt(tokenizer, prompt: str) -> str:
    """The tokenizer's chat template when it has one (instruct models), the raw prompt otherwise."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


@torch.inference_mode()
def greedy_complete(model: PreTrainedModel, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuation of each prompt (one at a time: no padding effects), special tokens stripped."""
    outputs = []
    for prompt in prompts:
        text = format_prompt(tokenizer, prompt)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None))
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        outputs.append(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return outputs

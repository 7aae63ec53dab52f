"""Shared fixtures: the real tiny llama2.c model and tiny random Llama / Mixtral configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The variable must be set before anything imports
# triton (transformers does), so it is set here, first.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STORIES = DATA / "models" / "stories260K" / "stories260K.bin"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not STORIES.is_file():
        pytest.fail(f"test data missing: {STORIES} (the shared data directory must sit beside the repo)")
    return STORIES


@pytest.fixture
def stories(stories_path):
    from salr.models import load_model

    return load_model(str(stories_path))


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(config).eval()


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.is_file():
        pytest.fail(f"test data missing: {WIKITEXT}")
    return WIKITEXT

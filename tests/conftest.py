"""Shared fixtures: the real tiny llama2.c model and tiny random Llama / Mixtral configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The variable must be set before anything imports
# triton (transformers does), so it is set here, first.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STORIES = DATA / "models" / "stories260K" / "stories260K.bin"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def cpu_isa(request, monkeypatch) -> str:
    """Runs a test once per instruction set of the native CPU kernel (SALR_CPU_ISA); one the CPU lacks is skipped
    (AVX-512 with VBMI2 needs Intel Ice Lake / AMD Zen 4 or later)."""
    from salr.ops import cpu

    if not cpu.available():
        pytest.skip("native kernel not built (python setup.py build_ext -i)")
    if request.param not in cpu.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels (it has {', '.join(cpu.supported_isas())})")
    monkeypatch.setenv("SALR_CPU_ISA", request.param)
    assert cpu.isa() == request.param
    return request.param


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not STORIES.is_file():
        pytest.fail(f"test data missing: {STORIES} (the shared data directory must sit beside the repo)")
    return STORIES


@pytest.fixture
def stories(stories_path):
    from salr.loaders import load_model

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


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has exited (for leftovers of a killed process)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.is_file():
        pytest.fail(f"test data missing: {WIKITEXT}")
    return WIKITEXT


def build_bpe_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (exact round trip) that prepends <s> like Llama tokenizers do."""
    from salr import data

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [r["question"] + "\n" + r["answer"] for r in data.synthetic_arithmetic(200, seed=1)]
    extra = "Question: Answer: user assistant A. B. C. D. The following are multiple choice"
    tok.train_from_iterator([*corpus, extra], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def make_tokenizer():
    """Factory fixture: `make_tokenizer(chat_template=None)` builds the small BPE tokenizer."""
    return build_bpe_tokenizer

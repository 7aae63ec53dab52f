"""The embedded default model (SmolLM2-135M-Instruct). Slow: run with `python -m pytest -m slow`."""

import copy

import pytest
import torch

import salr
from salr.evaluate import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    return salr.load_model("default")


def test_default_model_answers_and_has_expected_shape(default_model):
    from salr.evaluate import complete

    model, tokenizer = default_model
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    (answer,) = complete(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in answer


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_perplexity_dense_below_salr_below_naive(default_model, pattern, wikitext_path):
    model, tokenizer = default_model
    text = wikitext_path.read_text()[:60_000]
    sparsity = None if pattern == "2:4" else 0.5
    naive, full = copy.deepcopy(model), copy.deepcopy(model)
    report = salr.convert(full, salr.SALRConfig(sparsity=sparsity, pattern=pattern, residual_rank=64, r=0))
    salr.convert(naive, salr.SALRConfig(sparsity=sparsity, pattern=pattern, residual_rank=0, r=0), progress=False)
    assert abs(report["totals"]["sparsity"] - 0.5) < 0.01
    ppl = {
        name: perplexity(m, tokenizer, text, max_length=512, limit=6)["perplexity"]
        for name, m in [("dense", model), ("salr", full), ("naive", naive)]
    }
    assert ppl["dense"] < ppl["salr"] < ppl["naive"], ppl
    with torch.no_grad():
        assert torch.isfinite(full(tokenizer("Hello", return_tensors="pt").input_ids).logits).all()

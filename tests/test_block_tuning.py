"""Block-wise reconstruction (salr.block_tuning): each compressed block fitted to the dense block's output."""

from __future__ import annotations

import copy

import pytest
import torch

from salr.bases import DenseBase
from salr.block_tuning import tune_block
from salr.calibration import BlockwiseCalibration, block_output, decoder_blocks
from salr.config import BLOCK_TUNING_STEPS, SALRConfig
from salr.convert import convert
from salr.errors import SALRError
from salr.layer import SALRLinear
from salr.train.config import method_config

CONFIG = dict(sparsity=0.5, residual_rank=4, r=2, alternating_rounds=2, calibration_samples=8, calibration_length=16)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(1))


def _block0_setup(tiny_llama):
    """(dense model, converted model, block-0 inputs, kwargs, dense block-0 outputs on those inputs)."""
    dense = tiny_llama
    model = copy.deepcopy(dense)
    ids = _ids(dense.config.vocab_size)
    convert(model, SALRConfig(**CONFIG), progress=False, calibration=ids)
    calib = BlockwiseCalibration(dense, ids, batch_size=4)
    calib.capture_inputs()  # block 0 sees the same inputs in both models (the embeddings are not converted)
    targets = calib.run_block(decoder_blocks(dense)[1][0])
    return model, calib.hidden, calib.kwargs, targets


def _layers(block):
    return [m for m in block.modules() if isinstance(m, SALRLinear)]


def _block_error(block, inputs, kwargs, targets) -> float:
    with torch.no_grad():
        num = sum(
            float((block_output(block, x, kw) - y).pow(2).sum())
            for x, kw, y in zip(inputs, kwargs, targets, strict=True)
        )
    return num / sum(float(y.pow(2).sum()) for y in targets)


def test_tuning_lowers_the_block_output_error_and_moves_the_residual_block_alone(tiny_llama):
    model, inputs, kwargs, targets = _block0_setup(tiny_llama)
    block = decoder_blocks(model)[1][0]
    before_state = {k: v.clone() for k, v in block.state_dict().items()}
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    layers = _layers(block)
    zeros = [layer.base.to_dense() == 0 for layer in layers]
    result = tune_block(block, inputs, kwargs, targets, steps=40, lr=1e-2)
    assert result["block_error_after"] < 0.9 * result["block_error_before"]
    # what the block computes now, through SALRLinear's own forward, is the error the tuning reported
    assert _block_error(block, inputs, kwargs, targets) == pytest.approx(result["block_error_after"], rel=1e-4)
    assert _block_error(block, inputs, kwargs, targets) < _block_error_before(
        before_state, block, inputs, kwargs, targets
    )
    for layer, was_zero in zip(layers, zeros, strict=True):
        r = layer.residual_rank
        name = next(n for n, m in block.named_modules() if m is layer)
        assert torch.equal(layer.base.to_dense()[was_zero], torch.zeros(int(was_zero.sum())))  # pruned stay pruned
        assert torch.equal(layer.B_cat[:, r:], torch.zeros_like(layer.B_cat[:, r:]))  # LoRA block: still B = 0
        assert torch.equal(layer.A_cat[r:], before_state[f"{name}.A_cat"][r:])
        assert not torch.equal(layer.A_cat[:r], before_state[f"{name}.A_cat"][:r])  # the residual block moved
    for key, value in block.state_dict().items():  # norms and everything but adapters and bases are untouched
        if not key.endswith(("A_cat", "B_cat")):  # the bases too
            assert torch.equal(value, before_state[key]), key
    assert {n: p.requires_grad for n, p in block.named_parameters()} == flags  # restored afterwards
    assert any(flags.values())


def _block_error_before(state, block, inputs, kwargs, targets) -> float:
    current = {k: v.clone() for k, v in block.state_dict().items()}
    block.load_state_dict(state)
    try:
        return _block_error(block, inputs, kwargs, targets)
    finally:
        block.load_state_dict(current)


def test_a_fit_that_makes_the_block_worse_is_not_written_back(tiny_llama):
    model, inputs, kwargs, targets = _block0_setup(tiny_llama)
    block = decoder_blocks(model)[1][0]
    state = {k: v.clone() for k, v in block.state_dict().items()}
    result = tune_block(block, inputs, kwargs, targets, steps=3, lr=10.0)  # a rate that can only diverge
    assert result["block_error_after"] == result["block_error_before"]
    for key, value in block.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(type(layer).forward is SALRLinear.forward and "forward" not in vars(layer) for layer in _layers(block))


def test_zero_steps_change_nothing(tiny_llama):
    model, inputs, kwargs, targets = _block0_setup(tiny_llama)
    block = decoder_blocks(model)[1][0]
    state = {k: v.clone() for k, v in block.state_dict().items()}
    assert tune_block(block, inputs, kwargs, targets, steps=0, lr=1e-3) == {}
    assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())


def test_convert_with_block_tuning_reports_every_block_and_keeps_the_sparsity(tiny_llama):
    ids = _ids(tiny_llama.config.vocab_size)
    plain, tuned = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    convert(plain, SALRConfig(**CONFIG), progress=False, calibration=ids)
    report = convert(
        tuned, SALRConfig(**CONFIG, block_tuning_steps=20, block_tuning_lr=1e-2), progress=False, calibration=ids
    )
    rows = report["block_tuning"]
    assert [r["block"] for r in rows] == ["model.layers.0", "model.layers.1"]
    assert all(r["block_error_after"] <= r["block_error_before"] for r in rows)
    assert rows[0]["block_error_after"] < rows[0]["block_error_before"]
    assert report["totals"]["sparsity"] == pytest.approx(0.5, abs=1e-9)
    for layer in _layers(tuned):
        assert isinstance(layer.base, DenseBase)
        assert torch.equal(
            layer.B_cat[:, layer.residual_rank :], torch.zeros_like(layer.B_cat[:, layer.residual_rank :])
        )
    # the tuned model is closer to the dense one on the calibration windows than the untuned one
    with torch.no_grad():
        reference = tiny_llama(ids).logits
        gap = [float((m(ids).logits - reference).pow(2).mean()) for m in (plain, tuned)]
    assert gap[1] < gap[0]


def test_block_tuning_is_refused_where_it_cannot_run_and_dropped_for_dense_methods():
    with pytest.raises(SALRError, match="non-negative integer"):
        SALRConfig(block_tuning_steps=-1)
    with pytest.raises(SALRError, match="block_tuning_lr must be a positive"):
        SALRConfig(block_tuning_lr=0.0)
    with pytest.raises(SALRError, match="sequential calibration"):
        SALRConfig(block_tuning_steps=4, sequential=False)
    with pytest.raises(SALRError, match="activation-aware"):
        SALRConfig.from_preset("paper", block_tuning_steps=4)
    config = SALRConfig(block_tuning_steps=4)
    assert method_config("lora", config).tuning_steps == 0  # a dense base: nothing to repair
    assert method_config("salr", config).tuning_steps == 4
    assert method_config("qlora", SALRConfig(quant="nf4")).tuning_steps == 0


def test_block_tuning_is_on_by_default_for_quantized_bases_and_nm_patterns():
    assert SALRConfig().block_tuning_steps is None
    assert SALRConfig().tuning_steps == 0  # unstructured, unquantized: measured no gain at init
    assert SALRConfig(quant="nf4").tuning_steps == BLOCK_TUNING_STEPS > 0
    assert SALRConfig(quant="int8").tuning_steps == BLOCK_TUNING_STEPS
    assert SALRConfig(pattern="2:4", sparsity=None).tuning_steps == BLOCK_TUNING_STEPS
    assert SALRConfig(quant="nf4", block_tuning_steps=0).tuning_steps == 0
    assert SALRConfig(block_tuning_steps=8).tuning_steps == 8
    # where it cannot run, the default steps aside instead of refusing the config
    assert SALRConfig(quant="nf4", sequential=False).tuning_steps == 0
    assert SALRConfig.from_preset("paper", quant="nf4").tuning_steps == 0  # no data
    assert SALRConfig(quant="nf4", residual_rank=0).tuning_steps == 0  # no residual factors
    assert method_config("prune-lora", SALRConfig(quant="nf4")).tuning_steps == 0
    # a config saved before block tuning existed did not run it; one saved since keeps its choice
    saved = SALRConfig(quant="nf4").to_dict()
    del saved["block_tuning_steps"]
    assert SALRConfig.from_dict(saved).tuning_steps == 0
    assert SALRConfig.from_dict(SALRConfig(quant="nf4").to_dict()).tuning_steps == BLOCK_TUNING_STEPS


@pytest.mark.parametrize("steps", [0, 4])
def test_a_block_without_targets_still_passes_its_outputs_to_the_next_one(tiny_llama, monkeypatch, steps):
    ids = _ids(tiny_llama.config.vocab_size)
    with torch.no_grad():
        entering = tiny_llama(ids, output_hidden_states=True).hidden_states[1]  # block 1's input in the dense model
    seen = []
    statistics = BlockwiseCalibration.statistics

    def spy(self, block, names, outputs=True):
        seen.append(torch.cat(self.hidden))
        return statistics(self, block, names, outputs)

    monkeypatch.setattr(BlockwiseCalibration, "statistics", spy)
    model = copy.deepcopy(tiny_llama)
    config = SALRConfig(**CONFIG, exclude_modules=r".*layers\.0\..*", block_tuning_steps=steps)
    report = convert(model, config, progress=False, calibration=ids)
    assert len(seen) == 1 and torch.allclose(seen[0], entering, atol=1e-5)  # block 0 is dense: its true outputs
    assert not any(isinstance(m, SALRLinear) for m in decoder_blocks(model)[1][0].modules())
    assert [r["block"] for r in report.get("block_tuning", [])] == (["model.layers.1"] if steps else [])


@pytest.mark.parametrize("double", [False, True])
def test_a_quantized_base_is_never_touched_and_its_residual_absorbs_more(tiny_llama, double):
    dense = tiny_llama
    model = copy.deepcopy(dense)
    ids = _ids(dense.config.vocab_size)
    convert(model, SALRConfig(**CONFIG, quant="nf4", quant_double=double), progress=False, calibration=ids)
    calib = BlockwiseCalibration(dense, ids, batch_size=4)
    calib.capture_inputs()
    targets = calib.run_block(decoder_blocks(dense)[1][0])
    block = decoder_blocks(model)[1][0]
    state = {k: v.clone() for k, v in block.state_dict().items()}
    result = tune_block(block, calib.hidden, calib.kwargs, targets, steps=40, lr=1e-2)
    assert result["block_error_after"] < 0.9 * result["block_error_before"]
    # through the quantized kernels, the tuned block computes what the tuning measured on the dequantized base
    assert _block_error(block, calib.hidden, calib.kwargs, targets) == pytest.approx(
        result["block_error_after"], rel=1e-4
    )
    for key, value in block.state_dict().items():
        if ".base." in key:
            assert torch.equal(value, state[key]), key
        elif key.endswith("A_cat"):
            assert not torch.equal(value, state[key]), key
    for layer in _layers(block):
        layer.base.validate()


@pytest.mark.parametrize(("extra", "tuned"), [({}, False), ({"quant": "int8"}, True), ({"pattern": "2:4"}, True)])
def test_convert_tunes_blocks_by_default_where_the_default_says(tiny_llama, extra, tuned):
    fields = {**CONFIG, **extra}
    if "pattern" in extra:
        fields["sparsity"] = None
    ids = _ids(tiny_llama.config.vocab_size)
    report = convert(copy.deepcopy(tiny_llama), SALRConfig(**fields), progress=False, calibration=ids)
    assert ("block_tuning" in report) is tuned
    if tuned:
        assert len(report["block_tuning"]) == 2  # one row per block of the tiny model

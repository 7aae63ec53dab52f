"""Per-layer sparsity (SALRConfig.sparsity_pattern, the rule of residual_rank_pattern): which layer gets which
sparsity, conversion and checkpoints at those sparsities, the flag, the methods that keep or drop it, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import salr
from salr.cli import main
from salr.convert import salr_modules
from salr.errors import SALRError
from salr.losa import LoSAConfig, train_losa
from salr.train import TrainConfig
from salr.train.config import method_config

PATTERN = {"(gate|up|down)_proj": 0.25, r"self_attn\.o_proj": 0.75}


def _expected(name: str, default: float = 0.5) -> float:
    leaf = name.split(".")[-1]
    return 0.25 if leaf in ("gate_proj", "up_proj", "down_proj") else 0.75 if leaf == "o_proj" else default


def test_sparsity_of_a_target_follows_the_first_matching_key():
    config = salr.SALRConfig(sparsity=0.5, sparsity_pattern={**PATTERN, r"layers\.3\..*": 0.1})
    assert config.sparsity_of("model.layers.0.mlp.gate_proj") == 0.25
    assert config.sparsity_of("model.layers.3.self_attn.o_proj") == 0.75  # the first matching key wins
    assert config.sparsity_of("model.layers.3.self_attn.q_proj") == 0.1
    assert config.sparsity_of("model.layers.0.self_attn.q_proj") == 0.5
    assert salr.SALRConfig(sparsity_pattern={"proj": 0.9}).sparsity_of("a.q_proj") == 0.5  # suffix after a dot only
    resolved = config.for_target("model.layers.0.mlp.down_proj")
    assert resolved.sparsity == 0.25 and resolved.sparsity_pattern is None
    assert resolved.residual_rank == config.residual_rank
    assert salr.SALRConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_a_pattern_on_a_dense_default_still_asks_for_calibration():
    # sparsity 0 alone converts nothing that reads activations; a pattern that prunes some layers does
    assert not salr.SALRConfig(sparsity=0.0).needs_calibration
    assert salr.SALRConfig(sparsity=0.0, sparsity_pattern={"q_proj": 0.5}).needs_calibration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"sparsity_pattern": {}}, "non-empty dict"), ({"sparsity_pattern": {"q_proj": 1.0}}, r"in \[0, 1\)"),
     ({"sparsity_pattern": {"q_proj": -0.1}}, r"in \[0, 1\)"),
     ({"sparsity_pattern": {"q_proj": True}}, r"in \[0, 1\)"),
     ({"sparsity_pattern": {"q_proj": "half"}}, r"in \[0, 1\)"),
     ({"sparsity_pattern": {"(": 0.5}}, "not a valid regular expression"),
     ({"sparsity_pattern": {"q_proj": 0.3}, "pattern": "2:4"}, "N:M fixes"),
     ({"sparsity_pattern": {"q_proj": 0.3}, "criterion": "magnitude", "granularity": "global"}, "'global'")],
)  # fmt: skip
def test_bad_patterns_are_clear_errors(kwargs, message):
    with pytest.raises(SALRError, match=message):
        salr.SALRConfig(**kwargs)


def test_conversion_and_checkpoint_use_each_layers_sparsity(tiny_llama, tmp_path):
    config = salr.SALRConfig.from_preset("paper", residual_rank=4, r=2, sparsity_pattern=PATTERN)
    report = salr.convert(tiny_llama, config, progress=False)
    for row in report["layers"]:
        assert row["sparsity"] == pytest.approx(_expected(row["name"]), abs=1e-3), row["name"]
    shapes = {row["name"]: row["shape"] for row in report["layers"]}
    numel = {name: shape[0] * shape[1] for name, shape in shapes.items()}
    overall = sum(_expected(n) * k for n, k in numel.items()) / sum(numel.values())
    assert report["totals"]["sparsity"] == pytest.approx(overall, abs=1e-3)  # measured on the stored bases
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    salr.save(tiny_llama, tmp_path / "ckpt", config)
    back, _ = salr.load(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "salr_config.json").read_text())["salr"]
    assert salr.SALRConfig.from_dict(saved).sparsity_pattern == PATTERN
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)


def test_activation_aware_groups_split_by_sparsity(tiny_llama):
    """q/k/v share one input and one SparseGPT sweep; with different sparsities each layer keeps its own, and each
    row is pruned exactly (granularity 'row')."""
    pattern = {r"self_attn\.q_proj": 0.25, r"self_attn\.k_proj": 0.75}
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    config = salr.SALRConfig(residual_rank=3, r=2, sparsity_pattern=pattern, alternating_rounds=2)
    salr.convert(tiny_llama, config, calibration=ids, progress=False)
    for name, module in salr_modules(tiny_llama):
        zero = module.base.to_dense() == 0
        expected = {"q_proj": 0.25, "k_proj": 0.75}.get(name.split(".")[-1], 0.5)
        rows = zero.float().mean(dim=1)
        assert torch.allclose(rows, torch.full_like(rows, expected), atol=1.0 / zero.shape[1]), name


def test_methods_keep_or_drop_the_pattern(tiny_llama, tmp_path):
    config = salr.SALRConfig(residual_rank=64, r=16, sparsity_pattern=PATTERN)
    assert method_config("lora", config).sparsity_pattern is None  # dense base
    assert method_config("qlora", config).sparsity_pattern is None
    for method in ("salr", "prune-lora", "salr-frozen-residual", "qsalr"):  # same pruned base as SALR
        assert method_config(method, config).sparsity_pattern == PATTERN
    losa = method_config("losa", salr.SALRConfig(residual_rank=0, r=4, calibration="self", sparsity_pattern=PATTERN))
    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=2, max_length=32, progress=False)
    example = {"input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6]}
    with pytest.raises(SALRError, match="drop --sparsity-pattern"):
        train_losa(tiny_llama, None, [example] * 4, losa, cfg, LoSAConfig(), tmp_path / "run")


def test_compress_flag_takes_json(stories_path, tmp_path):
    out = tmp_path / "out"
    argv = ["compress", "--model", str(stories_path), "--preset", "paper", "--residual-rank", "4",
            "--lora-rank", "2", "--sparsity-pattern", '{"(gate|up|down)_proj": 0.25}', "--output", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "salr_report.json").read_text())
    assert report["config"]["sparsity_pattern"] == {"(gate|up|down)_proj": 0.25}
    rows = {row["name"]: row["sparsity"] for row in report["layers"]}
    assert {round(s, 2) for n, s in rows.items() if n.endswith("up_proj")} == {0.25}
    assert {round(s, 2) for n, s in rows.items() if n.endswith("q_proj")} == {0.5}


@pytest.mark.parametrize("field", ["sparsity_pattern", "residual_rank_pattern"])
def test_a_key_that_names_no_layer_is_refused_before_anything_changes(tiny_llama, field):
    """'mlp' matches no layer name's end (gate_proj, up_proj, down_proj do): those layers silently got the global
    value. Refused with the matching rule; a key that does match converts."""
    value = {"sparsity_pattern": 0.7, "residual_rank_pattern": 2}[field]
    bad = salr.SALRConfig.from_preset("paper", residual_rank=4, r=2, **{field: {"down_proj": value, "mlp": value}})
    with pytest.raises(SALRError, match=f"{field} key 'mlp' matches no converted layer"):
        salr.convert(tiny_llama, bad, progress=False)
    assert not list(salr_modules(tiny_llama))  # nothing was converted
    good = salr.SALRConfig.from_preset("paper", residual_rank=4, r=2, **{field: {r"mlp\..*": value}})
    salr.convert(tiny_llama, good, progress=False)
    assert len(list(salr_modules(tiny_llama))) == 14

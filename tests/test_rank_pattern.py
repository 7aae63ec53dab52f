"""Per-layer residual ranks (SALRConfig.residual_rank_pattern, as PEFT's rank_pattern): which layer gets which rank,
conversion and checkpoints at those ranks, the flag, the baselines that keep one rank, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import salr
from salr.cli import main
from salr.convert import salr_modules
from salr.errors import SALRError
from salr.peft_adapter import export_peft
from salr.train.config import method_config

PATTERN = {"(gate|up|down)_proj": 6, r"self_attn\.o_proj": 0}


def test_rank_of_a_target_follows_the_first_matching_key():
    config = salr.SALRConfig(residual_rank=4, residual_rank_pattern={**PATTERN, r"layers\.3\..*": 1})
    assert config.residual_rank_of("model.layers.0.mlp.gate_proj") == 6
    assert config.residual_rank_of("model.layers.3.self_attn.o_proj") == 0  # the first matching key wins
    assert config.residual_rank_of("model.layers.3.self_attn.q_proj") == 1
    assert config.residual_rank_of("model.layers.0.self_attn.q_proj") == 4
    # a key matches all that follows a dot, not any substring: "proj" is not "q_proj"
    assert salr.SALRConfig(residual_rank=4, residual_rank_pattern={"proj": 1}).residual_rank_of("a.q_proj") == 4
    assert salr.SALRConfig(residual_rank=4).residual_rank_of("a.q_proj") == 4
    resolved = config.for_target("model.layers.0.mlp.down_proj")
    assert resolved.residual_rank == 6 and resolved.residual_rank_pattern is None
    assert salr.SALRConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("pattern", "message"),
    [({}, "non-empty dict"), ({"q_proj": -1}, "non-negative integer"), ({"q_proj": 2.5}, "non-negative integer"),
     ({"(": 3}, "not a valid regular expression"), ([3], "non-empty dict")],
)  # fmt: skip
def test_bad_patterns_are_clear_errors(pattern, message):
    with pytest.raises(SALRError, match=message):
        salr.SALRConfig(residual_rank_pattern=pattern)


def test_conversion_and_checkpoint_use_each_layers_rank(tiny_llama, tmp_path):
    config = salr.SALRConfig.from_preset("paper", residual_rank=4, r=2, residual_rank_pattern=PATTERN)
    report = salr.convert(tiny_llama, config, progress=False)
    ranks = {name: module.residual_rank for name, module in salr_modules(tiny_llama)}
    for name, rank in ranks.items():
        expected = 6 if name.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") else 0 if "o_proj" in name else 4
        assert rank == expected, name
    assert {m.lora_rank for _, m in salr_modules(tiny_llama)} == {2}
    assert {row["name"]: row["shape"] for row in report["layers"]}.keys() == ranks.keys()
    # the residual of each layer is its best rank-k weight fit: more rank, less error left (o_proj: none fitted)
    rows = {row["name"]: row for row in report["layers"]}
    o_proj = rows["model.layers.0.self_attn.o_proj"]
    assert o_proj["residual_energy_after_svd"] == pytest.approx(o_proj["error_energy"], rel=1e-5)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    salr.save(tiny_llama, tmp_path / "ckpt", config)
    back, _ = salr.load(tmp_path / "ckpt")
    assert {n: m.residual_rank for n, m in salr_modules(back)} == ranks
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)


def test_activation_aware_groups_split_by_rank(tiny_llama):
    """q/k/v share one input; with different ranks each still gets its own rank (and the same masks as alone)."""
    pattern = {r"self_attn\.q_proj": 2, r"self_attn\.k_proj": 5}
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    config = salr.SALRConfig(residual_rank=3, r=2, residual_rank_pattern=pattern, alternating_rounds=2)
    salr.convert(tiny_llama, config, calibration=ids, progress=False)
    ranks = {name.split(".", 3)[-1]: m.residual_rank for name, m in salr_modules(tiny_llama) if ".0." in name}
    assert ranks["self_attn.q_proj"] == 2 and ranks["self_attn.k_proj"] == 5 and ranks["self_attn.v_proj"] == 3


def test_lora_baselines_keep_one_rank():
    config = salr.SALRConfig(residual_rank=64, r=16, residual_rank_pattern=PATTERN)
    lora = method_config("lora", config)
    assert lora.r == 80 and lora.residual_rank == 0 and lora.residual_rank_pattern is None
    assert method_config("salr", config).residual_rank_pattern == PATTERN


def test_compress_flag_takes_json(stories_path, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", "--model", str(stories_path), "--preset", "paper", "--residual-rank", "4",
            "--lora-rank", "2", "--residual-rank-pattern", '{"(gate|up|down)_proj": 6}', "--output", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "salr_report.json").read_text())
    assert report["config"]["residual_rank_pattern"] == {"(gate|up|down)_proj": 6}
    back, _ = salr.load(out)
    assert {m.residual_rank for n, m in salr_modules(back) if n.endswith("up_proj")} == {6}
    with pytest.raises(SystemExit):
        main([*argv[:-5], "--residual-rank-pattern", "{not json", "--output", str(tmp_path / "bad")])
    assert "expected a JSON object" in capsys.readouterr().err


def test_peft_export_carries_the_per_layer_ranks(tiny_llama, tmp_path):
    config = salr.SALRConfig.from_preset("paper", residual_rank=4, r=2, residual_rank_pattern=PATTERN)
    model = tiny_llama
    salr.convert(model, config, progress=False)
    with torch.no_grad():  # nonzero LoRA blocks, as after training
        for _, module in salr_modules(model):
            module.B_cat.add_(torch.randn(module.B_cat.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    salr.pack_bases(model)
    salr.save(model, tmp_path / "ckpt", config)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    export_peft(salr.load(tmp_path / "ckpt")[0], None, config, tmp_path / "exp")
    adapter = json.loads((tmp_path / "exp" / "adapter" / "adapter_config.json").read_text())
    ranks = {adapter["r"], *adapter["rank_pattern"].values()}
    assert ranks == {6, 8, 2}  # residual + LoRA rank: 4 + 2 by default, 6 + 2 on the MLP, 0 + 2 on o_proj
    back, _ = salr.load(tmp_path / "exp")
    assert {n: m.residual_rank for n, m in salr_modules(back)} == {n: m.residual_rank for n, m in salr_modules(model)}
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)

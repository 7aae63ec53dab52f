"""Leaving salr with standard files: `salr export --to peft` loads with stock transformers + PEFT (no salr import)
and gives salr's logits; PEFT's merge_and_unload equals our dense merge; merged exports load with stock transformers;
an exported pair (or a plain PEFT adapter on a pruned base) comes back into salr exactly."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import salr
from salr.bases import BitmapBase
from salr.cli import main
from salr.convert import base_slots, salr_modules
from salr.layer import SALRLinear
from salr.peft_adapter import export_peft, load_peft

CONFIG = salr.SALRConfig.from_preset("paper", residual_rank=4, r=2)

# Runs in a fresh interpreter: only transformers and peft, as a user of those tools would load the files.
STOCK = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel

root = sys.argv[1]
ids = torch.tensor(json.loads(open(f"{root}/ids.json").read()))
out = {}
with torch.no_grad():
    base = AutoModelForCausalLM.from_pretrained(f"{root}/exp/base")
    model = PeftModel.from_pretrained(base, f"{root}/exp/adapter").eval()
    out["peft"] = model(ids).logits
    merged = model.merge_and_unload()
    out["peft_merged"] = {k: v.clone() for k, v in merged.state_dict().items()}
    for mode in ("dense", "sparse"):
        plain = AutoModelForCausalLM.from_pretrained(f"{root}/{mode}").eval()
        out[mode] = plain(ids).logits
        out[f"{mode}_state"] = plain.state_dict()
assert not any(name.split(".")[0] == "salr" for name in sys.modules), "salr was imported"
torch.save(out, f"{root}/stock.pt")
"""


def stock_load(root: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", STOCK, str(root)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(root / "stock.pt")


def trained_checkpoint(model: torch.nn.Module, path: Path, config: salr.SALRConfig = CONFIG) -> torch.nn.Module:
    """A SALR checkpoint whose LoRA blocks are nonzero (as after training), bases stored as bitmaps."""
    salr.convert(model, config, progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in salr_modules(model):
            m.B_cat.add_(torch.randn(m.B_cat.shape, generator=g) * 0.05)
    salr.pack_bases(model)
    salr.save(model, path, config)
    return model.eval()


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_mixtral"])
def test_stock_transformers_and_peft_reproduce_salr(family, request, tmp_path):
    model = trained_checkpoint(request.getfixturevalue(family), tmp_path / "ckpt")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    with torch.no_grad():
        ref = model(ids).logits
    ckpt = str(tmp_path / "ckpt")
    assert main(["export", ckpt, "--to", "peft", "--out", str(tmp_path / "exp")]) == 0
    for mode in ("dense", "sparse"):
        argv = ["export", ckpt, "--to", "merged", "--mode", mode, "--out", str(tmp_path / mode)]
        assert main([*argv, "--check-windows", "0", "--quiet"]) == 0
    adapter = json.loads((tmp_path / "exp" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == adapter["lora_alpha"] == 6 and adapter["peft_type"] == "LORA"
    if family == "tiny_mixtral":
        assert sorted(adapter["target_parameters"]) == ["model.layers.0.mlp.experts.down_proj",
            "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
            "model.layers.1.mlp.experts.gate_up_proj"]  # fmt: skip
    stock = stock_load(tmp_path)
    assert (stock["peft"] - ref).abs().max() <= 1e-4
    assert (stock["dense"] - ref).abs().max() <= 1e-4
    # PEFT's own merge equals ours, weight by weight (names as transformers loads them: a Mixtral checkpoint is
    # written with per-expert keys and loaded back into fused 3-D parameters)
    ours = stock["dense_state"]
    assert ours.keys() == stock["peft_merged"].keys()
    for name, weight in ours.items():
        assert (stock["peft_merged"][name] - weight).abs().max() <= 1e-6, name
    # the sparse merge: the base's zeros everywhere, the logits of the in-process sparse merge
    sparse = stock["sparse_state"]
    for name, module in salr_modules(model):
        base = salr.merge.base_weight(module)
        assert not sparse[f"{name}.weight" if isinstance(module, SALRLinear) else name][base == 0].any(), name
    merged, _ = salr.load(tmp_path / "ckpt")
    salr.merge.merge_model(merged, "sparse")
    with torch.no_grad():
        assert torch.equal(stock["sparse"], merged(ids).logits)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_mixtral"])
def test_exported_pair_comes_back_exactly(family, request, tmp_path):
    model = trained_checkpoint(request.getfixturevalue(family), tmp_path / "ckpt")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    export_peft(salr.load(tmp_path / "ckpt")[0], None, CONFIG, tmp_path / "exp")
    back, _ = salr.load(tmp_path / "exp")  # salr.load accepts the pair
    original = dict(model.state_dict())
    restored = back.state_dict()
    assert set(original) == set(restored)
    for name, value in original.items():
        assert torch.equal(value, restored[name]), name
    assert all(isinstance(getattr(holder, attr), BitmapBase) for _, holder, attr in base_slots(back))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)
    # and out again: the same adapter tensors
    export_peft(back, None, CONFIG, tmp_path / "exp2")
    first, second = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("exp", "exp2"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_compress_from_peft_writes_a_salr_checkpoint(tiny_llama, tmp_path, capsys):
    model = trained_checkpoint(tiny_llama, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--to", "peft", "--out", str(tmp_path / "exp")]) == 0
    assert main(["compress", "--from-peft", str(tmp_path / "exp" / "adapter"), "--output", str(tmp_path / "D")]) == 0
    assert "residual rank 4, LoRA rank 2" in capsys.readouterr().out
    report = json.loads((tmp_path / "D" / "salr_report.json").read_text())
    assert report["totals"]["sparsity"] == pytest.approx(0.5, abs=0.01) and len(report["layers"]) == 14
    loaded, _ = salr.load(tmp_path / "D")
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_plain_peft_adapter_on_a_pruned_base_imports_as_lora(tiny_llama, tmp_path):
    """A LoRA adapter trained with stock PEFT on the exported base (no salr metadata) is SALR's LoRA block."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    trained_checkpoint(tiny_llama, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--to", "peft", "--out", str(tmp_path / "exp")]) == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "base")
    lora = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora)
    peft_model.save_pretrained(tmp_path / "mine")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = peft_model.eval()(ids).logits
    model, _, config = load_peft(tmp_path / "mine", base=str(tmp_path / "exp" / "base"))
    assert config.residual_rank == 0 and config.r == 4 and config.lora_scale == 3.0
    assert len(salr_modules(model)) == 6
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() <= 1e-5
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "base")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "mine")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, ref)


def test_experts_without_peft_parameter_targeting_are_refused_by_name(tiny_mixtral, tmp_path, monkeypatch):
    @dataclasses.dataclass
    class OldLoraConfig:  # PEFT < 0.17: no target_parameters
        r: int = 8

    monkeypatch.setitem(sys.modules, "peft", types.SimpleNamespace(__version__="0.16.0", LoraConfig=OldLoraConfig))
    model = trained_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    with pytest.raises(salr.SALRError, match=r"cannot target fused MoE expert parameters \(model\.layers\.0\.mlp"):
        export_peft(model, None, CONFIG, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_an_update_lora_cannot_express_is_refused(tiny_llama, tmp_path):
    class MaskedUpdate(SALRLinear):  # e.g. LoSA: ΔW = M ⊙ (B A)
        def delta_weight(self):
            return super().delta_weight() * (self.base.to_dense() != 0)

    model = trained_checkpoint(tiny_llama, tmp_path / "ckpt")
    layer = model.model.layers[0].mlp.up_proj
    layer.__class__ = MaskedUpdate
    with pytest.raises(salr.SALRError, match="export it merged instead"):
        export_peft(model, None, CONFIG, tmp_path / "exp")


def test_export_refuses_a_foreign_output_directory(tiny_llama, tmp_path, capsys):
    trained_checkpoint(tiny_llama, tmp_path / "ckpt")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "ckpt"), "--to", "peft", "--out", str(tmp_path / "o")]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"
    argv = ["export", str(tmp_path / "ckpt"), "--to", "peft", "--out", str(tmp_path / "e")]
    assert main(argv) == 0 and main(argv) == 0  # an earlier export is replaced
    (tmp_path / "e" / "notes.txt").write_text("mine")
    assert main(argv) == 2
    assert "holds notes.txt, which salr did not write there" in capsys.readouterr().err
    assert (tmp_path / "e" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_default_model_pair_matches_salr_with_stock_libraries(tmp_path):
    model, tokenizer = salr.load_model("default")
    config = salr.SALRConfig.from_preset("paper", residual_rank=64, r=16)
    model = trained_checkpoint(model, tmp_path / "ckpt", config)
    ids = tokenizer("The capital of France is a city where", return_tensors="pt").input_ids
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    with torch.no_grad():
        ref = model(ids).logits
    ckpt = str(tmp_path / "ckpt")
    assert main(["export", ckpt, "--to", "peft", "--out", str(tmp_path / "exp")]) == 0
    for mode in ("dense", "sparse"):
        argv = ["export", ckpt, "--to", "merged", "--mode", mode, "--out", str(tmp_path / mode)]
        assert main([*argv, "--check-windows", "0", "--quiet"]) == 0
    stock = stock_load(tmp_path)
    assert (stock["peft"] - ref).abs().max() <= 1e-4
    assert (stock["dense"] - ref).abs().max() <= 1e-4
    ours = stock["dense_state"]
    assert max(float((stock["peft_merged"][n] - w).abs().max()) for n, w in ours.items()) <= 1e-6
    back, _ = salr.load(tmp_path / "exp")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)

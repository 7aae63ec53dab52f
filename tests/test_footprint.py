"""salr.footprint: deployed bytes of dense, sparse-merged (LoSA) and SALR (base + adapters) models."""

from __future__ import annotations

import copy
import math

import torch

import salr
from salr.footprint import deployed_bytes, tensor_bytes
from salr.train import method_config


def test_tensor_bytes_picks_dense_or_bitmap():
    w = torch.randn(8, 20)
    assert tensor_bytes(w) == 8 * 20 * 2  # no zeros: dense is smaller
    w[:, :10] = 0
    assert tensor_bytes(w) == 8 * math.ceil(20 / 8) + 80 * 2  # 50 %: 1 bit per weight + kept values
    assert tensor_bytes(torch.zeros(5)) == 10 and tensor_bytes(w, torch.float32) == 8 * 3 + 80 * 4


def test_deployed_bytes_dense_sparse_and_salr(tiny_llama):
    n_params = sum(p.numel() for p in tiny_llama.parameters())
    dense = deployed_bytes(tiny_llama)
    assert dense == {"total": 2 * n_params, "adapters": 0, "dense": 2 * n_params}
    cfg = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=4, lora_alpha=8)
    salr_model = copy.deepcopy(tiny_llama)
    salr.convert(salr_model, cfg, progress=False)
    report = deployed_bytes(salr_model)
    adapters = sum(p.numel() for n, p in salr_model.named_parameters() if n.endswith("_cat"))
    assert report["dense"] == dense["total"] and report["adapters"] <= 2 * adapters
    assert report["total"] < dense["total"]
    # a plain sparse model (what LoSA deploys) costs the bitmaps of its pruned weights and nothing else
    sparse = copy.deepcopy(tiny_llama)
    expected = 2 * n_params
    with torch.no_grad():
        for layer in sparse.model.layers.modules():
            if isinstance(layer, torch.nn.Linear):
                w = layer.weight
                w.mul_(torch.rand_like(w) > 0.5)
                expected += w.shape[0] * math.ceil(w.shape[1] / 8) + 2 * int((w != 0).sum()) - 2 * w.numel()
    merged = deployed_bytes(sparse)
    assert merged == {"total": expected, "adapters": 0, "dense": 2 * n_params}
    # a dense LoRA deploys merged: the dense model's bytes
    lora = copy.deepcopy(tiny_llama)
    salr.convert(lora, method_config("lora", cfg), progress=False)
    assert deployed_bytes(lora)["total"] == dense["total"]


def test_deployed_bytes_counts_a_quantized_base_as_stored(tiny_llama):
    """QSALR / QLoRA bases count at the format's payload (bitmap + codes + scales), adapters beside them, never merged:
    the same model at NF4 deploys fewer bytes than at bf16, and each layer's base is exactly its ideal_nbytes."""
    cfg = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=4, lora_alpha=8)
    bf16, nf4 = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    salr.convert(bf16, cfg, progress=False)
    salr.convert(nf4, method_config("qsalr", cfg), progress=False)
    layers = [m for m in nf4.modules() if isinstance(m, salr.SALRLinear)]
    adapters = sum(2 * (m.A_cat.numel() + m.B_cat.numel()) for m in layers)
    bases = sum(m.base.ideal_nbytes() for m in layers)
    rest = sum(2 * p.numel() for n, p in nf4.named_parameters() if ".layers." not in n or "norm" in n)
    report = deployed_bytes(nf4)
    assert report["adapters"] == adapters and report["total"] == bases + adapters + rest
    assert report["total"] < deployed_bytes(bf16)["total"]
    qlora = copy.deepcopy(tiny_llama)  # dense NF4 base + LoRA: below the dense model, though a LoRA would merge
    salr.convert(qlora, method_config("qlora", cfg), progress=False)
    assert deployed_bytes(qlora)["total"] < deployed_bytes(tiny_llama)["total"]

import copy

import torch
from torch import nn

import salr
from salr.bases import DenseBase
from salr.layer import SALRLinear


def _layer(out_dim=24, in_dim=40, sparsity=0.5, residual_rank=6, r=4, dropout=0.0, seed=0, bias=True):
    torch.manual_seed(seed)
    linear = nn.Linear(in_dim, out_dim, bias=bias)
    model = nn.Sequential(linear)
    config = salr.SALRConfig.from_preset(
        "paper", sparsity=sparsity, residual_rank=residual_rank, r=r, lora_dropout=dropout, lora_alpha=8
    )
    w0 = linear.weight.detach().clone()
    salr.convert(model, config, progress=False)
    return model[0], w0, config


def test_init_equals_masked_base_plus_best_rank_r_residual():
    layer, w0, _ = _layer()
    base = layer.base.to_dense()
    mask = base != 0
    assert torch.equal(base, w0 * mask)
    u, s, vh = torch.linalg.svd((w0 - base).double())
    e_r = (u[:, :6] * s[:6]) @ vh[:6]
    x = torch.randn(5, 40)
    expected = x.double() @ (base.double() + e_r).T + layer.bias.double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)
    assert torch.allclose(layer.merged_weight().double(), base.double() + e_r, atol=1e-5)


def test_only_adapters_are_trainable_and_lora_b_starts_at_zero():
    layer, _, _ = _layer()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"A_cat", "B_cat"}
    assert "weight" in dict(layer.base.named_buffers())
    assert torch.count_nonzero(layer.B_cat[:, 6:]) == 0
    assert torch.count_nonzero(layer.A_cat[6:]) > 0


def test_dropout_never_touches_the_residual_block():
    layer, w0, _ = _layer(r=0, dropout=0.5)  # r=0: nothing for dropout to act on
    layer.train()
    x = torch.randn(7, 40)
    assert torch.equal(layer(x), layer(x))
    layer, w0, _ = _layer(dropout=0.9)
    layer.train()
    with torch.no_grad():
        layer.B_cat[:, 6:] = 0  # LoRA contributes nothing, so dropout must not change the output at all
    eval_out = layer.eval()(x)
    train_out = layer.train()(x)
    assert torch.allclose(train_out, eval_out, atol=1e-6)


def test_lora_scale_uses_alpha_over_r():
    layer, _, _ = _layer()
    with torch.no_grad():
        layer.B_cat[:, 6:] = torch.randn(24, 4)
    x = torch.randn(3, 40)
    a_l, b_l = layer.A_cat[6:].detach(), layer.B_cat[:, 6:].detach()
    a_r, b_r = layer.A_cat[:6].detach(), layer.B_cat[:, :6].detach()
    expected = x @ layer.base.to_dense().T + layer.bias + x @ a_r.T @ b_r.T + 2.0 * (x @ a_l.T @ b_l.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_freeze_residual_zeroes_residual_gradients_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24))
    salr.convert(
        model, salr.SALRConfig.from_preset("paper", residual_rank=6, r=4, train_residual=False), progress=False
    )
    layer = model[0]
    with torch.no_grad():
        layer.B_cat[:, 6:] = 0.1
    layer(torch.randn(8, 40)).pow(2).sum().backward()
    assert torch.count_nonzero(layer.A_cat.grad[:6]) == 0
    assert torch.count_nonzero(layer.B_cat.grad[:, :6]) == 0
    assert torch.count_nonzero(layer.A_cat.grad[6:]) > 0
    assert torch.count_nonzero(layer.B_cat.grad[:, 6:]) > 0


def test_training_step_changes_adapters_but_not_base():
    layer, _, _ = _layer()
    base_before = layer.base.weight.clone()
    a_before, b_before = layer.A_cat.detach().clone(), layer.B_cat.detach().clone()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    layer(torch.randn(16, 40)).pow(2).mean().backward()
    opt.step()
    assert torch.equal(layer.base.weight, base_before)
    assert not torch.equal(layer.A_cat, a_before) and not torch.equal(layer.B_cat, b_before)


def test_to_linear_matches_layer_output():
    layer, _, _ = _layer()
    with torch.no_grad():
        layer.B_cat.add_(0.05)
    x = torch.randn(4, 40)
    assert torch.allclose(layer.to_linear()(x), layer(x), atol=1e-5)


def test_bf16_base_keeps_fp32_adapters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False)).to(torch.bfloat16)
    salr.convert(model, salr.SALRConfig.from_preset("paper", residual_rank=8, r=4), progress=False)
    layer = model[0]
    assert layer.base.dtype == torch.bfloat16 and layer.A_cat.dtype == torch.float32
    y = layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_dense_base_empty_is_meta():
    base = DenseBase.empty((4, 8), torch.float32)
    assert base.weight.is_meta and base.shape == (4, 8)


def test_salr_layer_is_deepcopyable():
    layer, _, _ = _layer()
    clone = copy.deepcopy(layer)
    assert isinstance(clone, SALRLinear)
    x = torch.randn(2, 40)
    assert torch.equal(clone(x), layer(x))


def test_rank_scale_is_created_on_the_adapters_device():
    """rank_scale follows the adapters' device (conversion on a GPU once left it on the CPU and the first forward
    failed on mixed devices; the GPU suite's train stage covers that case), except that adapters on the meta device,
    as a checkpoint being loaded builds them, get real CPU scales: the checkpoint does not hold them."""
    from salr.layer import FusedAdapters

    layer = FusedAdapters(torch.zeros(6, 8, device="meta"), torch.zeros(5, 6, device="meta"), 4, 0.5)
    assert layer.rank_scale.device.type == "cpu" and layer.rank_scale.tolist() == [1.0] * 4 + [0.5] * 2
    bf16 = FusedAdapters(torch.zeros(6, 8, dtype=torch.bfloat16), torch.zeros(5, 6, dtype=torch.bfloat16), 4, 0.5)
    assert bf16.rank_scale.tolist() == [1.0] * 4 + [0.5] * 2 and bf16.rank_scale.dtype == torch.bfloat16

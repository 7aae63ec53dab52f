"""Find the target layers of any Hugging Face causal LM and convert them to SALR layers in place; report, pack the
bases into a stored format, merge back.

Data flow per layer (one layer at a time, so memory stays bounded): W0 -> mask -> M ⊙ W0 (frozen base)
-> E = W0 - M ⊙ W0 -> truncated SVD -> [A_res; A_lora], [B_res, B_lora] -> SALRLinear. `convert` has no device
side effects: the model stays where it is, and moving 2:4 bases onto sparse tensor cores is `use_semi_structured`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from salr import bases
from salr.bases import DenseBase
from salr.config import DTYPES, SALRConfig
from salr.errors import SALRError
from salr.experts import EXPERT_PARAMS, SALRExperts, SALRExpertsProjection, check_supported, is_fused_experts
from salr.layer import FusedAdapters, SALRLinear
from salr.pruning import global_threshold, magnitude_mask
from salr.quantize import error_energies, quant_totals, quantize_roundtrip
from salr.residual import residual_svd

logger = logging.getLogger(__name__)


@dataclass
class Target:
    name: str  # "model.layers.0.self_attn.q_proj" or "model.layers.0.mlp.experts.gate_up_proj"
    module_name: str  # the nn.Linear itself, or the experts block that owns the 3-D parameter
    kind: str  # "linear" or "experts"


def _candidates(model: nn.Module) -> list[Target]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | SALRLinear):
            found.append(Target(name, name, "linear"))
        elif is_fused_experts(module):
            found.extend(Target(f"{name}.{p}", name, "experts") for p in EXPERT_PARAMS)
        if module is output and found and found[-1].module_name == name:
            found[-1].kind = "output"  # lm_head: only pruned when named explicitly
    return found


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def find_targets(model: nn.Module, config: SALRConfig) -> list[Target]:
    """Targets named by config.target_modules minus exclude_modules (PEFT semantics: suffix names or a regex)."""
    candidates = _candidates(model)
    spec = config.target_modules
    if spec is None or spec == "all-linear":
        chosen = [t for t in candidates if t.kind != "output"]
    else:
        chosen = [t for t in candidates if _matches(t.name, spec)]
        if isinstance(spec, list):
            missing = [s for s in spec if not any(_matches(t.name, [s]) for t in candidates)]
            if missing:
                leaves = sorted({t.name.rsplit(".", 1)[-1] for t in candidates})
                raise SALRError(f"target_modules {missing} match no linear layer of this model; available: {leaves}")
    if config.exclude_modules:
        chosen = [t for t in chosen if not _matches(t.name, config.exclude_modules)]
    if not chosen:
        raise SALRError(f"no layer matches target_modules={spec!r} (after exclude_modules={config.exclude_modules!r})")
    return chosen


def _lora_A(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    # PEFT's default LoRA init: kaiming-uniform A (a = sqrt(5)), zero B.
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def _salr_factors(
    weight: torch.Tensor, config: SALRConfig, threshold: float | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Prune one 2-D weight and build its fused adapters. Returns (base, A_cat, B_cat, report row)."""
    out_dim, in_dim = weight.shape
    w0 = weight.detach().float()
    mask = magnitude_mask(w0, config.sparsity, config.pattern, config.granularity, threshold)
    base, kept = quantize_roundtrip(w0, mask, config, weight.dtype)  # kept = M ⊙ W0, or its quantized version
    factors = residual_svd(w0 - kept, config.residual_rank, config.svd_method, seed=config.seed)
    A_cat = torch.cat([factors.A, _lora_A(config.r, in_dim, generator)])
    B_cat = torch.cat([factors.B, torch.zeros(out_dim, config.r)], dim=1)
    rank = config.residual_rank
    row = {
        "shape": [out_dim, in_dim],
        "sparsity": 1.0 - float(mask.float().mean()),
        "pruned_energy": factors.error_energy,
        "residual_energy_after_svd": factors.tail_energy,
        "svd_tail_energy": float(factors.singular_values[rank:].pow(2).sum())
        if factors.singular_values.numel() == min(out_dim, in_dim)
        else None,
        "theorem3_bound": (1.0 - rank / min(out_dim, in_dim)) * factors.error_energy,
    }
    row.update(error_energies(w0, mask, kept))
    return base, A_cat, B_cat, row


def _check_ranks(target: Target, shape: tuple[int, ...], config: SALRConfig) -> None:
    limit = min(shape[-2:])
    if config.residual_rank > limit:
        raise SALRError(
            f"residual_rank {config.residual_rank} exceeds min(out, in) = {limit} of {target.name} "
            f"{tuple(shape)}: choose residual_rank <= {limit} or exclude the layer"
        )
    nm = config.nm
    if nm and shape[-1] % nm[1]:
        raise SALRError(
            f"pattern {config.pattern} needs the input dimension of {target.name} {tuple(shape)} divisible by "
            f"{nm[1]}: exclude the layer (exclude_modules) or use unstructured pruning"
        )


def _target_weight(modules: dict[str, nn.Module], target: Target) -> torch.Tensor:
    owner = modules[target.module_name]
    return getattr(owner, target.name.rsplit(".", 1)[-1]) if target.kind == "experts" else owner.weight


def convert(model: nn.Module, config: SALRConfig, init: bool = True, progress: bool = True) -> dict[str, Any]:
    """Replace every target layer of `model` with its SALR version, in place, and return the report.

    With `init=False` only the structure is built (meta tensors, nothing pruned): the checkpoint loader uses it
    before assigning saved tensors. The base stays in the model's dtype; adapters are in config.adapter_dtype.
    """
    started = time.perf_counter()
    targets = find_targets(model, config)
    modules = dict(model.named_modules())
    for target in targets:
        _check_ranks(target, tuple(_target_weight(modules, target).shape), config)
    threshold = None
    if init and config.granularity == "global" and config.nm is None:
        threshold = global_threshold([_target_weight(modules, t) for t in targets], config.sparsity)
    generator = torch.Generator().manual_seed(config.seed)
    rows: list[dict[str, Any]] = []
    experts_done: dict[str, dict[str, SALRExpertsProjection]] = {}
    for target in tqdm(targets, desc="salr convert", disable=not progress or not init, unit="layer"):
        owner = modules[target.module_name]
        if isinstance(owner, SALRLinear):
            raise SALRError(f"{target.name} is already a SALR layer: convert a dense model")
        if target.kind == "experts":
            check_supported(owner, target.name)
            param_name = target.name.rsplit(".", 1)[-1]
            weight = getattr(owner, param_name)
            parts = [_salr_parts(w, config, threshold, generator, init) for w in weight]
            rows.extend({"name": f"{target.name}[{e}]", **part[3]} for e, part in enumerate(parts) if init)
            experts_done.setdefault(target.module_name, {})[param_name] = SALRExpertsProjection(
                [part[0] for part in parts],
                torch.stack([part[1] for part in parts]),
                torch.stack([part[2] for part in parts]),
                **_adapter_kwargs(config),
            )
            continue
        base, A_cat, B_cat, row = _salr_parts(owner.weight, config, threshold, generator, init)
        if init:
            rows.append({"name": target.name, **row})
        _set_submodule(
            model, target.module_name, SALRLinear(base, owner.bias, A_cat, B_cat, **_adapter_kwargs(config))
        )
    for module_name, projections in experts_done.items():
        missing = [p for p in EXPERT_PARAMS if p not in projections]
        if missing:
            raise SALRError(f"{module_name}: both {EXPERT_PARAMS} must be targeted together (missing {missing})")
        experts = SALRExperts(modules[module_name], projections["gate_up_proj"], projections["down_proj"])
        _set_submodule(model, module_name, experts)
    mark_trainable(model)
    if not init:
        return {"config": config.to_dict(), "layers": [], "totals": {"target_layers": len(targets)}}
    report = build_report(model, rows, config)
    report["seconds"] = time.perf_counter() - started
    return report


def _adapter_kwargs(config: SALRConfig) -> dict[str, Any]:
    return {
        "residual_rank": config.residual_rank,
        "lora_scale": config.lora_scale,
        "lora_dropout": config.lora_dropout,
        "train_residual": config.train_residual,
    }


def _salr_parts(
    weight: torch.Tensor, config: SALRConfig, threshold: float | None, generator: torch.Generator, init: bool
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(dense base, A_cat, B_cat, report row) of one 2-D weight; meta tensors and no row when not `init`."""
    adapter_dtype = DTYPES[config.adapter_dtype]
    if init:
        base, A_cat, B_cat, row = _salr_factors(weight, config, threshold, generator)
        base = base if isinstance(base, nn.Module) else DenseBase(base)
        return base, A_cat.to(adapter_dtype), B_cat.to(adapter_dtype), row
    out_dim, in_dim = weight.shape
    rank = config.residual_rank + config.r
    base = DenseBase(torch.empty(out_dim, in_dim, dtype=weight.dtype, device="meta"))
    A_cat = torch.empty(rank, in_dim, dtype=adapter_dtype, device="meta")
    B_cat = torch.empty(out_dim, rank, dtype=adapter_dtype, device="meta")
    return base, A_cat, B_cat, {}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def salr_modules(model: nn.Module) -> list[tuple[str, FusedAdapters]]:
    """Every module with fused adapters: SALRLinear layers and MoE expert projections."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FusedAdapters)]


def base_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(state-dict prefix of the base, the module holding it, its attribute name) for every frozen base."""
    slots = []
    for name, module in salr_modules(model):
        if isinstance(module, SALRLinear):
            slots.append((f"{name}.base", module, "base"))
        else:
            slots.extend((f"{name}.bases.{e}", module.bases, str(e)) for e in range(module.num_experts))
    return slots


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything except A_cat / B_cat (PEFT-style)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("A_cat", "B_cat")))


def build_report(model: nn.Module, rows: list[dict[str, Any]], config: SALRConfig) -> dict[str, Any]:
    """Per-layer rows plus totals. Counts are of weights (parameters and frozen base buffers)."""
    base_numel = base_nonzero = 0
    for _, holder, attr in base_slots(model):
        base = getattr(holder, attr)
        if base.format == "qbitmap":  # kept weights are the bitmap's, even those whose value quantized to 0
            base_numel, base_nonzero = base_numel + base.rows * base.cols, base_nonzero + base.nnz
            continue
        dense = base.to_dense()
        base_numel += dense.numel()
        base_nonzero += int((dense != 0).sum()) if dense.device.type != "meta" else 0
    layers = salr_modules(model)
    adapter_params = sum(m.A_cat.numel() + m.B_cat.numel() for _, m in layers)
    other = [p for n, p in model.named_parameters() if not n.endswith(("A_cat", "B_cat"))]
    bias = sum(m.bias.numel() for _, m in layers if getattr(m, "bias", None) is not None)
    return {
        "config": config.to_dict(),
        "layers": rows,
        "totals": {
            "target_layers": len(rows),
            "sparsity": 1.0 - base_nonzero / base_numel if base_numel else 0.0,
            "parameters": sum(p.numel() for p in other) + base_numel + bias,
            "nonzero_parameters": sum(int((p != 0).sum()) for p in other) + base_nonzero + bias,
            "adapter_parameters": adapter_params,
            "pruned_energy": sum(r["pruned_energy"] for r in rows),
            "residual_energy_after_svd": sum(r["residual_energy_after_svd"] for r in rows),
            **quant_totals(rows, config),
        },
    }


def pack_bases(model: nn.Module, fmt: str = "bitmap") -> int:
    """Store every frozen base (linear layers and MoE experts) in format `fmt`, in place; returns how many changed.
    Outputs are unchanged: the bitmap holds exactly the masked weights."""
    changed = 0
    for _, holder, attr in base_slots(model):
        old = getattr(holder, attr)
        new = bases.pack(old, fmt)
        if new is not old:
            setattr(holder, attr, new)
            changed += 1
    return changed


def base_format(model: nn.Module) -> str:
    """The stored format of the frozen bases ("bitmap", "dense"), "mixed" if they differ, "none" without any."""
    formats = {getattr(holder, attr).format for _, holder, attr in base_slots(model)}
    if not formats:
        return "none"
    return formats.pop() if len(formats) == 1 else "mixed"


def use_semi_structured(model: nn.Module) -> dict[str, Any]:
    """Run every 2:4 SALR base that sits on a CUDA GPU on sparse tensor cores (`SemiStructuredBase`), in place.

    Call it after moving a 2:4 model to the GPU; `convert` never does it by itself. Dense and bitmap bases are
    swapped when their weight is 2:4 and the GPU, dtype and shape allow it (`support_reason`); the others are left as
    they are. Outputs are unchanged up to rounding. Returns {"semi_structured": layers swapped, "kept": layers left,
    "reasons": {why: count}}.
    """
    from salr.bases.semi_structured import SemiStructuredBase

    swapped, kept, reasons = 0, 0, {}
    for _, holder, attr in base_slots(model):
        base = getattr(holder, attr)
        if isinstance(base, SemiStructuredBase):
            continue
        # The device first: decoding a bitmap base only to find it is on the CPU would be wasted work.
        if next(base.buffers()).device.type != "cuda":
            why = "not on a CUDA device"
        else:
            try:
                candidate = SemiStructuredBase(base.to_dense())  # checks the 2:4 pattern, then the hardware
            except SALRError:
                why = "weight is not 2:4"
            else:
                why = candidate.reason
                if why is None:
                    setattr(holder, attr, candidate)
                    swapped += 1
                    continue
        kept += 1
        reasons[why] = reasons.get(why, 0) + 1
    if reasons:
        logger.info("2:4 bases left as they are: %s", reasons)
    return {"semi_structured": swapped, "kept": kept, "reasons": reasons}


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold adapters into dense weights and put plain nn.Linear / 3-D expert parameters back, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SALRLinear):
            _set_submodule(model, name, module.to_linear())
        elif isinstance(module, SALRExperts):
            _set_submodule(model, name, module.to_original())
    return model

"""Find the target layers of any Hugging Face causal LM and convert them to SALR layers in place; report, pack the
bases into a stored format, merge back.

Data flow per layer (one layer at a time, so memory stays bounded): W0 -> mask -> M ⊙ W0 (frozen base; quantized
with config.quant) -> E = W0 - base -> truncated SVD -> [A_res; A_lora], [B_res, B_lora] -> SALRLinear
(salr.decompose has the activation-aware variants). `convert` has no device
side effects: the model stays where it is, and moving 2:4 bases onto sparse tensor cores is `use_semi_structured`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from salr import bases
from salr.bases import DenseBase
from salr.block_tuning import tune_block
from salr.calibration import BlockwiseCalibration, LayerStats, calibration_ids, iterate_blocks
from salr.config import DTYPES, SALRConfig, pattern_key_matches
from salr.decompose import Decomposition, decompose, decompose_group
from salr.errors import SALRError
from salr.experts import EXPERT_PARAMS, SALRExperts, SALRExpertsProjection, check_supported, is_fused_experts
from salr.layer import FusedAdapters, SALRLinear
from salr.pruning import global_threshold
from salr.quantize import quant_totals

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
        _refuse_unsupported(model, config)
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


def _refuse_unsupported(model: nn.Module, config: SALRConfig) -> None:
    """all-linear must mean all: a module salr cannot convert is an error, not a half-converted model."""
    from salr.architectures import unsupported_modules

    for name, why in unsupported_modules(model):
        if not (config.exclude_modules and _matches(name, config.exclude_modules)):
            raise SALRError(
                f"{name} is {why}: salr cannot convert it and will not leave it dense while converting the rest; "
                "exclude it with exclude_modules or name the target modules"
            )


def _lora_A(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    # PEFT's default LoRA init: kaiming-uniform A (a = sqrt(5)), zero B.
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def _check_ranks(target: Target, shape: tuple[int, ...], config: SALRConfig) -> None:
    limit = min(shape[-2:])
    if config.residual_rank > limit:
        raise SALRError(
            f"residual_rank {config.residual_rank} exceeds min(out, in) = {limit} of {target.name} "
            f"{tuple(shape)}: choose residual_rank <= {limit} or exclude the layer"
        )
    if config.r > 4 * limit:  # a larger rank is pointless (parameter-matched baselines go a little over min(out, in))
        raise SALRError(
            f"LoRA rank {config.r} exceeds 4 x min(out, in) = {4 * limit} of {target.name} {tuple(shape)}: the "
            "adapter would be larger than the layer; choose a smaller LoRA rank"
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


def convert(
    model: nn.Module,
    config: SALRConfig,
    init: bool = True,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Replace every target layer of `model` with its SALR version, in place, and return the report.

    When `config.needs_calibration` (an activation-aware criterion or residual), the layers are converted block by
    block on calibration activations: `calibration` token ids [n, T] if given, else built from `config.calibration`
    ("self": sampled from the model; a file: read with `tokenizer`). With `init=False` only the structure is built
    (meta tensors, nothing pruned): the checkpoint loader uses it before assigning saved tensors. The base stays in
    the model's dtype; adapters are in config.adapter_dtype.
    """
    started = time.perf_counter()
    targets = find_targets(model, config)
    _refuse_unmatched_pattern_keys(config, targets)
    modules = dict(model.named_modules())
    for target in targets:  # everything is checked before any layer is converted: never a half-converted model
        if isinstance(modules[target.module_name], SALRLinear):
            raise SALRError(f"{target.name} is already a SALR layer: convert a dense model")
        weight = _target_weight(modules, target)
        _check_ranks(target, tuple(weight.shape), config.for_target(target.name))
        if target.kind == "experts":
            check_supported(modules[target.module_name], target.name)
        if init and not weight.is_meta and not bool(torch.isfinite(weight).all()):
            raise SALRError(f"{target.name} has non-finite weights (NaN or infinity): the model is corrupt")
    _untie_converted_output(model, targets)
    threshold = None
    if init and config.granularity == "global" and config.nm is None:
        threshold = global_threshold([_target_weight(modules, t) for t in targets], config.sparsity)
    converter = _Converter(model, config, torch.Generator().manual_seed(config.seed), threshold, init)
    if init and config.needs_calibration:
        if calibration is None:
            calibration = calibration_ids(
                model, tokenizer, config.calibration, config.calibration_samples, config.calibration_length,
                config.seed,
            )  # fmt: skip
        _convert_blockwise(converter, targets, calibration, progress)
    else:
        for target in tqdm(targets, desc="salr convert", disable=not progress or not init, unit="layer"):
            converter.convert(target, modules[target.module_name], {})
        converter.install_experts()
    mark_trainable(model)
    if not init:
        return {"config": config.to_dict(), "layers": [], "totals": {"target_layers": len(targets)}}
    report = build_report(model, converter.rows, config)
    if converter.block_rows:
        report["block_tuning"] = converter.block_rows
    report["seconds"] = time.perf_counter() - started
    return report


def _refuse_unmatched_pattern_keys(config: SALRConfig, targets: list[Target]) -> None:
    """A per-layer key that names no converted layer is a typo whose layers would silently get the global value."""
    for field_name in ("sparsity_pattern", "residual_rank_pattern"):
        for key in getattr(config, field_name) or {}:
            if not any(pattern_key_matches(key, t.name) for t in targets):
                example = targets[0].name if targets else "model.layers.0.mlp.gate_proj"
                raise SALRError(
                    f"{field_name} key {key!r} matches no converted layer: a key is a regex matched against the end "
                    f"of a layer name after a dot, as PEFT's rank_pattern (e.g. 'gate_proj', 'mlp\\..*' or "
                    f"'layers\\.0\\..*' for {example})"
                )


def _untie_converted_output(model: nn.Module, targets: list[Target]) -> None:
    """A converted lm_head tied to the input embeddings stops sharing their weight (the embeddings stay dense): the
    config must say so, or loading the saved checkpoint would tie them again, onto a layer that has no weight."""
    if not any(t.kind == "output" for t in targets) or getattr(model, "config", None) is None:
        return
    for cfg in (model.config, model.config.get_text_config()):
        if getattr(cfg, "tie_word_embeddings", False):
            logger.info("lm_head is converted: untying it from the input embeddings, which stay dense")
            cfg.tie_word_embeddings = False


def _convert_blockwise(converter: _Converter, targets: list[Target], ids: torch.Tensor, progress: bool) -> None:
    """Calibrate and convert one transformer block at a time (bounded memory: one block's Grams at once)."""
    calib = BlockwiseCalibration(converter.model, ids)
    calib.capture_inputs()
    blocks = list(iterate_blocks(converter.model))
    outside = [t for t in targets if not any(t.module_name.startswith(name + ".") for name, _ in blocks)]
    if outside:
        raise SALRError(
            f"{[t.name for t in outside][:3]} are outside the transformer blocks, where calibration cannot reach: "
            "exclude them (exclude_modules) or use the paper's method (--preset paper)"
        )
    config = converter.config
    dense_hidden = calib.hidden  # the dense model's inputs of the current block: block tuning's reference
    tuning_steps = config.tuning_steps
    for name, block in tqdm(blocks, desc="salr convert", disable=not progress, unit="block"):
        mine = [t for t in targets if t.module_name.startswith(name + ".")]
        if tuning_steps:  # the dense block's outputs on the dense model's inputs, before it changes
            dense_hidden = calib.run_block(block, dense_hidden)
        if not mine:  # nothing to convert here; the next block still needs this one's outputs as its inputs
            calib.hidden = calib.run_block(block)
            continue
        prefix = len(name) + 1
        sequential = config.sequential
        stats, dense_outputs = calib.statistics(block, [t.name[prefix:] for t in mine], outputs=not sequential)
        modules = dict(converter.model.named_modules())
        converter.decompose_shared_inputs(mine, modules, stats, prefix)
        for target in mine:
            local = {key: value for key, value in stats.items() if key.split("[")[0] == target.name[prefix:]}
            converter.convert(target, modules[target.module_name], local, prefix=target.name[:prefix])
        converter.install_experts()
        del stats
        if tuning_steps:  # fit the compressed block to the dense block's outputs
            errors = tune_block(block, calib.hidden, calib.kwargs, dense_hidden, tuning_steps, config.block_tuning_lr)
            if errors:
                converter.block_rows.append({"block": name, **errors})
        # sequential: the next block sees what the compressed block outputs; else the dense block's outputs
        if sequential:
            with _merged_for_calibration(block):
                calib.hidden = calib.run_block(block)
        else:
            calib.hidden = dense_outputs


@contextmanager
def _merged_for_calibration(block: nn.Module) -> Iterator[None]:
    """Within the block, each SALRLinear runs as its merged nn.Linear (`to_linear`: Ŵ + B A in one dense weight):
    the same map as base + adapter branch, ~20 % fewer FLOPs than the two-GEMM branch on the default model's
    calibration pass, which needs no autograd."""
    layers = [m for m in block.modules() if isinstance(m, SALRLinear)]
    for layer in layers:
        layer.forward = layer.to_linear().forward  # a bound method: a plain attribute, not a registered submodule
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to SALRLinear.forward


class _Converter:
    """Builds the SALR version of one target at a time and collects the report rows."""

    def __init__(
        self, model: nn.Module, config: SALRConfig, generator: torch.Generator, threshold: float | None, init: bool
    ) -> None:
        self.model, self.config, self.generator, self.threshold, self.init = model, config, generator, threshold, init
        self.rows: list[dict[str, Any]] = []
        self.block_rows: list[dict[str, Any]] = []  # block tuning's output errors, one row per block
        self.experts: dict[str, dict[str, SALRExpertsProjection]] = {}
        self.ready: dict[str, Decomposition] = {}  # decomposed ahead by decompose_shared_inputs, by target name

    def decompose_shared_inputs(
        self, targets: list[Target], modules: dict[str, nn.Module], stats: dict[str, LayerStats], prefix: int
    ) -> None:
        """Decompose together the linear targets that read the same input (one shared LayerStats: q/k/v, gate/up),
        ahead of `convert` (salr.decompose.decompose_group: one SparseGPT sweep for the group)."""
        groups: dict[tuple[int, int, float], list[Target]] = {}  # by shared statistics, residual rank and sparsity
        for target in targets:
            local = target.name[prefix:]
            if target.kind == "linear" and local in stats:
                name = target.name
                key = (id(stats[local]), self.config.residual_rank_of(name), self.config.sparsity_of(name))
                groups.setdefault(key, []).append(target)
        for group in (g for g in groups.values() if len(g) > 1):
            weights = [modules[t.module_name].weight for t in group]
            config = self.config.for_target(group[0].name)
            splits = decompose_group(weights, config, stats[group[0].name[prefix:]], self.threshold)
            self.ready.update((t.name, split) for t, split in zip(group, splits, strict=True))

    def parts(
        self, weight: torch.Tensor, config: SALRConfig, stats: LayerStats | None, split: Decomposition | None = None
    ) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
        """(frozen base: dense, or quantized bitmap with config.quant; A_cat, B_cat, report row) of one 2-D weight
        converted with `config` (the target's: SALRConfig.for_target), from `split` when it was decomposed ahead;
        meta tensors (a dense base) and no row when not `init`."""
        adapter_dtype = DTYPES[config.adapter_dtype]
        out_dim, in_dim = weight.shape
        if not self.init:
            rank = config.residual_rank + config.r
            base = DenseBase(torch.empty(out_dim, in_dim, dtype=weight.dtype, device="meta"))
            A_cat = torch.empty(rank, in_dim, dtype=adapter_dtype, device="meta")
            B_cat = torch.empty(out_dim, rank, dtype=adapter_dtype, device="meta")
            return base, A_cat, B_cat, {}
        split = split or decompose(weight, config, stats, self.threshold)  # on the weight's device
        device = weight.device
        A_cat = torch.cat([split.factors.A, _lora_A(config.r, in_dim, self.generator).to(device)])
        B_cat = torch.cat([split.factors.B, torch.zeros(out_dim, config.r, device=device)], dim=1)
        base = split.stored
        if base is None:
            base = DenseBase(split.base.to(device=device, dtype=weight.dtype))
        return base, A_cat.to(device, adapter_dtype), B_cat.to(device, adapter_dtype), split.row

    def convert(self, target: Target, owner: nn.Module, stats: dict[str, LayerStats], prefix: str = "") -> None:
        """Convert one target; `stats` maps its calibration keys (relative to `prefix`) to Grams."""
        local = target.name[len(prefix) :]
        config = self.config.for_target(target.name)
        if target.kind == "experts":
            check_supported(owner, target.name)
            param = local.rsplit(".", 1)[-1]
            parts = [self.parts(w, config, stats.get(f"{local}[{e}]")) for e, w in enumerate(getattr(owner, param))]
            if self.init:
                self.rows.extend({"name": f"{target.name}[{e}]", **p[3]} for e, p in enumerate(parts))
            projection = SALRExpertsProjection(
                [p[0] for p in parts], torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts]),
                **_adapter_kwargs(config),
            )  # fmt: skip
            self.experts.setdefault(target.module_name, {})[param] = projection
            return
        split = self.ready.pop(target.name, None)
        base, A_cat, B_cat, row = self.parts(owner.weight, config, stats.get(local), split)
        if self.init:
            self.rows.append({"name": target.name, **row})
        layer = SALRLinear(base, owner.bias, A_cat, B_cat, **_adapter_kwargs(config))
        _set_submodule(self.model, target.module_name, layer)

    def install_experts(self) -> None:
        """Swap in the SALR experts blocks whose projections are both converted."""
        for module_name, projections in self.experts.items():
            missing = [p for p in EXPERT_PARAMS if p not in projections]
            if missing:
                raise SALRError(f"{module_name}: both {EXPERT_PARAMS} must be targeted together (missing {missing})")
            original = self.model.get_submodule(module_name)
            experts = SALRExperts(original, projections["gate_up_proj"], projections["down_proj"])
            _set_submodule(self.model, module_name, experts)
        self.experts = {}


def _adapter_kwargs(config: SALRConfig) -> dict[str, Any]:
    return {
        "residual_rank": config.residual_rank,
        "lora_scale": config.lora_scale,
        "lora_dropout": config.lora_dropout,
        "train_residual": config.train_residual,
    }


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


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold adapters into dense weights and put plain nn.Linear / 3-D expert parameters back, in place (the dense
    merge of salr.merge; `salr merge --mode sparse` keeps the base's zeros instead)."""
    from salr.merge import unload  # merge builds on this module

    return unload(model, lambda name, module: module.merged_weight())

"""PEFT interchange: a SALR model as a pruned transformers base + a stock PEFT LoRA adapter, and back.

Export (`export_peft`, `salr export RUN --to peft --out OUT`):
  OUT/base/      a plain transformers checkpoint of the pruned base M ⊙ W0 (zeros in place, the model's dtype,
                 safetensors) with the tokenizer
  OUT/adapter/   a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) of rank r_res + r_lora per
                 layer: lora_A = A_cat, lora_B = B_cat diag(rank_scale) (SALR's per-block scales folded into B) and
                 lora_alpha = r, so PEFT's single scaling lora_alpha / r = 1 reproduces them; plus salr_export.json
                 (the SALR config, so the import can split the blocks again)
MoE experts stored as fused 3-D parameters go through PEFT's `target_parameters` (PEFT's ParamWrapper: lora_A
[E·r, in] holds expert e in rows e·r..(e+1)·r, lora_B [out, r·E] holds rank k of expert e in column k·E + e).

Import (`load_peft`, `salr.load(OUT)`, `salr compress --from-peft`): any PEFT LoRA adapter on any base becomes a SALR
model whose frozen base is that base (its zeros are the mask). With salr_export.json the residual and LoRA blocks
are split again (exact: re-exporting writes the same adapter tensors); without it the whole adapter is the LoRA block
(residual rank 0, lora_alpha from the adapter's scaling).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from salr.bases import DenseBase
from salr.config import SALRConfig
from salr.convert import convert, find_targets, mark_trainable, pack_bases, salr_modules
from salr.errors import SALRError
from salr.experts import EXPERT_PARAMS, SALRExpertsProjection, is_fused_experts
from salr.io import atomic_write_json, write_dir
from salr.layer import FusedAdapters
from salr.merge import base_weight, unload

logger = logging.getLogger(__name__)

BASE_DIR = "base"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_META = "salr_export.json"
EXPORT_VERSION = 1
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<ab>[AB])\.weight$")


# ----------------------------------------------------------------------------- export


def folded_factors(module: FusedAdapters) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in fp32 with B A = B_cat diag(rank_scale) A_cat: A [..., r, in], B [..., out, r]."""
    if type(module).delta_weight is not FusedAdapters.delta_weight:
        raise SALRError(
            f"{type(module).__name__} adds more than B diag(s) A to its base (e.g. a masked update), which a LoRA "
            "adapter cannot express: export it merged instead (salr export RUN --to merged --mode sparse)"
        )
    return module.A_cat.detach().float().clone(), module.B_cat.detach().float() * module.rank_scale.float()


def _require_peft(experts: list[str]) -> Any:
    try:
        import peft
    except ImportError as err:
        raise SALRError("exporting a PEFT adapter needs PEFT: pip install 'salr[peft]'") from err
    if experts and "target_parameters" not in peft.LoraConfig.__dataclass_fields__:
        raise SALRError(
            f"the installed PEFT {peft.__version__} cannot target fused MoE expert parameters "
            f"({', '.join(experts[:4])}{', ...' if len(experts) > 4 else ''}): upgrade to peft>=0.17, or export "
            "merged (salr export RUN --to merged)"
        )
    return peft


def _target_modules(model: nn.Module, linear: list[str]) -> list[str]:
    """Leaf names (q_proj, ...) when they select exactly `linear` in the plain model, else the full names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    chosen = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in leaves}
    return leaves if chosen == set(linear) else sorted(linear)


def lora_config(model: nn.Module, ranks: dict[str, int], experts: set[str], dropout: float, peft: Any) -> Any:
    """A PEFT LoraConfig targeting `ranks` (name -> rank) with scaling 1 everywhere (lora_alpha = r)."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(name): r for name, r in ranks.items() if r != common}
    linear = [name for name in ranks if name not in experts]
    kwargs: dict[str, Any] = {"target_parameters": sorted(experts)} if experts else {}
    return peft.LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=others,
        alpha_pattern=dict(others),
        target_modules=_target_modules(model, linear) if linear else [],
        lora_dropout=0.0 if experts else dropout,  # PEFT's ParamWrapper refuses dropout
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
        **kwargs,
    )


def _param_wrapper(module: nn.Module, param: str) -> nn.Module:
    while hasattr(module, "parameter_name"):
        if module.parameter_name == param:
            return module
        module = module.base_layer
    raise SALRError(f"PEFT did not wrap parameter {param!r}")


@torch.no_grad()
def _fill(peft_model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], experts: set[str]) -> None:
    root = peft_model.base_model.model
    for name, (A, B) in factors.items():
        if name in experts:
            owner, _, param = name.rpartition(".")
            layer = _param_wrapper(root.get_submodule(owner), param)
            E, r, d_in = A.shape
            A, B = A.reshape(E * r, d_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)
        else:
            layer = root.get_submodule(name)
        for lora, value in ((layer.lora_A["default"], A), (layer.lora_B["default"], B)):
            if tuple(lora.weight.shape) != tuple(value.shape):
                raise SALRError(f"{name}: PEFT made a {list(lora.weight.shape)} factor for {list(value.shape)}")
            lora.weight.data = value.contiguous()


def export_peft(model: nn.Module, tokenizer: Any, config: SALRConfig, out: str | os.PathLike) -> dict[str, Any]:
    """Write OUT/base (pruned base, transformers) and OUT/adapter (PEFT LoRA) for a SALR `model`; consumes `model`
    (its SALR layers are replaced by plain ones). Returns a summary: targets, ranks, files."""
    out = Path(out)
    modules = salr_modules(model)
    if not modules:
        raise SALRError("the model has no SALR layers to export")
    experts = {name for name, m in modules if isinstance(m, SALRExpertsProjection)}
    peft = _require_peft(sorted(experts))
    factors = {name: folded_factors(m) for name, m in modules if m.rank > 0}
    skipped = sorted({name for name, m in modules if m.rank == 0})
    if skipped:
        logger.info("%d layers have no adapter (rank 0) and are exported as base weights only", len(skipped))
    ranks = {name: A.shape[-2] for name, (A, _) in factors.items()}
    unload(model, lambda name, module: base_weight(module))
    meta = {
        "format_version": EXPORT_VERSION,
        "salr": config.to_dict(),
        "residual_rank": config.residual_rank,
        "lora_scale": config.lora_scale,
        "scales_folded_into_lora_B": True,
        "ranks": ranks,
    }

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp / BASE_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / BASE_DIR)
        if not factors:
            raise SALRError("no layer has an adapter (all ranks are 0): export merged or use the base alone")
        lora = lora_config(model, ranks, experts & set(factors), config.lora_dropout, peft)
        peft_model = peft.get_peft_model(model, lora)
        _fill(peft_model, factors, experts)
        peft_model.peft_config["default"].base_model_name_or_path = str((out / BASE_DIR).resolve())
        # no embedding layers are adapted; "auto" would look base_model_name_or_path up (on the Hub when absent)
        peft_model.save_pretrained(tmp / ADAPTER_DIR, save_embedding_layers=False)
        atomic_write_json(tmp / ADAPTER_DIR / EXPORT_META, meta)

    write_dir(out, fill, ADAPTER_DIR, "export")
    return {
        "base": str(out / BASE_DIR),
        "adapter": str(out / ADAPTER_DIR),
        "targets": len(factors),
        "expert_targets": len(experts & set(factors)),
        "ranks": sorted(set(ranks.values())),
        "base_only": skipped,
        "bytes": {d: sum(p.stat().st_size for p in (out / d).iterdir()) for d in (BASE_DIR, ADAPTER_DIR)},
    }


# ----------------------------------------------------------------------------- import


def find_pair(path: str | os.PathLike, base: str | os.PathLike | None = None) -> tuple[Path, str] | None:
    """(adapter dir, base model) of an exported pair OUT (OUT/adapter + OUT/base) or of an adapter directory, else
    None. The base is `base` if given, else OUT/base, a `base` directory beside the adapter, or the adapter's
    base_model_name_or_path."""
    path = Path(path)
    if (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        adapter = path / ADAPTER_DIR
    elif (path / ADAPTER_CONFIG).is_file():
        adapter = path
    else:
        return None
    if base is None:
        sibling = adapter.parent / BASE_DIR
        if (sibling / "config.json").is_file():
            base = sibling
        else:
            base = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise SALRError(f"{adapter}: no base model found: pass the pruned base model directory")
    return adapter, str(base)


def _check_adapter_config(cfg: dict[str, Any], adapter: Path) -> None:
    if cfg.get("peft_type") != "LORA":
        raise SALRError(f"{adapter} is a {cfg.get('peft_type')} adapter; salr imports LoRA adapters only")
    unsupported = [
        key
        for key in ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "trainable_token_indices")
        if cfg.get(key)
    ]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise SALRError(f"{adapter}: PEFT options {unsupported} have no SALR equivalent: retrain without them")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's get_pattern_key semantics
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _adapter_targets(model: nn.Module, tensors: dict[str, torch.Tensor], adapter: Path) -> dict[str, dict]:
    """Per target weight name (a linear layer, or `<experts>.<param>`): A [.., r, in] and B [.., out, r]."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise SALRError(f"{adapter}: unexpected tensor {key!r} in a LoRA adapter (embeddings or biases?)")
        pairs.setdefault((match["path"], match["nest"]), {})[match["ab"]] = value
    targets: dict[str, dict] = {}
    for (path, _nest), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise SALRError(f"{adapter}: {path} has lora_{''.join(ab)} without its partner")
        module = model.get_submodule(path)
        A, B = ab["A"], ab["B"]
        if isinstance(module, nn.Linear):
            if A.shape[1] != module.in_features or B.shape[0] != module.out_features or A.shape[0] != B.shape[1]:
                raise SALRError(f"{adapter}: factors of {path} do not fit its shape {list(module.weight.shape)}")
            targets[path] = {"A": A, "B": B, "module": module}
        elif is_fused_experts(module):
            name, A, B = _expert_factors(module, path, A, B, adapter)
            targets[name] = {"A": A, "B": B, "module": module}
        else:
            raise SALRError(f"{adapter}: {path} ({type(module).__name__}) is neither a linear layer nor fused experts")
    return targets


def _expert_factors(module: nn.Module, path: str, A: torch.Tensor, B: torch.Tensor, adapter: Path):
    """(name, A [E, r, in], B [E, out, r]) of a ParamWrapper's factors; the parameter is found by shape."""
    for param in EXPERT_PARAMS:
        E, d_out, d_in = getattr(module, param).shape
        if A.shape[1] == d_in and B.shape[0] == d_out and A.shape[0] == B.shape[1] and A.shape[0] % E == 0:
            r = A.shape[0] // E
            return f"{path}.{param}", A.reshape(E, r, d_in), B.reshape(d_out, r, E).permute(2, 0, 1).contiguous()
    raise SALRError(f"{adapter}: factors {list(A.shape)}, {list(B.shape)} fit no expert parameter of {path}")


def _unfold(B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """B_cat with B_cat * scale == B exactly (fp32): B / scale, nudged by an ulp where the division rounds away."""
    B_cat = B / scale
    for direction in (float("inf"), float("-inf")):
        bad = B_cat * scale != B
        if not bad.any():
            break
        nudged = torch.nextafter(B_cat, torch.full_like(B_cat, direction))
        B_cat = torch.where(bad & (nudged * scale == B), nudged, B_cat)
    return B_cat


def _import_config(cfg: dict, meta: dict | None, targets: dict[str, dict], model: nn.Module) -> SALRConfig:
    names = sorted(targets)
    if meta is not None:
        config = SALRConfig.from_dict(meta["salr"])
        if sorted(t.name for t in find_targets(model, config)) == names:
            return config  # the exported config as it was, so a re-export writes the same salr_export.json
        return SALRConfig.from_dict({**meta["salr"], "target_modules": names, "exclude_modules": None})
    ranks = {targets[n]["A"].shape[-2] for n in names}
    scalings = {targets[n]["scaling"] for n in names}
    if len(ranks) > 1 or len(scalings) > 1:
        raise SALRError(
            f"the adapter has per-layer ranks {sorted(ranks)} or scalings {sorted(scalings)}: SALR checkpoints hold "
            "one LoRA rank and scale for all layers"
        )
    r, scaling = ranks.pop(), scalings.pop()
    weights = [targets[n]["weight"] for n in names]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return SALRConfig.from_preset(
        "paper", sparsity=min(round(sparsity, 6), 0.999999), residual_rank=0, r=r, lora_alpha=scaling * r,
        target_modules=names, lora_dropout=float(cfg.get("lora_dropout") or 0.0),
    )  # fmt: skip


def _load_base(spec: str, adapter: Path) -> tuple[nn.Module, Any]:
    """The base model (every weight from its files, see salr.loaders.hf); its tokenizer from the base directory or
    the adapter directory, None when neither has one."""
    from transformers import AutoTokenizer

    from salr.loaders import load_model  # loaders import checkpoint, which dispatches here lazily
    from salr.loaders.hf import load_hf_weights

    path = Path(spec)
    if not (path / "config.json").is_file():
        return load_model(spec)
    model = load_hf_weights(path)
    for where in (path, adapter):
        if (where / "tokenizer_config.json").is_file():
            return model.eval(), AutoTokenizer.from_pretrained(where)
    return model.eval(), None


def load_peft(
    path: str | os.PathLike, base: str | os.PathLike | None = None, base_format: str = "bitmap"
) -> tuple[nn.Module, Any, SALRConfig]:
    """(SALR model, tokenizer, SALRConfig) from an exported pair or a PEFT LoRA adapter directory (see `find_pair`).
    Bases are packed into `base_format` ("bitmap" or "dense")."""
    found = find_pair(path, base)
    if found is None:
        raise SALRError(f"{path} holds no PEFT adapter ({ADAPTER_CONFIG}) nor an exported pair")
    adapter, base_spec = found
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    _check_adapter_config(cfg, adapter)
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise SALRError(f"{adapter}: no {ADAPTER_WEIGHTS} (salr reads safetensors adapters only)")
    meta = json.loads((adapter / EXPORT_META).read_text()) if (adapter / EXPORT_META).is_file() else None
    model, tokenizer = _load_base(base_spec, adapter)
    targets = _adapter_targets(model, load_file(adapter / ADAPTER_WEIGHTS), adapter)
    for name, t in targets.items():
        r = t["A"].shape[-2]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
        t["scaling"] = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        module = t["module"]
        t["weight"] = module.weight if isinstance(module, nn.Linear) else getattr(module, name.rsplit(".")[-1])
        t["weight"] = t["weight"].detach()  # read before `convert` replaces the module
    config = _import_config(cfg, meta, targets, model)
    convert(model, config, init=False, progress=False)
    _install(model, targets, config)
    mark_trainable(model)
    if base_format != "dense":
        pack_bases(model, base_format)
    return model.eval(), tokenizer, config


@torch.no_grad()
def _install(model: nn.Module, targets: dict[str, dict], config: SALRConfig) -> None:
    """Put the saved base weights and the (unfolded) factors into the structure `convert(init=False)` built."""
    from salr.config import DTYPES

    dtype = DTYPES[config.adapter_dtype]
    modules = dict(salr_modules(model))
    for name, t in targets.items():
        module = modules.get(name)
        if module is None:
            raise SALRError(f"{name} is targeted by the adapter but was not converted")
        A, B = t["A"].float(), t["B"].float()
        if A.shape[-2] != module.rank:
            raise SALRError(f"{name}: adapter rank {A.shape[-2]} != residual + LoRA rank {module.rank}")
        scale = module.rank_scale.float()
        if not torch.all(scale == t["scaling"]):  # a plain PEFT adapter is one LoRA block of PEFT's own scale
            # PEFT's scaling into B, SALR's per-block scales out of it: exact for an exported pair (scaling 1)
            B = _unfold(B * t["scaling"] if t["scaling"] != 1.0 else B, scale)
        if isinstance(module, SALRExpertsProjection):
            module.bases = nn.ModuleList(DenseBase(w) for w in t["weight"])
        else:
            module.base = DenseBase(t["weight"])
        module.A_cat = nn.Parameter(A.to(dtype))
        module.B_cat = nn.Parameter(B.to(dtype))


def import_peft(
    path: str | os.PathLike, output: str | os.PathLike, base: str | None = None, base_format: str = "bitmap"
) -> dict[str, Any]:
    """`salr compress --from-peft`: a SALR checkpoint at `output` from an exported pair or a PEFT adapter directory;
    returns its report (also written to output/salr_report.json)."""
    from salr.checkpoint import save, size_report
    from salr.compress import REPORT_NAME
    from salr.merge import base_mask

    found = find_pair(path, base)
    if found is None:
        raise SALRError(f"{path} holds no PEFT adapter ({ADAPTER_CONFIG}) nor an exported pair")
    model, tokenizer, config = load_peft(path, base, base_format)
    rows = []
    for name, module in salr_modules(model):
        mask = base_mask(module)
        rows.append({"name": name, "shape": list(mask.shape), "sparsity": float((~mask).float().mean())})
    zeros = sum(r["sparsity"] * math.prod(r["shape"]) for r in rows)
    report = {
        "from_peft": str(found[0]),
        "model": found[1],
        "base_format": base_format,
        "config": config.to_dict(),
        "layers": rows,
        "totals": {
            "target_layers": len(rows),
            "sparsity": zeros / sum(math.prod(r["shape"]) for r in rows),
            "adapter_parameters": sum(m.A_cat.numel() + m.B_cat.numel() for _, m in salr_modules(model)),
        },
    }
    save(model, output, config, tokenizer=tokenizer, base_model=found[1])
    report["totals"].update(size_report(model, output))
    atomic_write_json(Path(output) / REPORT_NAME, report)
    return report

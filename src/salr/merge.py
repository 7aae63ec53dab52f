"""Fold SALR adapters into plain weights: the dense merge, the mask-preserving merge, and the checkpoint it makes.

Every module with fused adapters (`FusedAdapters`: SALR linear layers, MoE expert projections, and any method built
on them) is treated the same way. Its mask is `base.to_dense() != 0` (per expert for experts), and

  dense    W = merged_weight()                          = M ⊙ W0 + ΔW: exact, but the pruned positions fill in
  sparse   W = M ⊙ merged_weight()   (rule "mask", E2)  keeps the base's zeros exactly; drops (1 − M) ⊙ ΔW
           W = M' ⊙ merged_weight()  (rule "reprune", E3) M' re-chosen by magnitude on the merged weight, with the
                                                        same number of zeros in every row (N:M groups for N:M bases)

`merge_model` swaps the plain modules in (nn.Linear, the model's own experts class) and returns per-layer rows with
the sparsity measured on the merged weights. `merge_checkpoint` is `salr merge`: load, measure the reference model
on a few token windows, merge, measure again (the accuracy cost), save a plain transformers checkpoint and
`merge_report.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from salr.config import parse_nm
from salr.convert import salr_modules
from salr.errors import SALRError
from salr.experts import SALRExperts, SALRExpertsProjection
from salr.io import atomic_write_json, write_dir

logger = logging.getLogger(__name__)

MODES = ("dense", "sparse")
SPARSE_RULES = ("mask", "reprune")
REPORT_NAME = "merge_report.json"


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen base M ⊙ W0 of a SALR module, dense: [out, in], or [E, out, in] for expert projections."""
    if isinstance(module, SALRExpertsProjection):
        return torch.stack([base.to_dense() for base in module.bases])
    return module.base.to_dense()


def base_mask(module: nn.Module) -> torch.Tensor:
    """True where the base keeps a weight (the zeros of the base are the pruned positions)."""
    return base_weight(module) != 0


def reprune(merged: torch.Tensor, mask: torch.Tensor, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """E3: keep the largest |merged| entries, as many per row as `mask` keeps (or N of every M along the input)."""
    scores = merged.detach().abs().float()
    if nm is not None:
        n, m = nm
        grouped = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
        idx = grouped.topk(n, dim=-1).indices
        keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, idx, True).reshape(scores.shape)
        return torch.where(keep, merged, torch.zeros((), dtype=merged.dtype))
    counts = mask.sum(-1, keepdim=True)  # [..., out, 1]
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order))
    return torch.where(ranks < counts, merged, torch.zeros((), dtype=merged.dtype))


def merged_weight(module: nn.Module, mode: str = "dense", rule: str = "mask", nm: tuple[int, int] | None = None):
    """The weight a merge puts in place of `module` (see the module docstring), in the base dtype."""
    if mode not in MODES:
        raise SALRError(f"merge mode must be one of {', '.join(MODES)}, got {mode!r}")
    if rule not in SPARSE_RULES:
        raise SALRError(f"sparse merge rule must be one of {', '.join(SPARSE_RULES)}, got {rule!r}")
    merged = module.merged_weight()
    if mode == "dense":
        return merged
    mask = base_mask(module)
    if rule == "reprune":
        return reprune(merged, mask, nm)
    return torch.where(mask, merged, torch.zeros((), dtype=merged.dtype))  # +0.0 even where merged is -0.0 / NaN


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear


@torch.no_grad()
def unload(model: nn.Module, weight_fn: Callable[[str, nn.Module], torch.Tensor]) -> nn.Module:
    """Replace every SALR module with its plain counterpart holding `weight_fn(name, module)`, in place.

    Linear layers become nn.Linear (their bias kept); a SALR experts block becomes the model's own experts class with
    3-D `gate_up_proj` / `down_proj` from its two projections. The model is a plain transformers model afterwards.
    """
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in salr_modules(model):
        weight = weight_fn(name, module)
        if isinstance(module, SALRExpertsProjection):
            owner, _, param = name.rpartition(".")
            experts.setdefault(owner, {})[param] = weight
        elif hasattr(module, "base"):
            _set_submodule(model, name, _linear(weight, getattr(module, "bias", None)))
        else:
            raise SALRError(f"{name} ({type(module).__name__}) has no base weight: salr cannot unload it")
    for owner, weights in experts.items():
        block = model.get_submodule(owner)
        if not isinstance(block, SALRExperts):
            raise SALRError(f"{owner} is not a SALR experts block")
        _set_submodule(model, owner, block.to_original(weights))
    return model


def _row(name: str, module: nn.Module, merged: torch.Tensor) -> dict[str, Any]:
    mask = base_mask(module)
    zeros = merged == 0
    return {
        "name": name,
        "shape": list(merged.shape),
        "sparsity": float(zeros.float().mean()),
        "base_sparsity": float((~mask).float().mean()),
        "nonzero_at_pruned": int((~zeros & ~mask).sum()),
        "zeros": int(zeros.sum()),
        "numel": merged.numel(),
    }


def merge_model(
    model: nn.Module, mode: str = "dense", rule: str = "mask", nm: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Merge every SALR module of `model` in place (see the module docstring); returns rows and totals measured on
    the merged weights: sparsity (exact zeros / entries), the base's sparsity, entries nonzero where the base was
    pruned (0 for the sparse "mask" merge, always)."""
    if not salr_modules(model):
        raise SALRError("the model has no SALR layers to merge")
    rows: list[dict[str, Any]] = []

    def weight_fn(name: str, module: nn.Module) -> torch.Tensor:
        merged = merged_weight(module, mode, rule, nm)
        rows.append(_row(name, module, merged))
        return merged

    unload(model, weight_fn)
    zeros, numel = sum(r["zeros"] for r in rows), sum(r["numel"] for r in rows)
    base_zeros = sum(round(r["base_sparsity"] * r["numel"]) for r in rows)
    totals = {
        "target_layers": len(rows),
        "sparsity": zeros / numel,
        "base_sparsity": base_zeros / numel,
        "nonzero_at_pruned": sum(r["nonzero_at_pruned"] for r in rows),
        "weights": numel,
    }
    return {"mode": mode, "rule": rule if mode == "sparse" else None, "layers": rows, "totals": totals}


# ----------------------------------------------------------------------------- accuracy cost


@torch.no_grad()
def reference_logprobs(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Next-token log-probabilities [T, V] (fp32, CPU) of each token window [n, T], one window at a time."""
    device = next(model.parameters()).device
    return [F.log_softmax(model(w[None].to(device)).logits[0].float(), -1).cpu() for w in windows]


@torch.no_grad()
def compare(model: nn.Module, windows: torch.Tensor, reference: list[torch.Tensor]) -> dict[str, float]:
    """How far `model` is from the reference log-probs on `windows`: NLL (nats/token) and perplexity of both,
    mean KL(reference ‖ model) per token, top-1 agreement, max |log-prob difference|."""
    nll_ref = nll = kl = agree = 0.0
    max_diff, n = 0.0, 0
    for w, ref in zip(windows, reference, strict=True):
        logp = reference_logprobs(model, w[None])[0]
        target = w[1:]
        nll_ref -= float(ref[:-1].gather(1, target[:, None]).sum())
        nll -= float(logp[:-1].gather(1, target[:, None]).sum())
        kl += float((ref.exp() * (ref - logp)).sum())
        agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        max_diff = max(max_diff, float((ref - logp).abs().max()))
        n += len(target)
    positions = sum(len(w) for w in windows)
    return {
        "windows": len(windows),
        "tokens": n,
        "nll_unmerged": nll_ref / n,
        "nll_merged": nll / n,
        "perplexity_unmerged": math.exp(nll_ref / n),
        "perplexity_merged": math.exp(nll / n),
        "kl_per_token": kl / positions,
        "top1_agreement": agree / positions,
        "max_abs_logprob_diff": max_diff,
    }


# ----------------------------------------------------------------------------- salr merge


def save_plain(model: nn.Module, tokenizer: Any, out: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Save a plain transformers checkpoint (safetensors, the model's dtype) + tokenizer + `report` as
    merge_report.json, atomically.

    An existing `out` is replaced only when it is empty or an earlier merge (merge_report.json) holding nothing the
    new one does not replace: never a source model, a SALR checkpoint or a run, which also have a config.json."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / REPORT_NAME, report)

    return write_dir(out, fill, REPORT_NAME, "model directory")


def resolve_run(path: str | os.PathLike) -> Path:
    """A SALR checkpoint directory: `path` itself, or the latest complete checkpoint of an unfinished `salr train`
    run (RUN/checkpoints/latest.json)."""
    path = Path(path)
    if (path / "salr_config.json").is_file():
        return path
    pointer = path / "checkpoints" / "latest.json"
    if pointer.is_file():
        latest = pointer.parent / json.loads(pointer.read_text())["dir"]
        logger.info("%s has no final model yet: using its latest checkpoint %s", path, latest.name)
        return latest
    raise SALRError(f"{path} is neither a SALR checkpoint nor a salr train run (no salr_config.json)")


def eval_windows(model: nn.Module, tokenizer: Any, source: str, samples: int, length: int) -> torch.Tensor:
    """[samples, length] token windows for the accuracy check: sampled from the model ("self") or from a file."""
    from salr.calibration import calibration_ids

    return calibration_ids(model, tokenizer, source, samples, length, seed=1234)


def merge_checkpoint(
    run: str | os.PathLike,
    out: str | os.PathLike,
    mode: str = "dense",
    rule: str = "mask",
    windows: int = 4,
    window_length: int = 128,
    text: str = "self",
) -> dict[str, Any]:
    """`salr merge`: merge a SALR checkpoint or run into a plain transformers checkpoint at `out` with
    `out/merge_report.json` (rows, totals, and the accuracy cost on `windows` token windows; 0 skips it)."""
    from salr.checkpoint import load, read_salr_config

    started = time.perf_counter()
    source = resolve_run(run)
    model, tokenizer = load(source, huge_pages=False)  # rewritten, not decoded
    pattern = read_salr_config(source)["salr"].get("pattern", "unstructured")
    ids = reference = None
    if windows > 0:
        ids = eval_windows(model, tokenizer, text, windows, window_length)
        reference = reference_logprobs(model, ids)
    report = merge_model(model, mode, rule, parse_nm(pattern))
    report = {"source": str(source), "pattern": pattern, **report}
    report["accuracy"] = compare(model, ids, reference) if ids is not None else None
    if report["accuracy"] is not None:
        report["accuracy"]["text"] = text
    report["seconds"] = time.perf_counter() - started
    save_plain(model, tokenizer, out, report)
    return report


def format_report(report: dict[str, Any], max_rows: int | None = None) -> str:
    """Per-layer measured sparsity, totals and the accuracy cost, for the terminal."""
    lines = [f"{'layer':<52} {'shape':>14} {'sparsity':>8} {'base':>8} {'nonzero@pruned':>14}"]
    rows = report["layers"] if max_rows is None else report["layers"][:max_rows]
    for r in rows:
        lines.append(
            f"{r['name'][-52:]:<52} {'x'.join(map(str, r['shape'])):>14} {r['sparsity']:>8.4f} "
            f"{r['base_sparsity']:>8.4f} {r['nonzero_at_pruned']:>14}"
        )
    if max_rows is not None and len(report["layers"]) > max_rows:
        lines.append(f"... {len(report['layers']) - max_rows} more layers in {REPORT_NAME}")
    t = report["totals"]
    how = report["mode"] + (f" ({report['rule']})" if report.get("rule") else "")
    lines.append(
        f"merge {how}: {t['target_layers']} layers, measured sparsity {t['sparsity']:.4f} (base "
        f"{t['base_sparsity']:.4f}), {t['nonzero_at_pruned']:,} nonzero weights at pruned positions"
    )
    a = report.get("accuracy")
    if a:
        lines.append(
            f"accuracy cost on {a['windows']} windows ({a['tokens']} tokens): perplexity "
            f"{a['perplexity_unmerged']:.4f} -> {a['perplexity_merged']:.4f}, KL {a['kl_per_token']:.3g} nats/token, "
            "top-1 agreement "
            f"{a['top1_agreement']:.4f}, max |Δ log p| {a['max_abs_logprob_diff']:.3g}"
        )
    return "\n".join(lines)

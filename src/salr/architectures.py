"""What `target_modules="all-linear"` cannot convert: modules that hold a linear map in a form salr does not know.

Converting every nn.Linear and fused experts block while leaving such a module dense would give a model that is only
half converted (dense weights where SALR layers were meant to be), so it is refused instead, naming the module.
Convolutions (vision towers), embeddings, norms and routers keep their weights by design and are not flagged.
"""

from __future__ import annotations

from torch import nn

from salr.experts import SALRExperts, is_fused_experts
from salr.layer import FusedAdapters


def unsupported_modules(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, why) for every module holding weights in a layout salr cannot convert."""
    found = []
    for name, module in model.named_modules():
        if is_fused_experts(module) or isinstance(module, SALRExperts | FusedAdapters | nn.modules.conv._ConvNd):
            continue
        params = {n: p for n, p in module.named_parameters(recurse=False) if p.is_floating_point()}
        if type(module).__name__ == "Conv1D" and any(p.dim() == 2 for p in params.values()):
            found.append((name, "a transformers Conv1D (a linear layer stored transposed)"))
        elif any(p.dim() >= 3 for p in params.values()):
            shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in params.items() if p.dim() >= 3)
            why = f"a {type(module).__name__} with 3-D parameters ({shapes}) in a layout salr does not know"
            found.append((name, why))
    return found

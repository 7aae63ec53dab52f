"""salr: Sparsity-Aware Low-Rank Representation (SALR, arXiv 2601.16991) for Hugging Face causal LMs.

model, tok = salr.load_model("default")
report = salr.convert(model, salr.SALRConfig(sparsity=0.5, residual_rank=64, r=16))
salr.save(model, "out/", config, tokenizer=tok)
model, tok = salr.load("out/")
"""

from salr.checkpoint import load, save
from salr.config import SALRConfig
from salr.errors import SALRError
from salr.layer import DenseBase, SALRLinear
from salr.model import convert, find_targets, mark_trainable, merge_and_unload, use_semi_structured
from salr.models import load_model

__all__ = [
    "DenseBase",
    "SALRConfig",
    "SALRError",
    "SALRLinear",
    "convert",
    "find_targets",
    "load",
    "load_model",
    "mark_trainable",
    "merge_and_unload",
    "save",
    "use_semi_structured",
]
__version__ = "0.1.0"

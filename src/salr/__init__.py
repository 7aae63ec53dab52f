"""salr: Sparsity-Aware Low-Rank Representation (SALR, arXiv 2601.16991) for Hugging Face causal LMs.

model, tok = salr.load_model("default")
report = salr.convert(model, salr.SALRConfig(sparsity=0.5, residual_rank=64, r=16))
salr.save(model, "out/", config, tokenizer=tok)
model, tok = salr.load("out/")

The pipeline, one module each: loaders (load) -> convert (targets) -> pruning (masks) -> residual (SVD) ->
layer (SALRLinear) -> train (fine-tuning) -> checkpoint (save / load) -> bases + ops (frozen formats, kernels).
Models loaded here decode one token at a time on the CPU through salr.attention; `salr.use_decode_attention(model)`
does the same for a model loaded with transformers directly.
"""

from salr.attention import use_decode_attention
from salr.bases import BitmapBase, DenseBase
from salr.checkpoint import load, save
from salr.config import SALRConfig
from salr.convert import convert, find_targets, mark_trainable, merge_and_unload, pack_bases, use_semi_structured
from salr.errors import SALRError
from salr.layer import SALRLinear
from salr.loaders import load_model

__all__ = [
    "BitmapBase",
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
    "pack_bases",
    "save",
    "use_decode_attention",
    "use_semi_structured",
]
__version__ = "0.1.0"

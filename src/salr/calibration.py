"""Calibration: the activations an activation-aware mask or residual is fitted to.

Two steps, both with bounded memory:
1. `calibration_ids` picks the token windows [n, T]: sampled from the dense model itself ("self", no data file
   needed) or cut from a file (plain text, or GSM8K / Alpaca JSON(L) records as running text).
2. `BlockwiseCalibration` runs them through the decoder one block at a time. For each block it collects, with
   forward hooks, the Gram matrix H = Σ x xᵀ (summed in fp32, held in fp64, [in, in]) of the input of every target
   linear of that block, and for fused MoE experts one Gram per expert from the tokens routed to it. Only the
   current block's Grams and the hidden states entering it are held; after the block is compressed its
   (compressed, `sequential=True`) or dense outputs become the next block's inputs.
Everything a layer needs from the data is in its Gram: ‖D X‖²_F = tr(D H Dᵀ) for any D [out, in].
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from salr import data
from salr.config import TRAINING_DATA
from salr.errors import SALRError
from salr.experts import EXPERT_PARAMS, is_fused_experts

logger = logging.getLogger(__name__)

SELF = "self"
RECORD_SUFFIXES = (".json", ".jsonl")  # GSM8K / Alpaca records; any other file is plain text, as for wikitext2


# ----------------------------------------------------------------------------- token windows


class NucleusFilter(LogitsProcessor):
    """Top-p filtering with transformers' `TopPLogitsWarper` semantics, without sorting the whole vocabulary.

    A token is kept when the probability of the tokens ranked above it is below `top_p` (the most likely one always
    is). The warper sorts all V logits per step, a large share of the sampling time of a small model with a large
    vocabulary (64 × 49,152 on the default model: ~0.4 s a token on one core). Most rows' nucleus lies in their
    first few hundred tokens, so a partial `topk` per row, widened only for the rows it does not cover, keeps the
    same tokens at a fraction of the cost (`experiments/sampler_check.py` compares the two on real windows).
    """

    def __init__(self, top_p: float, first_k: int = 256) -> None:
        if not 0.0 < top_p <= 1.0:
            raise SALRError(f"top_p must be in (0, 1], got {top_p}")
        self.top_p = top_p
        self.first_k = first_k

    def nucleus(self, scores: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(rows, probabilities [rows, k] descending, their token ids, kept [rows, k]) for groups of rows whose
        nucleus fits in their top k; rows that need more go round again with 4k (a flat row: the whole V)."""
        probs = scores.float().softmax(dim=-1)
        vocab = probs.shape[-1]
        rows, k = torch.arange(probs.shape[0], device=probs.device), min(self.first_k, vocab)
        while rows.numel():
            top, index = probs[rows].topk(k, dim=-1)
            done = (top.sum(dim=-1) >= self.top_p) | (k == vocab)
            above = top.cumsum(dim=-1) - top  # mass of the tokens ranked above each one
            yield rows[done], top[done], index[done], above[done] < self.top_p
            rows, k = rows[~done], min(4 * k, vocab)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.top_p >= 1.0:
            return scores  # the whole distribution (a float32 cumsum could reach 1 early and cut the tail)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        for rows, _, index, kept in self.nucleus(scores):
            keep[rows.unsqueeze(1), index] = kept
        return scores.masked_fill(~keep, -math.inf)


class NucleusSampler(NucleusFilter):
    """Draws the next token from the top-p nucleus itself and returns scores that are finite only there, so greedy
    decoding (`do_sample=False`) emits the draw. The same distribution as multinomial sampling of `NucleusFilter`'s
    output, drawn among each row's top k instead of all V tokens (torch.multinomial over 64 × 49,152
    probabilities costs ~70 ms a step on the default model, over the nucleus well under 1 ms). Uses the global RNG.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.top_p >= 1.0:
            chosen = torch.multinomial(scores.float().softmax(dim=-1), 1).squeeze(1)
        else:
            chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
            for rows, top, index, kept in self.nucleus(scores):
                draw = torch.multinomial(top * kept, 1)  # renormalised over the nucleus by multinomial
                chosen[rows] = index.gather(1, draw).squeeze(1)
        return torch.full_like(scores, -math.inf).scatter_(1, chosen.unsqueeze(1), 0.0)


@torch.no_grad()
def self_generated_ids(
    model: nn.Module, samples: int, length: int, seed: int = 0, batch_size: int = 64
) -> torch.Tensor:
    """[samples, length] token ids sampled from `model` itself (temperature 1, top-p 0.95) from its BOS token.

    Needs no data file and no tokenizer: text the model finds likely covers its own domain evenly, so the
    compressed model keeps general ability rather than fitting one dataset. EOS is suppressed until the window is
    full. Sampling is seeded and leaves the global RNG as it was.
    """
    config = model.config
    start = next((t for t in (config.bos_token_id, config.eos_token_id, 0) if isinstance(t, int)), 0)
    device = next(model.parameters()).device
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    rows = []
    was_training = model.training
    model.eval()
    try:
        for begin in tqdm(range(0, samples, batch_size), desc="self-calibration", leave=False, disable=None):
            n = min(batch_size, samples - begin)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(  # NucleusSampler draws; greedy decoding then takes its draw
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False,  # greedy: no warpers of its own
                logits_processor=LogitsProcessorList([NucleusSampler(0.95)]),
                max_new_tokens=length - 1, min_new_tokens=length - 1,
                pad_token_id=config.eos_token_id if config.eos_token_id is not None else start,
            )  # fmt: skip
            rows.append(out[:, :length].cpu())
    finally:
        torch.random.set_rng_state(state)
        model.train(was_training)
    return torch.cat(rows)


def records_text(records: Sequence[dict[str, str]]) -> str:
    """GSM8K / Alpaca records as the text calibration reads: "prompt\\nresponse" paragraphs."""
    return "\n\n".join("\n".join(data.record_prompt_response(r)) for r in records)


def _file_text(path: Path) -> str:
    if path.suffix.lower() in RECORD_SUFFIXES:
        return records_text(data.load_sft_records(path))
    return data.load_text(path)


def file_ids(tokenizer: Any, path: str | Path, samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """[samples, length] windows of a file's tokens at random offsets (seeded), each starting with BOS.

    A .json / .jsonl file holds GSM8K / Alpaca records, which become "prompt\\nresponse" paragraphs; any other file
    (wiki.test.raw, WikiText-103's wiki.test.tokens, a name without a suffix) is read as plain text."""
    return text_ids(tokenizer, _file_text(Path(path)), samples, length, seed, what=str(path))


def text_ids(tokenizer: Any, text: str, samples: int, length: int, seed: int = 0, what: str = "text") -> torch.Tensor:
    """[samples, length] windows of `text`'s tokens at random offsets (seeded), each starting with BOS."""
    if tokenizer is None:
        raise SALRError("calibration from a file needs the model's tokenizer: pass tokenizer=")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    width = length - 1
    if len(ids) < width:
        raise SALRError(f"{what}: {len(ids)} tokens, fewer than one calibration window of {length}: use more text")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    offsets = [rng.randrange(0, len(ids) - width + 1) for _ in range(samples)]
    rows = [([start] if start is not None else []) + ids[o : o + width + (start is None)] for o in offsets]
    return torch.tensor(rows, dtype=torch.long)


def within_context(model: nn.Module, length: int, what: str) -> int:
    """`length` cut to the model's context (max_position_embeddings), logged: sampling or reading windows past it
    never ends well."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        logger.info("%s of %d tokens cut to the model's context of %d", what, length, limit)
        return limit
    return length


def calibration_ids(
    model: nn.Module,
    tokenizer: Any,
    source: str,
    samples: int,
    length: int,
    seed: int = 0,
    records: Sequence[dict[str, str]] | None = None,
) -> torch.Tensor:
    """[samples, length] calibration token ids: `source` is "self" (sampled from the model), a file path, or
    "data" (TRAINING_DATA): windows of the training `records` salr train passes."""
    if samples < 1 or length < 2:
        raise SALRError(f"calibration needs samples >= 1 and length >= 2, got {samples} x {length}")
    length = within_context(model, length, "calibration windows")
    if source == SELF:
        return self_generated_ids(model, samples, length, seed)
    if source == TRAINING_DATA:
        if records is None:
            raise SALRError(
                "calibration 'data' means salr train's training records, which only salr train has: pass 'self' or "
                "a text / GSM8K / Alpaca file"
            )
        return text_ids(tokenizer, records_text(records), samples, length, seed, what="the training data")
    if not Path(source).is_file():
        raise SALRError(f"calibration {source!r}: no such file; pass 'self' or a text / GSM8K / Alpaca file")
    return file_ids(tokenizer, source, samples, length, seed)


# ----------------------------------------------------------------------------- block by block


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder block returns (some transformers versions wrap them in a tuple)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _StopForward(Exception):
    """Raised by the hook on the first block once its inputs are caught: nothing after it needs to run."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, blocks) of the decoder's list of transformer blocks (`model.model.layers` for Llama-like models)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, module in candidates:
        if decoder is not None and getattr(decoder, "layers", None) is module:
            return name, module
    if not candidates:
        raise SALRError("calibration needs a decoder with a list of transformer blocks; none found in this model")
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))


@dataclass(eq=False)
class LayerStats:
    """What calibration knows about one target weight's input: H = Σ x xᵀ (fp64 [in, in]) over `tokens` tokens.

    Layers fed the same tensor (q/k/v, gate/up) share one LayerStats, so its factorizations (`factor`) are
    computed once for all of them and for every alternating round."""

    gram: torch.Tensor
    tokens: int
    _factors: dict[tuple[str, float], torch.Tensor] = field(default_factory=dict, repr=False)

    def factor(self, kind: str, damping: float) -> torch.Tensor:
        """Cached factorization of the damped Gram: "cholesky" (lower C, C Cᵀ = H) or "inverse_upper" (upper U,
        Uᵀ U = H⁻¹, SparseGPT's form), fp64 [in, in]."""
        key = (kind, damping)
        if key not in self._factors:
            from salr.pruning import damped_cholesky, damped_inverse_upper

            factorize = damped_cholesky if kind == "cholesky" else damped_inverse_upper
            self._factors[key] = factorize(self.gram, damping)
        return self._factors[key]


@dataclass
class BlockwiseCalibration:
    """Calibration token windows run through the decoder block by block (see the module docstring)."""

    model: nn.Module
    ids: torch.Tensor
    batch_size: int = 8  # windows per pass: 4 to 64 windows of 128 ran within the noise of each other
    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    @torch.no_grad()
    def capture_inputs(self) -> None:
        """Run the model up to its first block and keep what that block receives, per mini-batch."""
        _, blocks = decoder_blocks(self.model)

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            self.hidden.append((args[0] if args else kwargs.pop("hidden_states")).detach())
            self.kwargs.append(kwargs)
            raise _StopForward

        device = next(self.model.parameters()).device
        handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for begin in range(0, self.ids.shape[0], self.batch_size):
                try:
                    self.model(self.ids[begin : begin + self.batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()

    @torch.no_grad()
    def run_block(self, block: nn.Module, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The block's outputs for every mini-batch of `inputs` (default: the current ones, `hidden`)."""
        outputs = []
        for hidden, kwargs in zip(self.hidden if inputs is None else inputs, self.kwargs, strict=True):
            outputs.append(block_output(block, hidden, kwargs))
        return outputs

    @torch.no_grad()
    def statistics(
        self, block: nn.Module, names: list[str], outputs: bool = True
    ) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
        """Input Grams of the targets `names` (paths relative to `block`; `experts.gate_up_proj[e]`-style keys for
        fused experts: one per expert), from one pass of the block over the calibration inputs, and the block's
        outputs of that pass (the next block's inputs when calibrating on the dense model). With outputs=False
        (sequential calibration runs the compressed block for them) each pass stops as soon as every target has
        seen its input, so the block's last linear (down_proj) and what follows it never run; the list is empty."""
        grams: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        alias: dict[str, str] = {}  # layer -> the first layer that received the very same input tensor
        seen: list[tuple[torch.Tensor, str]] = []  # this mini-batch's inputs, kept alive so identity is meaningful

        def add(key: str, x: torch.Tensor) -> None:
            for tensor, first in seen:
                if tensor is x:
                    alias[key] = first
                    return
            seen.append((x, key))
            x = x.reshape(-1, x.shape[-1]).float()
            if key in grams:  # fp32 sums of fp32 products (their rounding is far below the damping), fp64 at the end
                grams[key].addmm_(x.T, x)
            else:
                grams[key] = x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        handles, modules = [], []
        for name in names:
            owner_name, _, param = name.rpartition(".")
            owner = block.get_submodule(owner_name) if owner_name else block
            if param in EXPERT_PARAMS and is_fused_experts(owner):
                if param == "gate_up_proj":  # one hook per experts block serves both projections
                    handles.append(owner.register_forward_pre_hook(_expert_hook(owner, owner_name, add)))
            else:
                modules.append(name)
        stop_early = not outputs and len(modules) == len(names)  # experts: tokens are routed, no fixed last one
        fired: set[str] = set()

        def module_hook(key: str) -> Any:
            def hook(_module: nn.Module, args: tuple) -> None:
                add(key, args[0])
                fired.add(key)
                if stop_early and len(fired) == len(modules):
                    raise _StopForward

            return hook

        for name in modules:
            handles.append(block.get_submodule(name).register_forward_pre_hook(module_hook(name)))
        results = []
        try:
            for hidden, kwargs in zip(self.hidden, self.kwargs, strict=True):
                seen.clear()
                fired.clear()
                try:
                    out = block_output(block, hidden, kwargs)
                except _StopForward:
                    continue
                if outputs:
                    results.append(out)
        finally:
            seen.clear()
            for handle in handles:
                handle.remove()
        stats = {key: LayerStats(gram.double(), counts[key]) for key, gram in grams.items()}
        stats.update({key: stats[first] for key, first in alias.items()})
        return stats, results


def _expert_hook(experts: nn.Module, prefix: str, add: Any) -> Any:
    """Forward pre-hook on a fused experts block: per expert, the Gram of its gate_up input (the tokens routed to
    it) and of its down_proj input act(gate) * up, computed with the block's current weights."""
    base = f"{prefix}." if prefix else ""

    def hook(_module: nn.Module, args: tuple) -> None:
        hidden, top_k_index = args[0], args[1]
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < experts.gate_up_proj.shape[0]:
                continue
            tokens = (top_k_index == expert).any(-1).nonzero().squeeze(-1)
            x = hidden[tokens]
            add(f"{base}gate_up_proj[{expert}]", x)
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
            add(f"{base}down_proj[{expert}]", experts.act_fn(gate) * up)

    return hook


def iterate_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(full name, block) of each transformer block, in order."""
    name, blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        yield f"{name}.{i}", block


def relative_output_error(w0: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W0 − Ŵ) X‖_F / ‖W0 X‖_F from the Gram H = X Xᵀ: W0, Ŵ [out, in]."""
    no_factor = w0.new_zeros(w0.shape[0], 0), w0.new_zeros(0, w0.shape[1])
    return output_errors(w0, w_hat, *no_factor, gram)[0]


def output_errors(
    w0: torch.Tensor, base: torch.Tensor, B: torch.Tensor, A: torch.Tensor, gram: torch.Tensor
) -> tuple[float, float]:
    """`relative_output_error` of Ŵ = base and of Ŵ = base + B A at once, with two [out, in] x [in, in] products
    instead of four: with E = W0 − base, ‖(E − B A) X‖² = tr(E H Eᵀ) − 2 tr(Bᵀ E H Aᵀ) + tr(Bᵀ B A H Aᵀ).
    In fp32 (a report figure: ~1e-6 relative, at a third of fp64's time), summed in fp64."""
    g, w0f, b, a = gram.float(), w0.float(), B.float(), A.float()
    e = w0f - base.float()
    den = float(((w0f @ g) * w0f).sum(dtype=torch.float64))
    eh = e @ g
    before = float((eh * e).sum(dtype=torch.float64))
    after = before - 2 * float(((eh @ a.T) * b).sum(dtype=torch.float64))
    after += float(((b @ (a @ g @ a.T)) * b).sum(dtype=torch.float64))
    if den <= 0:
        return 0.0, 0.0
    return math.sqrt(max(before, 0.0) / den), math.sqrt(max(after, 0.0) / den)

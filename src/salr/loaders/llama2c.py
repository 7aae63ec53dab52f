"""llama2.c checkpoints (`model.bin` + `tokenizer.bin`) -> transformers LlamaForCausalLM + fast tokenizer.

File layout (karpathy/llama2.c `export.py` legacy format): header of 7 int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len; a negative vocab_size means an unshared classifier), then fp32 weights in the
order read below. llama2.c rotates interleaved pairs (0,1),(2,3)…; HF Llama rotates halves, so wq/wk rows are
permuted per head.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from salr.errors import SALRError

HEADER = struct.Struct("7i")


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # [n_heads * head_dim, dim] interleaved-pair order -> HF half-split order, per head.
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_llama2c_model(path: str | Path) -> LlamaForCausalLM:
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < HEADER.size:
        raise SALRError(f"{path}: too short to be a llama2.c checkpoint ({len(raw)} bytes)")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack_from(raw)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv_heads:
        raise SALRError(f"{path}: header {HEADER.unpack_from(raw)} is not a valid llama2.c model header")
    head_dim = dim // n_heads
    if head_dim % 2:
        raise SALRError(f"{path}: head size {dim} / {n_heads} heads = {head_dim} is odd: RoPE needs an even head size")
    kv_dim = n_kv_heads * head_dim
    shapes = [
        ("embed", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis", (seq_len, head_dim)),  # real + imag halves, unused (HF recomputes RoPE)
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    needed = HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) < needed:
        raise SALRError(
            f"{path}: truncated or corrupt llama2.c checkpoint: header promises {needed} bytes, file has {len(raw)}"
        )
    flat = torch.from_numpy(np.frombuffer(raw, dtype=np.float32, offset=HEADER.size).copy())
    tensors, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        tensors[name] = flat[offset : offset + n].view(shape)
        offset += n

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=shared,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    sd = {"model.embed_tokens.weight": tensors["embed"], "model.norm.weight": tensors["rms_final"]}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = tensors["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = tensors["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = _permute_rope(tensors["wq"][i], n_heads)
        sd[p + "self_attn.k_proj.weight"] = _permute_rope(tensors["wk"][i], n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = tensors["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = tensors["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = tensors["w1"][i]
        sd[p + "mlp.down_proj.weight"] = tensors["w2"][i]
        sd[p + "mlp.up_proj.weight"] = tensors["w3"][i]
    sd["lm_head.weight"] = tensors["embed"] if shared else tensors["wcls"]
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_llama2c_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """llama2.c `tokenizer.bin` (a SentencePiece BPE vocab with scores) -> an equivalent HF fast tokenizer.

    Merges are recovered as SentencePiece does for BPE: every split of a piece into two known pieces is a merge,
    ranked by the score of the merged piece.
    """
    path = Path(path)
    raw = path.read_bytes()
    pieces: list[str] = []
    scores: list[float] = []
    if len(raw) < 4:
        raise SALRError(f"{path}: not a valid llama2.c tokenizer file ({len(raw)} bytes)")
    (max_token_length,) = struct.unpack_from("i", raw, 0)
    offset = 4
    while offset < len(raw):
        # Every length is checked against the header and the bytes left before anything is read or allocated.
        if offset + 8 > len(raw):
            raise SALRError(f"{path}: not a valid llama2.c tokenizer file (truncated entry at byte {offset})")
        score, length = struct.unpack_from("fi", raw, offset)
        offset += 8
        if not 0 <= length <= max(max_token_length, 0) or offset + length > len(raw) or not math.isfinite(score):
            raise SALRError(
                f"{path}: not a valid llama2.c tokenizer file (token {len(pieces)}: length {length}, score {score}, "
                f"max token length {max_token_length}, {len(raw) - offset} bytes left)"
            )
        try:
            pieces.append(raw[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError as err:
            raise SALRError(f"{path}: not a valid llama2.c tokenizer file (token {len(pieces)} is not UTF-8)") from err
        scores.append(score)
        offset += length
    if len(pieces) < 259:
        raise SALRError(f"{path}: not a valid llama2.c tokenizer file ({len(pieces)} tokens)")
    # export.py wrote '▁' as ' ' and <s>/</s> with newlines around them; undo both.
    pieces = [p.strip("\n") if i in (1, 2) else p.replace(" ", "▁") for i, p in enumerate(pieces)]
    pieces[0] = "<unk>"
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece in sorted(pieces[259:], key=lambda p: -scores[vocab[p]]):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )

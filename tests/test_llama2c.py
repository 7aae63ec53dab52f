import struct

import pytest
import torch

from salr.errors import SALRError
from salr.evaluate import continue_text
from salr.loaders import load_model
from salr.loaders.llama2c import load_llama2c_model, load_llama2c_tokenizer


def test_stories260k_generates_fluent_tinystories_text(stories):
    model, tokenizer = stories
    (text,) = continue_text(model, tokenizer, ["Once upon a time"], max_new_tokens=40)
    # Greedy decoding of the real checkpoint: a coherent TinyStories sentence (pinned, so a broken RoPE permutation
    # or tokenizer shows up as a different continuation).
    assert text.startswith(", there was a little girl named Lily. She loved to play outside in the park.")


def test_tokenizer_round_trips_text_and_adds_bos(stories_path):
    tok = load_llama2c_tokenizer(stories_path.parent / "tok512.bin")
    ids = tok("Once upon a time, Tom's cat sat.").input_ids
    assert ids[0] == tok.bos_token_id == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Once upon a time, Tom's cat sat."
    assert len(tok) == 512


def test_model_perplexity_on_its_own_text_is_low(stories):
    model, tokenizer = stories
    ids = tokenizer(
        "Once upon a time, there was a little girl named Lily. She loved to play outside.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert float(loss.exp()) < 10


def test_truncated_checkpoint_is_a_clear_error(stories_path, tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(stories_path.read_bytes()[:5000])
    with pytest.raises(SALRError, match="truncated or corrupt"):
        load_llama2c_model(bad)
    bad.write_bytes(struct.pack("7i", 64, -1, 5, 8, 4, 512, 512))
    with pytest.raises(SALRError, match="not a valid llama2.c model header"):
        load_llama2c_model(bad)


def test_missing_tokenizer_is_a_clear_error(stories_path, tmp_path):
    lonely = tmp_path / "model.bin"
    lonely.write_bytes(stories_path.read_bytes())
    with pytest.raises(SALRError, match="no tokenizer found beside"):
        load_model(str(lonely))


def test_unknown_model_spec_is_a_clear_error(tmp_path):
    with pytest.raises(SALRError, match="not found"):
        load_model(str(tmp_path / "nothing-here.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SALRError, match="neither a Hugging Face model directory"):
        load_model(str(tmp_path / "empty"))


def test_corrupt_hf_directory_is_a_clear_error(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SALRError, match="not a safetensors file|cannot be loaded|too short to be a safetensors file"):
        load_model(str(tmp_path / "hf"))

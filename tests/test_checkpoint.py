import copy
from pathlib import Path

import pytest
import torch

import salr
from salr.checkpoint import read_salr_config
from salr.errors import SALRError
from salr.layer import SALRLinear


@pytest.fixture
def saved(stories, tmp_path):
    model, tokenizer = stories
    config = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=8, r=4)
    salr.convert(model, config, progress=False)
    with torch.no_grad():  # make LoRA non-zero so the round trip checks it too
        for name, p in model.named_parameters():
            if name.endswith("B_cat"):
                p.add_(0.01)
    out = tmp_path / "ckpt"
    salr.save(model, out, config, tokenizer=tokenizer, base_model="stories260K")
    return model, tokenizer, out


def test_round_trip_gives_identical_logits_and_structure(saved):
    model, tokenizer, out = saved
    loaded, loaded_tok = salr.load(out)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied weights stay tied
    assert loaded_tok("Once upon a time").input_ids == tokenizer("Once upon a time").input_ids
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("A_cat", "B_cat")) for n in trainable)


def test_salr_checkpoint_loads_through_load_model(saved):
    model, tokenizer, out = saved
    loaded, _ = salr.load_model(str(out))
    ids = tokenizer("The dog", return_tensors="pt").input_ids
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_checkpoint_cast_on_load_runs_prefill_and_training(saved, dtype):
    # `salr eval --dtype bfloat16` on a checkpoint with fp32 adapters: the adapters are cast, and so must be the
    # per-rank scales they are multiplied by (a buffer derived from them, never saved), or the adapter path (prefill,
    # training) mixes dtypes. Ten tokens: more than the fused decode path takes.
    model, tokenizer, out = saved
    loaded, _ = salr.load_model(str(out), dtype=dtype)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.A_cat.dtype == getattr(torch, dtype)
    ids = tokenizer("Once upon a time there was a little dog named", return_tensors="pt").input_ids[:, :10]
    assert ids.shape[1] == 10
    expected = model(ids).logits
    got = loaded(ids).logits.float()
    assert torch.allclose(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    loaded.train()
    loaded(ids, labels=ids).loss.backward()
    assert layer.B_cat.grad is not None and torch.isfinite(layer.B_cat.grad).all()


def test_corrupt_weights_are_detected(saved):
    _, _, out = saved
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SALRError, match="corrupt"):
        salr.load(out)


def test_truncated_weights_are_detected_even_without_checksums(saved):
    _, _, out = saved
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SALRError, match="sha256 mismatch"):
        salr.load(out)
    with pytest.raises(SALRError, match="cannot be read|invalid safetensors header"):
        salr.load(out, verify_checksums=False)


def test_missing_file_and_bad_config_are_clear_errors(saved, tmp_path):
    _, _, out = saved
    (out / "tokenizer.json").unlink()
    with pytest.raises(SALRError, match="missing"):
        salr.load(out)
    (out / "salr_config.json").write_text("{not json")
    with pytest.raises(SALRError, match="corrupt"):
        salr.load(out)
    with pytest.raises(SALRError, match="not a SALR checkpoint"):
        salr.load(tmp_path)


def test_save_replaces_existing_checkpoint_and_leaves_no_temp_dirs(saved):
    model, tokenizer, out = saved
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.B_cat.add_(1.0)
    salr.save(
        model, out, salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=8, r=4), tokenizer=tokenizer
    )
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]
    loaded, _ = salr.load(out)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.B_cat, model.model.layers[0].self_attn.q_proj.B_cat)


def test_save_refuses_to_overwrite_a_foreign_directory(stories, tmp_path):
    model, tokenizer = stories
    config = salr.SALRConfig.from_preset("paper", residual_rank=2, r=2)
    salr.convert(model, config, progress=False)
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(SALRError, match="refusing to overwrite"):
        salr.save(model, target, config)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_save_replaces_a_checkpoint_but_not_a_run_or_files_beside_a_checkpoint(stories, tmp_path):
    model, tokenizer = stories
    config = salr.SALRConfig.from_preset("paper", residual_rank=2, r=2)
    salr.convert(model, config, progress=False)
    target = tmp_path / "ckpt"
    salr.save(model, target, config)
    salr.save(model, target, config)  # an earlier checkpoint holding only its own files: replaced
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(SALRError, match="holds notes.txt, which salr did not write there"):
        salr.save(model, target, config)
    assert (target / "notes.txt").read_text() == "keep me"
    (target / "notes.txt").unlink()
    (target / "checkpoints").mkdir()  # a finished training run: the final model plus its history
    (target / "run.json").write_text("{}")
    with pytest.raises(SALRError, match="holds checkpoints, run.json, which salr did not write there"):
        salr.save(model, target, config)
    assert (target / "run.json").is_file() and (target / "checkpoints").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_mixtral_round_trip(tiny_mixtral, tmp_path):
    config = salr.SALRConfig.from_preset("paper", residual_rank=4, r=2)
    salr.convert(tiny_mixtral, config, progress=False)
    salr.save(tiny_mixtral, tmp_path / "moe", config)
    loaded, tok = salr.load(tmp_path / "moe")
    ids = torch.randint(0, 128, (2, 9))
    assert tok is None
    assert torch.equal(loaded(ids).logits, tiny_mixtral(ids).logits)


def test_bitmap_base_checkpoint_round_trip_and_size(stories_path, tmp_path):
    from salr.bases import BitmapBase
    from salr.checkpoint import size_report
    from salr.convert import pack_bases

    model, tokenizer = salr.load_model(str(stories_path), dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    config = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=2, adapter_dtype="bfloat16")
    salr.convert(model, config, progress=False)
    assert pack_bases(model) == 35
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    expected = model(ids).logits
    salr.save(model, tmp_path / "bm", config, tokenizer=tokenizer)
    loaded, _ = salr.load(tmp_path / "bm")
    assert isinstance(loaded.model.layers[0].mlp.up_proj.base, BitmapBase)
    assert torch.equal(loaded(ids).logits, expected)
    sizes = size_report(loaded, tmp_path / "bm")
    # Above the ideal only by the int64 row offsets (8 bytes per 64-wide row here: ~11 %) and the header.
    assert sizes["ideal_bytes"] < sizes["checkpoint_bytes"] < 1.15 * sizes["ideal_bytes"]
    assert sizes["checkpoint_bytes"] < sizes["dense_bytes"]


def test_a_converted_tied_lm_head_is_untied_and_its_checkpoint_loads(tiny_llama, tmp_path):
    """lm_head named explicitly on a model with tied embeddings: the embeddings stay dense, the saved config no longer
    ties them, and the checkpoint loads to the same logits (it was written unloadable before)."""
    tied = copy.deepcopy(tiny_llama.config)
    tied.tie_word_embeddings = True
    torch.manual_seed(0)
    model = type(tiny_llama)(tied).eval()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    config = salr.SALRConfig.from_preset("paper", residual_rank=4, r=2, target_modules=["lm_head", "q_proj"])
    salr.convert(model, config, progress=False)
    assert isinstance(model.lm_head, SALRLinear) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    salr.save(model, tmp_path / "c", config)
    loaded, _ = salr.load(tmp_path / "c")
    assert isinstance(loaded.lm_head, SALRLinear) and torch.equal(loaded.model.embed_tokens.weight, embeddings)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_local_base_model_is_recorded_as_an_absolute_path(stories, tmp_path, monkeypatch):
    """`salr compress --model ./dense` recorded "dense", so a run started from another directory distilled from
    whatever ./dense was there (or from nothing); hub ids and names that are not local paths stay as given."""
    model, tokenizer = stories
    config = salr.SALRConfig.from_preset("paper", residual_rank=2, r=2)
    salr.convert(model, config, progress=False)
    (tmp_path / "dense").mkdir()
    monkeypatch.chdir(tmp_path)
    for spec, recorded in (("dense", str(Path.cwd() / "dense")), ("org/model-1b", "org/model-1b")):
        salr.save(model, tmp_path / "c", config, base_model=spec)
        assert read_salr_config(tmp_path / "c")["base_model"] == recorded

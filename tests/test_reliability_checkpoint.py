"""Checkpoint integrity (issue 12): a damaged or edited checkpoint is a one-line SALRError, never a different model;
saves are atomic, durable, clean up after killed saves and honour the umask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import salr
from salr.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from salr.cli import main
from salr.errors import SALRError
from salr.loaders import load_model

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def compressed(stories_path, tmp_path_factory) -> Path:
    """A SALR checkpoint of stories260K with nonzero LoRA blocks (so every tensor matters to the logits)."""
    model, tokenizer = load_model(str(stories_path))
    config = salr.SALRConfig(sparsity=0.5, residual_rank=8, r=4)
    salr.convert(model, config, progress=False)
    salr.pack_bases(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("B_cat"):
                p.add_(0.01 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("ckpt") / "D"
    salr.save(model, out, config, tokenizer=tokenizer, base_model="stories260K")
    return out


@pytest.fixture
def ckpt(compressed, tmp_path) -> Path:
    copy = tmp_path / "D"
    shutil.copytree(compressed, copy)
    return copy


def logits(directory: Path) -> torch.Tensor:
    model, tokenizer = load_model(str(directory))
    with torch.no_grad():
        return model(tokenizer(PROMPT, return_tensors="pt").input_ids).logits


def edit_meta(directory: Path, change) -> None:
    meta = json.loads((directory / CONFIG_NAME).read_text())
    change(meta)
    (directory / CONFIG_NAME).write_text(json.dumps(meta))


def rehash(directory: Path, name: str) -> None:
    """Record the current sha256 of `name` in salr_config.json: an edit that keeps the checksums consistent."""
    digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    edit_meta(directory, lambda m: m["files"].__setitem__(name, digest))


# ----------------------------------------------------------------------------- item 1


def test_checkpoint_without_salr_config_is_refused_not_a_random_model(ckpt, capsys):
    (ckpt / CONFIG_NAME).unlink()
    with pytest.raises(SALRError, match="without its salr_config.json"):
        load_model(str(ckpt))
    wikitext = ckpt / "t.txt"
    wikitext.write_text("Once upon a time there was a dog. " * 20)
    assert main(["eval", "--model", str(ckpt), "--task", "wikitext2", "--data", str(wikitext), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "salr_config.json" in err


def test_hf_directory_with_a_missing_or_unexpected_weight_is_refused(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / WEIGHTS_NAME
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.extra"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(SALRError, match=r"do not fit the model \(missing keys .*up_proj.weight.*unexpected keys"):
        load_model(str(tmp_path / "hf"))


def test_hf_config_describing_a_huge_model_is_refused_before_building_it(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    started = time.perf_counter()
    for layers, message in ((10**6, "not a plausible model size"), (1000, "describes .* parameters but the weights")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
        with pytest.raises(SALRError, match=message):
            load_model(str(tmp_path / "hf"))
    assert time.perf_counter() - started < 30


# ----------------------------------------------------------------------------- item 5


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["files"].pop(WEIGHTS_NAME), "does not list model.safetensors"),
        (lambda m: m.__setitem__("files", {}), "does not list config.json, model.safetensors"),
        (lambda m: m["files"].pop("tokenizer.json"), "tokenizer.json is not covered by the checksums"),
    ],
)
def test_every_file_the_loader_reads_is_covered(ckpt, change, message):
    edit_meta(ckpt, change)
    with pytest.raises(SALRError, match=message):
        salr.load(ckpt)


def tensor_offset(weights: Path, name: str) -> int:
    """Byte offset in the file of the first value of tensor `name`."""
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n + json.loads(raw[8 : 8 + n])[name]["data_offsets"][0]


def test_unlisted_weights_with_a_flipped_byte_do_not_load(ckpt):
    edit_meta(ckpt, lambda m: m["files"].pop(WEIGHTS_NAME))
    data = bytearray((ckpt / WEIGHTS_NAME).read_bytes())
    data[tensor_offset(ckpt / WEIGHTS_NAME, "model.layers.0.self_attn.q_proj.B_cat") + 2] ^= 0x10
    (ckpt / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(SALRError, match="does not list model.safetensors"):
        salr.load(ckpt)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["salr"].__setitem__("lora_alpha", 2 * m["salr"]["lora_alpha"]),  # LoRA scale: same shapes
        lambda m: m["salr"].update(residual_rank=4, r=8),  # same A_cat / B_cat shapes, different split
        lambda m: m.__setitem__("tied_tensors", {}),
    ],
)
def test_salr_config_edits_that_keep_shapes_are_refused(ckpt, change):
    edit_meta(ckpt, change)
    with pytest.raises(SALRError, match="does not belong to model.safetensors"):
        salr.load(ckpt)


def test_config_json_edit_with_recomputed_checksum_is_refused(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.1}))
    rehash(ckpt, "config.json")
    with pytest.raises(SALRError, match="does not belong to model.safetensors"):
        salr.load(ckpt)


def test_swapped_tensor_names_with_recomputed_checksum_are_refused(ckpt):
    weights = ckpt / WEIGHTS_NAME
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n]
    a, b = b"layers.0.self_attn.q_proj.A_cat", b"layers.0.self_attn.k_proj.A_cat"
    swapped = header.replace(a, b"\0").replace(b, a).replace(b"\0", b)
    weights.write_bytes(raw[:8] + swapped + raw[8 + n :])
    rehash(ckpt, WEIGHTS_NAME)
    with pytest.raises(SALRError, match="does not belong to model.safetensors"):
        salr.load(ckpt)


# ----------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("name", ["/etc/shadow", "/proc/self/pagemap", "../D/config.json", "sub/x", ".hidden"])
def test_file_names_must_be_plain_names_inside_the_checkpoint(ckpt, name):
    edit_meta(ckpt, lambda m: m["files"].__setitem__(name, "0" * 64))
    started = time.perf_counter()
    with pytest.raises(SALRError, match="is not a plain file name inside the checkpoint"):
        salr.load(ckpt)
    assert time.perf_counter() - started < 5


# ----------------------------------------------------------------------------- item 10


def test_non_finite_weights_are_refused_at_load_with_the_tensor_name(stories_path, tmp_path):
    model, tokenizer = load_model(str(stories_path))
    config = salr.SALRConfig(residual_rank=4, r=2)
    salr.convert(model, config, progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.B_cat[3, 1] = float("nan")
    salr.save(model, tmp_path / "nan", config, tokenizer=tokenizer)  # consistent checksums: only the values are bad
    with pytest.raises(SALRError, match=r"model\.layers\.1\.mlp\.down_proj\.B_cat has non-finite values"):
        salr.load(tmp_path / "nan")


def nan_llama2c(stories_path: Path, tmp_path: Path) -> Path:
    """stories260K with one NaN in layer 0's wq (the first weights after the embedding and the attention norms)."""
    raw = bytearray(stories_path.read_bytes())
    dim, _, n_layers, _, _, vocab, _ = struct.unpack_from("7i", raw)
    offset = 28 + 4 * (vocab * dim + n_layers * dim) + 4 * 5
    raw[offset : offset + 4] = struct.pack("f", float("nan"))
    path = tmp_path / "nan" / "model.bin"
    path.parent.mkdir()
    path.write_bytes(bytes(raw))
    shutil.copy(stories_path.parent / "tok512.bin", path.parent / "tok512.bin")
    return path


def test_non_finite_weights_are_refused_at_compress_and_reports_are_strict_json(stories_path, tmp_path, capsys):
    path = nan_llama2c(stories_path, tmp_path)
    out = tmp_path / "out"
    assert main(["compress", "--model", str(path), "--residual-rank", "0", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj.weight has non-finite values" in err and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(SALRError, match="non-finite"):
        salr.io.atomic_write_json(tmp_path / "r.json", {"loss": float("nan")})
    assert not (tmp_path / "r.json").exists()


def test_convert_refuses_non_finite_target_weights_before_converting_anything(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(SALRError, match=r"model\.layers\.1\.mlp\.up_proj has non-finite weights"):
        salr.convert(tiny_llama, salr.SALRConfig(residual_rank=4, r=2), progress=False)
    assert not any(isinstance(m, salr.layer.SALRLinear) for m in tiny_llama.modules())


# ----------------------------------------------------------------------------- items 11, 12


def test_compress_removes_leftovers_of_killed_saves_and_keeps_live_ones(stories_path, tmp_path, dead_pid):
    pid = dead_pid
    stale = [tmp_path / f".D.{pid}.x1y2.tmp", tmp_path / f".D.old-{pid}", tmp_path / f".D.{pid}.k3.tmp"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    stale[1].mkdir()
    stale[2].write_bytes(b"x")
    live = tmp_path / f".D.{os.getppid()}.abc.tmp"  # a concurrent writer's: not ours to remove
    live.mkdir()
    other = tmp_path / f".E.{pid}.abc.tmp"  # another output's
    other.mkdir()
    argv = ["compress", "--model", str(stories_path), "--residual-rank", "4", "--lora-rank", "2", "--quiet"]
    assert main([*argv, "--output", str(tmp_path / "D")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["D", live.name, other.name])


def test_report_is_inside_the_checkpoint_when_it_is_renamed_into_place(stories_path, tmp_path, monkeypatch):
    from salr import checkpoint

    seen = {}
    rename = checkpoint.replace_dir

    def spy(new, target):
        seen["report"] = (new / "salr_report.json").is_file()
        seen["listed"] = "salr_report.json" in json.loads((new / CONFIG_NAME).read_text())["files"]
        rename(new, target)

    monkeypatch.setattr(checkpoint, "replace_dir", spy)
    argv = ["compress", "--model", str(stories_path), "--residual-rank", "4", "--lora-rank", "2", "--quiet"]
    assert main([*argv, "--output", str(tmp_path / "D")]) == 0
    assert seen == {"report": True, "listed": True}
    assert json.loads((tmp_path / "D" / "salr_report.json").read_text())["totals"]["checkpoint_bytes"] > 0


def test_save_fsyncs_files_before_the_rename_and_the_directory_after(compressed, tmp_path, monkeypatch):
    from salr import checkpoint, io

    model, tokenizer = salr.load(compressed)
    events = []
    fsync = io.fsync_path
    monkeypatch.setattr(io, "fsync_path", lambda p: (events.append(("fsync", Path(p).name)), fsync(p))[1])
    monkeypatch.setattr(checkpoint, "fsync_path", io.fsync_path)
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), replace(a, b))[1])
    salr.save(model, tmp_path / "S", salr.SALRConfig(sparsity=0.5, residual_rank=8, r=4), tokenizer=tokenizer)
    rename = events.index(("rename", "S"))
    assert ("fsync", WEIGHTS_NAME) in events[:rename] and ("fsync", CONFIG_NAME) in events[:rename]
    assert ("fsync", tmp_path.name) in events[rename:]


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_checkpoints_honour_the_umask(stories_path, tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        argv = ["compress", "--model", str(stories_path), "--residual-rank", "4", "--lora-rank", "2", "--quiet"]
        assert main([*argv, "--output", str(tmp_path / "D")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "D").stat().st_mode & 0o777 == dir_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "D").iterdir()}
    assert set(modes.values()) == {file_mode}, modes

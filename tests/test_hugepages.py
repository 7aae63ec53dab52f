"""salr.hugepages: a model's CPU tensors copied into one mapping advised for transparent huge pages."""

from __future__ import annotations

import mmap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import salr
from salr import hugepages
from salr.hugepages import MARK, huge_page_copies, huge_pages_available, place_on_huge_pages

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="madvise(MADV_HUGEPAGE) is Linux-only")


@pytest.fixture
def thp(tmp_path, monkeypatch):
    """THP in "madvise" mode, whatever this machine's setting (the advice is recorded even where THP is off)."""
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(hugepages, "THP_SETTING", setting)
    monkeypatch.delenv("SALR_HUGE_PAGES", raising=False)
    return setting


def _advised(t: torch.Tensor) -> bool:
    """Whether the mapping holding t's first byte carries madvise(MADV_HUGEPAGE) (VmFlags "hg" in smaps)."""
    address, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    raise AssertionError(f"address {address:#x} is in no mapping")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("scale", torch.full((5,), 0.5))
        self.register_buffer("odd", torch.arange(7, dtype=torch.int64))  # 56 bytes: the next tensor must realign
        self.register_buffer("bf16", torch.randn(3, 3).to(torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(h).sum(-1, keepdim=True) + self.body(h) * self.scale + self.bf16.float().sum()


def test_placement_keeps_outputs_objects_and_ties(thp):
    torch.manual_seed(0)
    model = _Tiny()
    ids = torch.tensor([[1, 4, 9]])
    before = model(ids)
    params = dict(model.named_parameters())
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert place_on_huge_pages(model) == nbytes
    assert torch.equal(model(ids), before)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.head.weight is model.emb.weight
    assert all(p.requires_grad for p in model.parameters())
    tensors = [*model.parameters(), *model.buffers()]
    assert all(getattr(t, MARK, False) for t in tensors)
    assert all(t.data_ptr() % 64 == 0 and _advised(t) for t in tensors)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for t in tensors)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))  # no overlap
    assert place_on_huge_pages(model) == 0  # already placed


def test_placed_model_trains_and_saves(thp, tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    place_on_huge_pages(model)
    weight = model.body.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.tensor([[2, 3]])).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model.body.weight, weight)
    # safetensors refuses tensors that share memory: each copy has a storage of its own
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, tmp_path / "m.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in load_file(tmp_path / "m.safetensors").items())


def test_views_and_shared_storages_stay(thp):
    module = nn.Module()
    whole = torch.arange(8.0)
    module.register_buffer("whole", whole)
    module.register_buffer("part", whole[2:5])  # a view: moving either would break their aliasing
    module.register_buffer("alone", torch.ones(4))
    assert place_on_huge_pages(module) == 16
    assert module.whole is whole and module.part.data_ptr() == whole.data_ptr() + 8
    assert _advised(module.alone) and not getattr(module.whole, MARK, False)


def test_switched_off_or_unavailable(thp, monkeypatch):
    model = _Tiny()
    monkeypatch.setenv("SALR_HUGE_PAGES", "0")
    assert not huge_pages_available()
    assert place_on_huge_pages(model) == 0 and huge_page_copies([torch.ones(3)]) is None
    monkeypatch.delenv("SALR_HUGE_PAGES")
    thp.write_text("always madvise [never]\n")
    assert not huge_pages_available() and place_on_huge_pages(model) == 0
    monkeypatch.setattr(hugepages, "THP_SETTING", thp.parent / "missing")
    assert not huge_pages_available()
    assert not any(getattr(t, MARK, False) for t in model.parameters())


def test_huge_page_copies(thp):
    tensors = [torch.randn(5, 3), torch.arange(9, dtype=torch.int32), torch.randn(2, 7).to(torch.bfloat16)]
    copies = huge_page_copies(tensors)
    assert all(
        torch.equal(a, b) and a.shape == b.shape and a.dtype == b.dtype for a, b in zip(tensors, copies, strict=True)
    )
    assert copies[0].data_ptr() % hugepages.HUGE_PAGE_BYTES == 0 and all(_advised(c) for c in copies)
    with pytest.raises(ValueError, match="contiguous"):
        huge_page_copies([torch.randn(4, 4).t()])
    with pytest.raises(ValueError, match="non-empty"):
        huge_page_copies([torch.empty(0)])


def test_loaded_checkpoint_is_placed(thp, stories_path, tmp_path):
    model, tokenizer = salr.load_model(str(stories_path), dtype="bfloat16")
    config = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=2, adapter_dtype="bfloat16")
    salr.convert(model, config, progress=False)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    expected = model(ids).logits
    salr.save(model, tmp_path / "a", config, tokenizer=tokenizer)
    loaded, _ = salr.load(tmp_path / "a")
    base = loaded.model.layers[0].mlp.up_proj.base
    assert all(getattr(t, MARK, False) and _advised(t) for t in base.buffers())
    assert torch.equal(loaded(ids).logits, expected)
    salr.save(loaded, tmp_path / "b", config, tokenizer=tokenizer)  # a placed model saves as any other
    assert torch.equal(salr.load(tmp_path / "b")[0](ids).logits, expected)


def test_refused_mapping_leaves_tensors(thp, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(hugepages.mmap, "mmap", refuse)
    model = _Tiny()
    address = model.body.weight.data_ptr()
    assert place_on_huge_pages(model) == 0 and huge_page_copies([torch.ones(2)]) is None
    assert model.body.weight.data_ptr() == address


def test_freed_memory_is_handed_back_while_placing(thp, monkeypatch):
    calls = []
    monkeypatch.setattr(hugepages, "return_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(hugepages, "TRIM_BYTES", 100)  # _Tiny: 264 + 120 + 20 + 20 + 56 + 18 bytes
    assert place_on_huge_pages(_Tiny()) > 0
    assert len(calls) >= 3  # during the copies, then once at the end


def test_load_can_leave_pages_and_load_model_places_after_a_cast(thp, stories_path, tmp_path):
    model, tokenizer = salr.load_model(str(stories_path), dtype="bfloat16")
    config = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=2, adapter_dtype="bfloat16")
    salr.convert(model, config, progress=False)
    salr.save(model, tmp_path / "c", config, tokenizer=tokenizer)
    unplaced, _ = salr.load(tmp_path / "c", huge_pages=False)  # for a GPU, or merge / export
    assert not any(getattr(t, MARK, False) for t in [*unplaced.parameters(), *unplaced.buffers()])
    cast, _ = salr.load_model(str(tmp_path / "c"), dtype="float32")
    lora_b = cast.model.layers[0].mlp.up_proj.B_cat
    assert lora_b.dtype == torch.float32 and getattr(lora_b, MARK, False) and _advised(lora_b)
    unplaced, _ = salr.load_model(str(tmp_path / "c"), huge_pages=False)
    assert not any(getattr(t, MARK, False) for t in [*unplaced.parameters(), *unplaced.buffers()])


def test_training_places_only_for_the_cpu(thp, stories_path, tmp_path, monkeypatch):
    from salr.train import loop

    model, tokenizer = salr.load_model(str(stories_path))
    config = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=2)
    salr.convert(model, config, progress=False)
    salr.save(model, tmp_path / "d", config, tokenizer=tokenizer)

    def placed(model: torch.nn.Module) -> bool:
        return all(getattr(t, MARK, False) for t in model.model.layers[0].mlp.up_proj.base.buffers())

    assert placed(loop.prepare_model(str(tmp_path / "d"), "salr", config)[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the run would move the model to the GPU
    assert not placed(loop.prepare_model(str(tmp_path / "d"), "salr", config)[0])


def test_default_is_the_embedded_model_whatever_the_working_directory_holds(thp, stories_path, tmp_path, monkeypatch):
    model, tokenizer = salr.load_model(str(stories_path))
    config = salr.SALRConfig.from_preset("paper", sparsity=0.5, residual_rank=4, r=2)
    salr.convert(model, config, progress=False)
    salr.save(model, tmp_path / "default", config, tokenizer=tokenizer)  # a SALR run named "default"
    monkeypatch.chdir(tmp_path)
    placed = []
    monkeypatch.setattr(salr.loaders, "place_on_huge_pages", placed.append)
    monkeypatch.setattr(salr.loaders, "load_default", lambda: (torch.nn.Linear(2, 2), None))
    checked = []
    monkeypatch.setattr(salr.loaders, "check_finite", lambda model, spec: checked.append(spec))
    salr.load_model("default")
    assert checked == ["default"] and placed == []  # the dense model, checked and not placed as a checkpoint

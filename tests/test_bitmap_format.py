"""Bitmap format: exact round trips, the compressed-tensors layout, serialisation and corruption checks."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from salr import bitmap_format as fm
from salr.errors import SALRError

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def sparse_weight(rows: int, cols: int, sparsity: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random weight with ~sparsity zeros, plus one all-zero and one fully dense row when there is room."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) + 0.01  # no accidental zeros
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    if rows >= 3:
        w[0] = 0
        w[1] = torch.randn(cols, generator=g).abs() + 0.5
    return w.to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 24),
    cols=st.integers(0, 70),
    sparsity=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(rows, cols, sparsity, dtype, seed):
    w = sparse_weight(rows, cols, sparsity, dtype, seed)
    bw = fm.encode(w)
    assert bw.bitmask.shape == (rows, -(-cols // 8)) and bw.bitmask.dtype == torch.uint8
    assert bw.nnz == int((w != 0).sum())
    fm.validate(bw.bitmask, bw.values, bw.row_offsets, bw.shape)
    out = fm.decode(bw)
    assert out.dtype == dtype and torch.equal(out, w)


@pytest.mark.parametrize("cols", [1, 7, 8, 9, 63, 64, 65])
def test_bitmask_matches_numpy_packbits_little(cols):
    w = sparse_weight(5, cols, 0.5, torch.float32, cols)
    bw = fm.encode(w)
    expected = np.packbits((w != 0).numpy(), axis=-1, bitorder="little")
    np.testing.assert_array_equal(bw.bitmask.numpy(), expected)
    # row offsets are the exclusive prefix sum of the row counts
    counts = (w != 0).sum(1)
    assert bw.row_offsets.tolist() == (torch.cumsum(counts, 0) - counts).tolist()


FIXTURE = Path(__file__).parent / "data" / "sparse_bitmask_ct014.safetensors"
FIXTURE_SHA256 = "ad50cf3c5bb4f9861ea54ec33ad7e3d4cfbc8c1b1488e372274afe2bade1ea2f"


def test_encoder_writes_the_frozen_compressed_tensors_sparse_bitmask_bytes():
    """The fixture was written once by compressed-tensors 0.14.0's BitmaskCompressor (tests/data/
    make_sparse_bitmask_fixture.py); our encoder must give the same tensors, bit for bit, and read them back."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    assert hashlib.sha256(FIXTURE.read_bytes()).hexdigest() == FIXTURE_SHA256  # frozen: never regenerated
    with safe_open(str(FIXTURE), "pt") as f:
        assert f.metadata()["producer"] == "compressed-tensors 0.14.0 BitmaskCompressor"
    fixture = load_file(FIXTURE)
    names = sorted({k.rsplit(".", 1)[0] for k in fixture if k.endswith(".dense")})
    assert names == ["layer.bf16", "layer.fp16", "layer.fp32"]
    for name in names:
        dense = fixture[f"{name}.dense"]
        ours = fm.to_tensors(fm.encode(dense), prefix=f"{name}.weight.")
        theirs = {k: v for k, v in fixture.items() if k.startswith(f"{name}.weight.")}
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
            assert ours[key].view(torch.uint8).numpy().tobytes() == value.view(torch.uint8).numpy().tobytes(), key
        back = fm.decode(fm.from_tensors(theirs, prefix=f"{name}.weight."))
        assert torch.equal(back, dense) and not torch.signbit(back[dense == 0]).any()  # -0.0 comes back as +0.0
    assert int(fixture["layer.bf16.weight.row_offsets"][1]) == 0  # the empty first row
    assert int(fixture["layer.fp32.weight.bitmask"][-1, 0]) & 0b10 == 0  # -0.0 is pruned


def test_loading_never_consults_a_format_registry(tiny_llama, tmp_path, monkeypatch):
    """Bases are rebuilt from the tensor names a checkpoint holds: with the format registry emptied and
    compressed-tensors unimportable, a bitmap checkpoint still loads with the same logits."""
    import sys

    import salr
    from salr import bases
    from salr.bases import BitmapBase
    from salr.convert import base_slots

    salr.convert(tiny_llama, salr.SALRConfig.from_preset("paper", residual_rank=2, r=2), progress=False)
    salr.pack_bases(tiny_llama)
    salr.save(tiny_llama, tmp_path / "ckpt", salr.SALRConfig.from_preset("paper", residual_rank=2, r=2))
    monkeypatch.setattr(bases, "STORED_FORMATS", {})
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    model, _ = salr.load(tmp_path / "ckpt")
    assert all(isinstance(getattr(h, a), BitmapBase) for _, h, a in base_slots(model))
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_llama.eval()(ids).logits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_safetensors_round_trip(dtype):
    from safetensors.torch import load, save

    w = sparse_weight(17, 30, 0.5, dtype, 2)
    blob = save(fm.to_tensors(fm.encode(w), prefix="layer.weight."))
    bw = fm.from_tensors(load(blob), prefix="layer.weight.")
    assert bw.shape == (17, 30) and torch.equal(fm.decode(bw), w)


def _tensors():
    return fm.to_tensors(fm.encode(sparse_weight(12, 21, 0.5, torch.bfloat16, 3)))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: t.update(compressed=t["compressed"][:-1]), "nonzeros but there are"),
        (lambda t: t.update(row_offsets=t["row_offsets"] + (torch.arange(12) == 5)), "row_offsets disagree"),
        (lambda t: t.update(shape=torch.tensor([12, 30])), "does not match weight shape"),
        (lambda t: t.update(shape=torch.tensor([12, 21, 1])), "must hold 2 integers"),
        (lambda t: t.update(bitmask=t["bitmask"].to(torch.int16)), "must be uint8"),
        (lambda t: t.update(compressed=t["compressed"].to(torch.int8)), "bf16, fp16 or fp32"),
        (lambda t: t.update(row_offsets=t["row_offsets"].int()), "must be int64"),
        (lambda t: t["bitmask"][3, -1].bitwise_or_(0x80), "beyond column"),
        (lambda t: t.pop("row_offsets"), "missing"),
    ],
)
def test_corrupted_tensors_raise(corrupt, message):
    t = _tensors()
    corrupt(t)
    with pytest.raises(SALRError, match=message):
        fm.from_tensors(t)


def test_ideal_bytes_at_half_sparsity():
    shape = (4096, 4096)
    nnz = 4096 * 4096 // 2
    assert fm.dense_nbytes(shape) == 33_554_432
    assert fm.ideal_bitmap_nbytes(shape, nnz) == 4096 * 512 + nnz * 2 == 18_874_368
    assert fm.dense_nbytes(shape) / fm.ideal_bitmap_nbytes(shape, nnz) == pytest.approx(16 / 9)


def test_encode_rejects_bad_input():
    with pytest.raises(SALRError, match="2-D"):
        fm.encode(torch.ones(2, 3, 4))
    with pytest.raises(SALRError, match="bf16, fp16 or fp32"):
        fm.encode(torch.ones(2, 3, dtype=torch.float64))

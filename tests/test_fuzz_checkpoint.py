"""Hypothesis fuzzing of checkpoint directories (issue 12): random deletions, truncations, byte flips, appended
bytes, foreign files, special files, and edits of salr_config.json, config.json and the safetensors header (those two
with their checksums recomputed, so only the structural checks and the binding can catch them). Loading must give
the saved model's exact logits or raise SALRError: never a different model, another exception type, or a hang
(each load runs under a 30 s alarm).

SALR_FUZZ_EXAMPLES sets the number of examples (default 60, about a minute here; the run recorded in
docs/reliability.md used 1500)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import salr
from salr.errors import SALRError
from salr.loaders import load_model

FILES = ("salr_config.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json")  # fmt: skip
IDS = torch.tensor([[1, 403, 407, 261, 378, 29, 2, 17, 300]])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
SPECIAL_NAMES = ["/etc/passwd", "/proc/self/pagemap", "../ckpt/config.json", "", ".", "..", "a/b", "x\0y", 7, None]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


@pytest.fixture(scope="module")
def pristine(stories_path, tmp_path_factory):
    """(checkpoint directory, its logits on IDS): stories260K, bitmap bases, tied embeddings, nonzero LoRA."""
    model, tokenizer = load_model(str(stories_path))
    config = salr.SALRConfig(sparsity=0.5, residual_rank=4, r=4)
    salr.convert(model, config, progress=False)
    salr.pack_bases(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("B_cat"):
                p.add_(0.02 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("fuzz") / "ckpt"
    salr.save(model, out, config, tokenizer=tokenizer, base_model="stories260K")
    loaded, _ = salr.load(out)
    with torch.no_grad():
        return out, loaded(IDS).logits


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def _nearby(data, value):
    """A value close to `value`: the mutations a real bug or a careless edit would make."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + data.draw(st.sampled_from([-1, 1, 2**31, -value - 1]))
    if isinstance(value, float):
        return value * data.draw(st.sampled_from([0.5, 2.0, -1.0, 0.0]))
    if isinstance(value, str) and value:
        i = data.draw(st.integers(0, len(value) - 1))
        return value[:i] + data.draw(st.sampled_from("0af.-/x")) + value[i + 1 :]
    return data.draw(JSON_VALUES)


def _edit_json(data, obj):
    """Delete, replace or nudge one node of a JSON tree (the root too); returns the new tree."""
    paths = list(_paths(obj))
    path = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["delete", "replace", "nudge", "rename"]))
    if not path:
        return data.draw(JSON_VALUES) if action != "nudge" else [obj]
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    elif action == "rename" and isinstance(parent, dict):
        parent[data.draw(st.sampled_from([*SPECIAL_NAMES[:7], "tokenizer.json", "model.safetensors"]))] = parent.pop(
            path[-1]
        )
    else:
        _set(obj, path, data.draw(JSON_VALUES) if action == "replace" else _nearby(data, parent[path[-1]]))
    return obj


def _read_json(path: Path):
    """The JSON of `path`, or None when an earlier damage made it unreadable (then the edit is skipped)."""
    if not path.is_file() or path.is_symlink():
        return None
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _rehash(directory: Path, name: str) -> None:
    meta_path = directory / "salr_config.json"
    meta = _read_json(meta_path)
    if isinstance(meta, dict) and isinstance(meta.get("files"), dict) and (directory / name).is_file():
        meta["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        meta_path.write_text(json.dumps(meta))


def _edit_header(data, directory: Path) -> None:
    """Change one entry of the safetensors tensor table (name, dtype, shape or offsets) and recompute the sha256."""
    path = directory / "model.safetensors"
    if not path.is_file() or path.is_symlink():
        return
    try:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        names = sorted(k for k in header if k != "__metadata__" and isinstance(header[k], dict))
        if not names or not all("shape" in header[k] and "data_offsets" in header[k] for k in names):
            return
    except (OSError, ValueError, struct.error, RecursionError, TypeError):
        return  # an earlier damage made the header unreadable
    name = data.draw(st.sampled_from(names))
    entry = header[name]
    what = data.draw(st.sampled_from(["swap", "dtype", "shape", "offsets", "drop"]))
    if what == "swap":
        other = data.draw(st.sampled_from(names))
        header[name], header[other] = header[other], header[name]
    elif what == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F64", "BOOL"]))
    elif what == "shape" and entry["shape"]:
        i = data.draw(st.integers(0, len(entry["shape"]) - 1))
        entry["shape"][i] = max(0, entry["shape"][i] + data.draw(st.sampled_from([-1, 1, 2])))
    elif what == "offsets":
        entry["data_offsets"][data.draw(st.integers(0, 1))] += data.draw(st.sampled_from([-4, -1, 1, 4]))
    else:
        del header[name]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    _rehash(directory, "model.safetensors")


def _damage(data, directory: Path) -> str:
    op = data.draw(
        st.sampled_from(["delete", "truncate", "flip", "append", "meta", "config", "header", "foreign", "special"])
    )
    name = data.draw(st.sampled_from(FILES))
    path = directory / name
    regular = path.is_file() and not path.is_symlink()  # never read a FIFO or /dev/zero made by an earlier operation
    if op == "delete":
        path.unlink(missing_ok=True)
    elif op == "truncate" and regular:
        size = path.stat().st_size
        path.write_bytes(path.read_bytes()[: data.draw(st.integers(0, max(0, size - 1)))])
    elif op == "flip" and regular and path.stat().st_size:
        raw = bytearray(path.read_bytes())
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
        path.write_bytes(bytes(raw))
    elif op == "append" and regular:
        path.write_bytes(path.read_bytes() + data.draw(st.binary(min_size=1, max_size=16)))
    elif op == "meta" and (meta := _read_json(directory / "salr_config.json")) is not None:
        (directory / "salr_config.json").write_text(json.dumps(_edit_json(data, meta)))
    elif op == "config" and (config := _read_json(directory / "config.json")) is not None:
        (directory / "config.json").write_text(json.dumps(_edit_json(data, config)))
        _rehash(directory, "config.json")
    elif op == "header":
        _edit_header(data, directory)
    elif op == "foreign":
        extra = data.draw(st.sampled_from(["notes.txt", "special_tokens_map.json", "pytorch_model.bin"]))
        (directory / extra).write_bytes(data.draw(st.binary(max_size=32)))
    elif op == "special":
        path.unlink(missing_ok=True)  # (a FIFO from an earlier operation too)
        target = data.draw(st.sampled_from(["fifo", "/dev/zero", "/proc/self/pagemap", "/etc/hostname"]))
        if target == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to(target)
    return f"{op} {name}"


@settings(
    max_examples=int(os.environ.get("SALR_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(data=st.data())
def test_load_gives_the_saved_logits_or_a_salr_error(pristine, data):
    source, expected = pristine
    with tempfile.TemporaryDirectory(prefix="salr-fuzz-") as tmp:
        directory = Path(tmp) / "ckpt"
        shutil.copytree(source, directory)
        done = [_damage(data, directory) for _ in range(data.draw(st.integers(1, 3)))]
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(30)
        try:
            model, _ = load_model(str(directory))
            with torch.no_grad():
                got = model(IDS).logits
        except SALRError as err:
            event("refused: " + " ".join(str(err).split(": ", 1)[-1].split()[:4]))
            return
        except Hang:
            pytest.fail(f"load hung after {done}")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        assert torch.equal(got, expected), f"a different model loaded after {done}"
        event("loaded, exact logits")

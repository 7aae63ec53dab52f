"""Bad input, tried as a careless or hostile user would (issue 12): exit 2, one line on stderr, no traceback, no new
files, and the refusal comes before the expensive work. `BAD_INPUTS` is also the table in docs/reliability.md."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import salr
from salr import data
from salr.cli import main

# Each case: (id, setup(ws) -> argv, expected text of the one-line message). `ws` has the workspace directory, the
# stories260K model, a small GSM8K file and a compressed checkpoint; setups write their inputs under ws.dir.


class Workspace:
    def __init__(self, root: Path, stories: Path, ckpt: Path) -> None:
        self.dir, self.stories, self.ckpt = root, stories, ckpt
        root.mkdir(parents=True)
        self.data = root / "gsm8k.jsonl"
        self.data.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_arithmetic(16, seed=1)))

    def path(self, name: str, content: bytes | str | None = None) -> str:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            path.write_bytes(content)
        return str(path)

    def compress(self, *extra: str) -> list[str]:
        return ["compress", "--model", str(self.stories), "--output", str(self.dir / "out"), *extra]

    def train(self, *extra: str) -> list[str]:
        return ["train", "--model", str(self.stories), "--data", str(self.data), "--output", str(self.dir / "run"),
                "--max-length", "160", "--no-progress", *extra]  # fmt: skip

    def eval(self, *extra: str, model: str | None = None) -> list[str]:
        text = self.path("text.txt", "Once upon a time there was a cat. " * 30)
        return ["eval", "--model", model or str(self.stories), "--task", "wikitext2", "--data", text, *extra]

    def checkpoint_with(self, change) -> str:
        """A copy of the checkpoint whose salr_config.json is change(its content): an object, or raw text."""
        target = self.dir / "ckpt"
        shutil.copytree(self.ckpt, target)
        meta = change(json.loads((target / "salr_config.json").read_text()))
        (target / "salr_config.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
        return str(target)

    def hf_dir(self, **config_changes) -> str:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
        target = self.dir / "hf"
        LlamaForCausalLM(config).save_pretrained(target)
        edited = {**json.loads((target / "config.json").read_text()), **config_changes}
        (target / "config.json").write_text(json.dumps(edited))
        return str(target)

    def damaged_default_cache(self) -> list[str]:
        """The cached copy of the default model with its weights cut short (a full disk during the first run)."""
        from salr.loaders.default import CACHE_NAME, cache_dir

        target = cache_dir() / CACHE_NAME
        shutil.copytree(self.hf_dir(), target)
        weights = target / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:3000])
        return self.eval(model="default")

    def llama2c(self, header: tuple[int, ...], floats: int, tokenizer: bytes | None = None) -> str:
        path = self.path("m/model.bin", struct.pack("7i", *header) + bytes(4 * floats))
        shutil.copy(self.stories.parent / "tok512.bin", self.dir / "m" / "tok512.bin")
        if tokenizer is not None:
            self.path("m/tokenizer.bin", tokenizer)
        return path


def _deep(n: int) -> str:
    return "[" * n + "]" * n


BAD_INPUTS = [
    ("regex", lambda w: w.compress("--target-modules", "q_proj["), "is not a valid regular expression"),
    ("output-is-file", lambda w: w.compress("--output", w.path("f.txt", "x")), "exists and is not a directory"),
    (
        "output-foreign-dir",
        lambda w: w.compress("--output", str(Path(w.path("mine/notes.txt", "x")).parent)),
        "exists and is not a SALR checkpoint",
    ),
    ("output-under-file", lambda w: w.compress("--output", w.path("f.txt", "x") + "/sub"), "is a file, so the"),
    ("eval-json-unwritable", lambda w: w.eval("--json", w.path("f.txt", "x") + "/r.json"), "is a file, so the"),
    ("train-output-is-file", lambda w: w.train("--output", w.path("f.txt", "x")), "exists and is not a directory"),
    ("binary-jsonl", lambda w: w.train("--data", w.path("bin.jsonl", bytes(range(256)) * 4)), "not UTF-8 text"),
    (
        "gsm8k-budget-past-context",
        lambda w: [*w.eval(), "--task", "gsm8k", "--data", str(w.data), "--max-new-tokens", "100000"],
        "is more than this model's whole context",
    ),
    ("fewer-records-than-a-batch", lambda w: w.train("--limit", "2", "--batch-size", "4"), "only 2 training examples"),
    ("eval-data-alone", lambda w: w.train("--eval-data", str(w.data)), "--eval-data and --eval-every go together"),
    ("eval-every-alone", lambda w: w.train("--eval-every", "2"), "--eval-data and --eval-every go together"),
    (
        "binary-mmlu-csv",
        lambda w: [
            "eval",
            "--model",
            str(w.stories),
            "--task",
            "mmlu",
            "--shots",
            "0",
            "--data",
            w.path("x_test.csv", b"\xff\xfe\x00" * 50),
        ],
        "not UTF-8 text",
    ),
    ("deep-json-data", lambda w: w.train("--data", w.path("deep.jsonl", _deep(200_000))), "nested too deeply"),
    (
        "alpaca-wrapper-object",
        lambda w: w.train("--data", w.path("a.json", json.dumps({"data": []}, indent=1))),
        "unknown record format with fields ['data']",
    ),
    ("salr-config-list", lambda w: w.eval(model=w.checkpoint_with(lambda m: [m])), "expected a JSON object, got list"),
    (
        "salr-config-no-keys",
        lambda w: w.eval(model=w.checkpoint_with(lambda m: {"format_version": 2})),
        "is corrupt: no base_format, base_model, files, salr, tied_tensors",
    ),
    (
        "salr-config-wrong-type",
        lambda w: w.eval(model=w.checkpoint_with(lambda m: {**m, "files": ["config.json"]})),
        "files must be a JSON dict",
    ),
    (
        "salr-config-deep",
        lambda w: w.eval(model=w.checkpoint_with(lambda m: json.loads(_deep(500)))),
        "expected a JSON object",
    ),
    (
        "unknown-model-type",
        lambda w: w.eval(model=w.hf_dir(model_type="llama9")),
        "model_type 'llama9' is not a model",
    ),
    ("million-layers", lambda w: w.eval(model=w.hf_dir(num_hidden_layers=10**6)), "is not a plausible model size"),
    (
        "latest-json",
        lambda w: [w.path("run/checkpoints/latest.json", '{"dir": "/etc", "step": 3}'), *w.train("--resume")][1:],
        "latest.json is corrupt",
    ),
    ("llama2c-odd-head", lambda w: w.eval(model=w.llama2c((6, 8, 1, 2, 2, 32, 8), 10_000)), "is odd"),
    (
        "llama2c-tokenizer",
        lambda w: w.eval(model=w.llama2c((8, 8, 1, 2, 2, 32, 8), 10_000, struct.pack("ifi", 8, 0.0, -8) + b"ab")),
        "not a valid llama2.c tokenizer file",
    ),
    ("default-cache-truncated", lambda w: w.damaged_default_cache(), "the cached default model is damaged"),
    ("lr-nan", lambda w: w.train("--lr", "nan"), "lr must be a finite number"),
    ("lr-not-a-number", lambda w: w.train("--lr", "fast"), "argument --lr: invalid float value"),
    ("max-new-tokens-0", lambda w: w.eval("--max-new-tokens", "0"), "--max-new-tokens: must be >= 1"),
    ("eval-limit-negative", lambda w: w.eval("--limit", "-1"), "--limit: must be >= 1"),
    ("train-limit-negative", lambda w: w.train("--limit", "-1"), "--limit: must be >= 1"),
    ("shots-negative", lambda w: w.eval("--shots", "-1"), "--shots: must be >= 0"),
    ("stride-0", lambda w: w.eval("--stride", "0"), "--stride: must be >= 1"),
    ("save-every-negative", lambda w: w.train("--save-every", "-1"), "save_every must be >= 0"),
    ("warmup-negative", lambda w: w.train("--warmup-steps", "-5"), "warmup_steps must be >= 0"),
    (
        "lora-rank-huge",
        lambda w: w.compress("--lora-rank", str(10**12)),
        "LoRA rank 1000000000000 exceeds 4 x min(out, in)",
    ),
    ("bench-no-mode", lambda w: ["bench"], "choose a benchmark: --kernel"),
    ("hub-id-offline", lambda w: w.eval(model="myorg/mymodel"), "not a local directory and not in the Hugging Face"),
]


@pytest.fixture(scope="module")
def compressed(stories_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c") / "ckpt"
    argv = ["compress", "--model", str(stories_path), "--residual-rank", "4", "--lora-rank", "2", "--quiet"]
    assert main([*argv, "--output", str(out)]) == 0
    return out


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize("case, build, expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(case, build, expected, stories_path, compressed, tmp_path, capsys,
                                          monkeypatch):  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SALR_CACHE_DIR", str(tmp_path / "cache"))
    ws = Workspace(tmp_path / "ws", stories_path, compressed)
    argv = build(ws)
    before = files_under(ws.dir)
    capsys.readouterr()
    started = time.perf_counter()
    assert run_main(argv) == 2
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "salr convert" not in line]
    assert len(lines) == 1 and lines[0].startswith("salr") and "error:" in lines[0], err
    assert expected in lines[0] and "Traceback" not in err, lines[0]
    assert files_under(ws.dir) == before  # no new files
    assert elapsed < 30


def run_main(argv: list[str]) -> int:
    """Exit code of `salr ARGV` in this process (argparse errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--task", "gsm8k", "--data", "x", "--max-new-tokens", "0"])
    assert info.value.code == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
        (["--budget", "-1"], "argument --budget: must be a finite number >= 0, got -1"),
        (["--shape", "abc"], "argument --shape: shape must look like OUTxIN, e.g. 4096x4096; got 'abc'"),
        (["--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
        (["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
    ],
)
def test_bench_numbers_are_checked_as_usage_errors(flags, expected, capsys):
    """They were accepted (--threads 0, --budget -1) or named an internal function (invalid parse_shape value)."""
    with pytest.raises(SystemExit) as info:
        main(["bench", "--kernel", *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and expected in err and "parse_shape" not in err


def test_lora_rank_flag_reaches_the_config(stories_path, tmp_path):
    out = tmp_path / "D"
    argv = ["compress", "--model", str(stories_path), "--residual-rank", "4", "--lora-rank", "3", "--quiet"]
    assert main([*argv, "--output", str(out)]) == 0
    assert json.loads((out / "salr_report.json").read_text())["config"]["r"] == 3


def test_output_is_refused_before_the_model_is_loaded(stories_path, tmp_path, monkeypatch, capsys):
    import salr.compress

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(salr.compress, "load_model", never)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["compress", "--model", str(stories_path), "--output", str(tmp_path / "mine")]) == 2
    monkeypatch.setattr("os.access", lambda path, mode: not str(path).startswith(str(tmp_path / "ro")))
    (tmp_path / "ro").mkdir()
    assert main(["compress", "--model", str(stories_path), "--output", str(tmp_path / "ro" / "D")]) == 2
    assert "no permission to write in" in capsys.readouterr().err


def test_output_dot_inside_a_checkpoint_replaces_it(stories_path, compressed, tmp_path, monkeypatch):
    shutil.copytree(compressed, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path / "ckpt")
    argv = ["compress", "--model", str(stories_path), "--residual-rank", "2", "--lora-rank", "2", "--quiet"]
    assert main([*argv, "--output", "."]) == 0
    assert json.loads((tmp_path / "ckpt" / "salr_report.json").read_text())["config"]["residual_rank"] == 2
    salr.load(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_disk_full_is_one_line_and_leaves_nothing(stories_path, tmp_path, monkeypatch, capsys):
    import salr.checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(salr.checkpoint, "save_file", full)
    assert (
        main(["compress", "--model", str(stories_path), "--residual-rank", "4", "--output", str(tmp_path / "D")]) == 2
    )
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("salr compress: error: No space left on device:")
    assert list(tmp_path.iterdir()) == []


def test_file_too_large_from_a_real_process_is_one_line_and_leaves_nothing(stories_path, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the big write with EFBIG, as a full quota or file-size limit would."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from salr.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["compress", "--model", str(stories_path), "--residual-rank", "4", "--output", str(tmp_path / "D")]
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("salr compress: error: ") and "File too large" in last and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_hub_id_without_network_fails_fast_in_one_line(tmp_path, monkeypatch):
    """Not offline by configuration: the hub must be found unreachable at once (this machine has no internet; with
    internet the id does not exist and the hub answers 404, also at once). It was 51 s of retries and 46 lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    argv = ["compress", "--model", "myorg/mymodel", "--output", str(tmp_path / "o")]
    result = subprocess.run([sys.executable, "-m", "salr.cli", *argv], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "myorg/mymodel" in lines[0], result.stderr
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.perf_counter()  # timed in this process: interpreter start-up on a loaded machine is not the point
    with pytest.raises(salr.SALRError, match="myorg/mymodel"):
        salr.load_model("myorg/mymodel")
    assert time.perf_counter() - started < 15


def test_a_single_pretty_printed_record_is_one_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}, indent=2))
    assert data.load_sft_records(path) == [{"instruction": "Say hi", "output": "hi", "input": ""}]

"""lm-evaluation-harness tasks (salr/lm_eval_tasks): the prompts and scoring are salr eval's, on the real files, and
`salr eval --harness` on a small model agrees with `salr eval` item by item."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from salr import data, evaluate
from salr.cli import main
from salr.errors import SALRError
from salr.harness import DEFAULT_DATA, TASKS_DIR, cross_check, parse_tasks, run_harness

pytest.importorskip("lm_eval")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
spec = importlib.util.spec_from_file_location("salr_lm_eval_utils", TASKS_DIR / "utils.py")
utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(utils)
CHAT = "<s>{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}\nSolution:{% endif %}"


def test_mmlu_prompts_are_salr_evals_on_the_real_files():
    val, dev = DATA / "mmlu" / "val", DATA / "mmlu" / "dev"
    rows = utils.load_mmlu(data=str(val), dev=str(dev), shots=5)["test"]
    records, shots = data.load_mmlu(val), {}
    for r in data.load_mmlu(dev):
        shots.setdefault(r["subject"], []).append(r)
    assert len(rows) == len(records) == 1542
    for row, r in zip(rows, records, strict=True):
        assert row["prompt"] == evaluate.mmlu_prompt(r["subject"], shots[r["subject"]][:5], r)
        assert "ABCD"[row["label"]] == r["answer"]


def test_gsm8k_answers_are_extracted_as_salr_eval_does():
    rows = utils.load_gsm8k(data=str(DATA / "gsm8k" / "train.jsonl"))["test"]
    records = data.load_gsm8k(DATA / "gsm8k" / "train.jsonl")
    assert len(rows) == len(records) == 7473
    assert rows[17]["question"] == records[17]["question"]
    for r in records:
        assert utils.extract_answer(r["answer"]) == evaluate.extract_answer(r["answer"])
    for text in ["so $1,234.50 in all", "#### 72.0\nQuestion: 5", "no number", "-0", "3 then 4.", "#### x 12"]:
        assert utils.extract_answer(text) == evaluate.extract_answer(text), text


def test_task_yamls_point_at_the_default_files():
    for task, (path, dev) in DEFAULT_DATA.items():
        text = (TASKS_DIR / f"salr_{task}.yaml").read_text()
        assert path in text and (dev is None or dev in text)
        assert f"task: salr_{task}" in text
    with pytest.raises(Exception, match="comma-separated list of gsm8k, mmlu"):
        parse_tasks("gsm8k,hellaswag")


@pytest.fixture
def small(make_tokenizer):
    torch.manual_seed(0)
    tokenizer = make_tokenizer(chat_template=CHAT)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


def _mmlu_dir(root):
    for split, n in (("val", 5), ("dev", 2)):
        (root / split).mkdir(parents=True)
        with open(root / split / f"toy_math_{split}.csv", "w", newline="") as f:
            for i in range(n):
                csv.writer(f).writerow([f"What is {i} plus {i + 1}?", i, 2 * i + 1, i + 2, 7, "B"])
    return root / "val", root / "dev"


def test_harness_agrees_with_salr_eval_item_by_item(small, tmp_path):
    model, tokenizer = small
    gsm = tmp_path / "gsm8k.jsonl"
    records = data.synthetic_arithmetic(4, seed=3)
    gsm.write_text("".join(json.dumps(r) + "\n" for r in records))
    harness = run_harness(model, tokenizer, "gsm8k", gsm, limit=3, max_new_tokens=12)
    assert harness["n"] == 3 and harness["apply_chat_template"]
    check = cross_check(model, tokenizer, "gsm8k", gsm, harness, limit=3, max_new_tokens=12)
    assert check["agree"] == 3 and check["accuracy_equal"]
    ours = evaluate.run_task(model, tokenizer, "gsm8k", gsm, limit=3, batch_size=1, max_new_tokens=12)
    for e, h in zip(ours["examples"], harness["examples"], strict=True):  # the same greedy text, not just answers
        assert evaluate._stop_at(h["generated"]).startswith(e["generated"])
    val, dev = _mmlu_dir(tmp_path / "mmlu")
    harness = run_harness(model, tokenizer, "mmlu", val, dev=dev, shots=2)
    assert harness["n"] == 5
    check = cross_check(model, tokenizer, "mmlu", val, harness, dev=dev, shots=2)
    assert check["agree"] == 5 and check["accuracy_equal"]


def test_salr_eval_harness_cli_checks_its_arguments(tmp_path, capsys):
    assert main(["eval", "--model", "default", "--task", "mmlu", "--harness", "mmlu", "--data", "x"]) == 2
    assert "exactly one of --task" in capsys.readouterr().err
    assert main(["eval", "--harness", "gsm8k,mmlu", "--data", str(tmp_path)]) == 2
    assert "with several --harness tasks" in capsys.readouterr().err
    assert main(["eval", "--harness", "gsm8k", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_generation_budget_longer_than_the_context_is_refused_before_lm_eval_runs(small, tmp_path):
    model, tokenizer = small  # a 1024-token context
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_arithmetic(2, seed=3)))
    with pytest.raises(SALRError, match=r"budget of 1024 new tokens does not fit this model's 1024.*below 1024"):
        run_harness(model, tokenizer, "gsm8k", gsm, limit=1, max_new_tokens=1024)

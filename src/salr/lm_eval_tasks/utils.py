"""Offline lm-evaluation-harness tasks over local GSM8K / MMLU files, prompted and scored exactly as `salr eval`.

Standalone on purpose (standard library + `datasets`, no salr import), so `lm_eval --include_path` works from a
plain lm-eval install. The data files come from the YAML's `dataset_kwargs` (paths relative to the working
directory: the repository root, beside ../shared/data) or, overriding them, from lm-eval's `--metadata`:
`{"data": PATH}` (GSM8K jsonl; MMLU csv file or directory) and, for MMLU, `{"dev": DIR, "shots": K}`.

What must match salr.evaluate (tests/test_harness.py checks it on real files):
- GSM8K: the question is the user message (lm-eval's --apply_chat_template renders it with the tokenizer's
  template, as salr does when the tokenizer has one); the answer is the number after "####", else the last number,
  normalised (`extract_answer`); generation is greedy, cut at "\nQuestion:" / "\n\nQuestion".
- MMLU: the Hendrycks prompt with the first K dev questions of the same subject as shots (built here, so lm-eval's
  own few-shot sampler is not used: num_fewshot 0); the prediction is the letter " A".." D" of highest
  log-likelihood after "Answer:".
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

LETTERS = ("A", "B", "C", "D")
SPLITS = ("_dev.csv", "_val.csv", "_test.csv")
STOP = ("\nQuestion:", "\n\nQuestion")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _dataset(rows: list[dict[str, Any]], split: str) -> Any:
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


# ----------------------------------------------------------------------------- GSM8K


def load_gsm8k(data_files: str | None = None, data: str | None = None, **_: Any) -> Any:
    """custom_dataset: a GSM8K-format JSON list or JSONL file (question, answer) as the `test` split."""
    path = Path(data or data_files)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return _dataset([{"question": r["question"], "answer": r["answer"]} for r in rows], "test")


def normalize_number(text: str) -> str:
    s = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def extract_answer(text: str) -> str | None:
    marker = text.find("####")
    if marker >= 0:
        match = _NUMBER.search(text[marker + 4 :])
        if match:
            return normalize_number(match.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match of the extracted numbers (salr.evaluate.gsm8k's rule)."""
    text = results[0]
    for marker in STOP:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    predicted, gold = extract_answer(text), extract_answer(doc["answer"])
    return {"exact_match": float(predicted is not None and predicted == gold)}


# ----------------------------------------------------------------------------- MMLU


def _mmlu_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SPLITS))


def _subject(path: Path) -> str:
    for suffix in SPLITS:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _read_mmlu(path: Path) -> list[dict[str, Any]]:
    rows = []
    for file in _mmlu_files(path):
        text = file.read_text(encoding="utf-8")  # universal newlines, as salr.data reads it: "\r\n" in a field is "\n"
        for row in csv.reader(io.StringIO(text, newline="")):
            rows.append({"subject": _subject(file), "question": row[0], "choices": row[1:5], "answer": row[5]})
    return rows


def _question(record: dict[str, Any], with_answer: bool) -> str:
    lines = [record["question"].strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, record["choices"], strict=True)]
    lines.append(f"Answer: {record['answer'].strip().upper()}\n\n" if with_answer else "Answer:")
    return "\n".join(lines)


def mmlu_prompt(subject: str, shots: list[dict[str, Any]], record: dict[str, Any]) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(_question(s, True) for s in shots) + _question(record, False)


def load_mmlu(
    data_files: dict[str, str] | None = None, data: str | None = None, dev: str | None = None, shots: int = 5, **_: Any
) -> Any:
    """custom_dataset: MMLU csv (a file or a directory of *_val/_test.csv) as the `test` split, each row with its
    full prompt (`prompt`: the first `shots` dev questions of its subject, then the question) and `label` (0-3)."""
    files = data_files or {}
    eval_path, dev_path = Path(data or files["test"]), Path(dev or files["dev"])
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for r in _read_mmlu(dev_path) if int(shots) > 0 else []:
        by_subject.setdefault(r["subject"], []).append(r)
    rows = []
    for r in _read_mmlu(eval_path):
        prompt = mmlu_prompt(r["subject"], by_subject.get(r["subject"], [])[: int(shots)], r)
        rows.append({"subject": r["subject"], "prompt": prompt, "label": LETTERS.index(r["answer"].strip().upper())})
    return _dataset(rows, "test")

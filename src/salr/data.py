"""Datasets: GSM8K, Alpaca-style instructions, MMLU, plain text; prompt formatting and SFT batching.

Every loader reads a local file (nothing is downloaded) and raises `SALRError` naming the file and
line when the input is malformed, so a bad data file fails in one clear line rather than deep in a
training loop.

Records are plain dicts:
- GSM8K: ``{"question": str, "answer": str}`` (the answer ends in ``#### N``).
- Alpaca: ``{"instruction": str, "input": str, "output": str}``.
- MMLU: ``{"subject": str, "question": str, "choices": [A, B, C, D], "answer": "A".."D"}``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from salr.errors import SALRError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the HF causal-LM loss skips
MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_SPLITS = ("_dev.csv", "_val.csv", "_test.csv")


# ----------------------------------------------------------------------------- readers


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise SALRError(f"{path} is a directory: pass the path of a data file in it")
    if not path.is_file():
        raise SALRError(f"{path}: no such file; pass the path of an existing data file")
    if path.stat().st_size == 0:
        raise SALRError(f"{path}: the file is empty")
    return path


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not content
    except UnicodeDecodeError as err:
        raise SALRError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); is it a binary file?") from err


def _parse_json(text: str, path: Path, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SALRError(f"{path}:{where or err.lineno}: invalid JSON ({err.msg})") from err
    except RecursionError as err:
        raise SALRError(f"{path}:{where or 1}: JSON nested too deeply to be a record") from err


def _read_json_items(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(location, object) pairs of a JSON list or a JSONL file; location is "item N" or the line number. A file that
    is one JSON object spread over several lines is one record."""
    path = _check_file(path)
    text = _read_utf8(path)
    if not text.strip():
        raise SALRError(f"{path}: the file is empty")
    stripped = text.strip()
    if stripped.startswith("["):
        data = _parse_json(text, path, "")
        if not isinstance(data, list):
            raise SALRError(f"{path}: expected a JSON list of records")
        items = [(f"item {i}", item) for i, item in enumerate(data)]
    elif stripped.startswith("{") and "\n" in stripped and not stripped.splitlines()[0].rstrip().endswith("}"):
        data = _parse_json(text, path, "")  # one pretty-printed object, not JSON Lines
        items = [("1", data)]
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((str(lineno), json.loads(line)))
            except json.JSONDecodeError as err:
                msg = f"{path}:{lineno}: invalid JSON ({err.msg}); each line must be one JSON object"
                raise SALRError(msg) from err
            except RecursionError as err:
                raise SALRError(f"{path}:{lineno}: JSON nested too deeply to be a record") from err
    for where, item in items:
        if not isinstance(item, dict):
            raise SALRError(f"{path}:{where}: expected a JSON object, got {type(item).__name__}")
    if not items:
        raise SALRError(f"{path}: no records found")
    return items


def read_json_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Objects of a JSON list or of a JSONL file (one object per line; blank lines are skipped)."""
    return [item for _, item in _read_json_items(path)]


def _load_fields(path: str | os.PathLike, fields: Sequence[str], optional: Sequence[str] = ()) -> list[dict]:
    """Records keeping `fields` (required strings) and `optional` (strings defaulting to "")."""
    out = []
    for where, rec in _read_json_items(path):
        for field in (*fields, *optional):
            value = rec.get(field, "" if field in optional else None)
            if value is None and field in rec:
                raise SALRError(f"{path}:{where}: field {field!r} is null; it must be a string")
            if value is None:
                raise SALRError(f"{path}:{where}: missing field {field!r} (fields present: {sorted(rec)})")
            if not isinstance(value, str):
                raise SALRError(f"{path}:{where}: field {field!r} must be a string, got {type(value).__name__}")
        out.append({field: rec.get(field, "") for field in (*fields, *optional)})
    return out


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SALRError(f"limit must be a positive number of records, got {limit!r}")


def load_gsm8k(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, str]]:
    """GSM8K-format JSON/JSONL: `question` and `answer` (the reference solution ending in ``#### N``)."""
    _check_limit(limit)
    records = _load_fields(path, ("question", "answer"))
    return records[:limit] if limit is not None else records


def load_alpaca(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, str]]:
    """Alpaca-style JSON list or JSONL: `instruction`, `output` and optional `input`."""
    _check_limit(limit)
    records = _load_fields(path, ("instruction", "output"), optional=("input",))
    return records[:limit] if limit is not None else records


def load_sft_records(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, str]]:
    """Fine-tuning data in either GSM8K or Alpaca format, detected from the first record's fields."""
    _check_limit(limit)
    first = read_json_records(path)[0]
    if "question" in first and "answer" in first:
        return load_gsm8k(path, limit)
    if "instruction" in first and "output" in first:
        return load_alpaca(path, limit)
    raise SALRError(
        f"{path}: unknown record format with fields {sorted(first)}; "
        "expected GSM8K (question, answer) or Alpaca (instruction, input, output)"
    )


def mmlu_files(path: str | os.PathLike) -> list[Path]:
    """The MMLU csv files at `path`: the file itself, or every *_dev/_val/_test.csv in the directory, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(MMLU_SPLITS))
        if not files:
            raise SALRError(f"{path}: no MMLU files (*_dev.csv, *_val.csv, *_test.csv) in this directory")
        return files
    raise SALRError(f"{path}: no such file or directory; pass an MMLU csv file or a directory of them")


def mmlu_subject(path: str | os.PathLike) -> str:
    """`abstract_algebra_val.csv` -> `abstract_algebra`."""
    name = Path(path).name
    for suffix in MMLU_SPLITS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def load_mmlu(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """MMLU csv (no header: question, A, B, C, D, answer letter) from a file or a directory of files."""
    _check_limit(limit)
    records: list[dict[str, Any]] = []
    for file in mmlu_files(path):
        _check_file(file)
        subject = mmlu_subject(file)
        text = _read_utf8(file)
        if "\0" in text:
            raise SALRError(f"{file}: contains NUL bytes; is it a binary file?")
        with io.StringIO(text, newline="") as f:
            reader = csv.reader(f)
            try:
                rows = [(reader.line_num, row) for row in reader]  # line where each row ends (quotes span lines)
            except csv.Error as err:
                raise SALRError(f"{file}:{reader.line_num}: not a valid csv file ({err})") from err
        for lineno, row in rows:
            if len(row) != 6:
                raise SALRError(f"{file}:{lineno}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            answer = row[5].strip().upper()
            if answer not in MMLU_LETTERS:
                raise SALRError(f"{file}:{lineno}: answer must be one of A, B, C, D, got {row[5]!r}")
            records.append({"subject": subject, "question": row[0], "choices": row[1:5], "answer": answer})
    if not records:
        raise SALRError(f"{path}: no MMLU questions found")
    return records[:limit] if limit is not None else records


def load_text(path: str | os.PathLike) -> str:
    """A whole plain-text file (e.g. WikiText-2 ``wiki.test.raw``); universal newlines, so CRLF reads as LF."""
    path = _check_file(path)
    text = _read_utf8(path)
    if not text.strip():
        raise SALRError(f"{path}: the file has no text")
    return text


# ----------------------------------------------------------------------------- prompts


def record_prompt_response(record: dict[str, str]) -> tuple[str, str]:
    """(user message, reference response) of a GSM8K or Alpaca record."""
    if "question" in record:
        return record["question"], record["answer"]
    if "instruction" in record:
        message = record["instruction"]
        if record.get("input"):
            message = f"{message}\n\n{record['input']}"
        return message, record["output"]
    raise SALRError(f"record has fields {sorted(record)}; expected question/answer or instruction/output")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, message: str) -> str:
    """The prompt text the model answers: the tokenizer's chat template when it has one, else
    ``"Question: {message}\\nAnswer:"``. The response follows directly (plain format: after a space)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {message}\nAnswer:"


def encode_prompt(tokenizer: Any, message: str) -> list[int]:
    """Token ids of `format_prompt`. A chat template writes its own special tokens; the plain format gets
    whatever the tokenizer adds by default (e.g. BOS for Llama tokenizers)."""
    text = format_prompt(tokenizer, message)
    return list(tokenizer.encode(text, add_special_tokens=not has_chat_template(tokenizer)))


def encode_continuation(tokenizer: Any, context: str, continuation: str) -> list[int]:
    """Token ids of `continuation` as the tokenizer splits it right after `context`.

    Tokenising the continuation on its own can differ from how it is split in running text (e.g.
    SentencePiece adds a word-start marker to every encoded string), so the ids come from encoding
    ``context + continuation`` and dropping the context's ids; when the boundary tokens merge and no
    clean split exists, the continuation is encoded on its own.
    """
    whole = list(tokenizer.encode(context + continuation, add_special_tokens=False))
    head = list(tokenizer.encode(context, add_special_tokens=False))
    if len(whole) > len(head) and whole[: len(head)] == head:
        return whole[len(head) :]
    return list(tokenizer.encode(continuation, add_special_tokens=False))


def encode_example(tokenizer: Any, record: dict[str, str]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a GSM8K/Alpaca record; the response ends with EOS so the model learns
    to stop. In the plain format the response follows "Answer:" after a space."""
    message, response = record_prompt_response(record)
    chat = has_chat_template(tokenizer)
    prompt = encode_prompt(tokenizer, message)
    answer = encode_continuation(tokenizer, format_prompt(tokenizer, message), response if chat else " " + response)
    if tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    return prompt, answer


def build_sft_examples(
    records: Iterable[dict[str, str]], tokenizer: Any, max_length: int
) -> list[dict[str, list[int]]]:
    """Tokenised supervised fine-tuning examples with the loss on the response only.

    Each example is ``{"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}``
    (HF convention: labels are aligned with input_ids, the model shifts them). The ids are the prompt's ids
    followed by the response's (see `encode_example`), so the -100 mask covers exactly the prompt tokens.
    Examples longer than `max_length` lose the end of their response; those whose prompt alone fills
    `max_length` are dropped (nothing to learn) and counted in a warning.
    """
    if max_length < 2:
        raise SALRError(f"max_length must be at least 2, got {max_length}")
    examples, dropped = [], 0
    for record in records:
        prompt, answer = encode_example(tokenizer, record)
        if len(prompt) >= max_length:
            dropped += 1
            continue
        answer = answer[: max_length - len(prompt)]
        examples.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    if dropped:
        logger.warning("dropped %d examples whose prompt alone is >= max_length=%d tokens", dropped, max_length)
    if not examples:
        raise SALRError(f"no training examples fit in max_length={max_length}; raise --max-length")
    return examples


# ----------------------------------------------------------------------------- batching


def collate(
    batch: Sequence[dict[str, Sequence[int]]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors.

    Returns int64 ``input_ids`` [B, T] (padded with `pad_id`), ``attention_mask`` [B, T] (1 = real token)
    and ``labels`` [B, T] (-100 on padding; taken from the examples' "labels" or equal to input_ids).
    T is the longest example, rounded up to `pad_to_multiple_of`.
    """
    if not batch:
        raise SALRError("cannot collate an empty batch")
    longest = max(len(ex["input_ids"]) for ex in batch)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.as_tensor(ex.get("labels", ex["input_ids"]), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int = 0, bucket_factor: int = 50
) -> list[list[int]]:
    """Batches of example indices where each batch holds examples of similar length (less padding).

    Indices are shuffled, cut into chunks of `batch_size * bucket_factor`, each chunk is sorted by length
    and split into batches, and the batch order is shuffled again: random like plain shuffling, but with
    little padding. Deterministic for a given `seed`.
    """
    if batch_size < 1:
        raise SALRError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * max(1, bucket_factor)
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------- synthetic task

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "coins", "cards", "stamps"]


def _fmt(a: int, op: str, b: int, result: int) -> str:
    return f"{a} {op} {b} = <<{a}{op.replace('x', '*')}{b}={result}>>{result}"


def _problem(rng: random.Random) -> dict[str, str]:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:  # add then subtract
        a, b = rng.randint(5, 60), rng.randint(2, 40)
        c = rng.randint(1, a + b - 1)
        s, r = a + b, a + b - c
        question = (
            f"{name} has {a} {item}. {other} gives {name} {b} more, and then {name} loses {c}. "
            f"How many {item} does {name} have now?"
        )
        steps = [
            f"After getting {b} more, {name} has {_fmt(a, '+', b, s)} {item}.",
            f"After losing {c}, {name} has {_fmt(s, '-', c, r)} {item}.",
        ]
    elif kind == 1:  # multiply then add
        a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 30)
        p, r = a * b, a * b + c
        question = (
            f"{name} buys {a} boxes with {b} {item} in each box and already had {c} {item}. "
            f"How many {item} does {name} have in total?"
        )
        steps = [f"The boxes hold {_fmt(a, 'x', b, p)} {item}.", f"In total {name} has {_fmt(p, '+', c, r)} {item}."]
    elif kind == 2:  # share equally
        b, q = rng.randint(2, 9), rng.randint(2, 15)
        a = b * q
        question = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
        steps = [f"Each friend gets {a} / {b} = <<{a}/{b}={q}>>{q} {item}."]
        r = q
    else:  # two people, difference
        a, b = rng.randint(10, 90), rng.randint(1, 9)
        c = a - b
        r = a + c
        question = (
            f"{name} has {a} {item}. {other} has {b} fewer {item} than {name}. How many {item} do they have together?"
        )
        steps = [f"{other} has {_fmt(a, '-', b, c)} {item}.", f"Together they have {_fmt(a, '+', c, r)} {item}."]
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {r}"}


def synthetic_arithmetic(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` templated arithmetic word problems in GSM8K format (``question``, ``answer`` ending in ``#### N``).

    One- or two-step problems over small integers (add, subtract, multiply, divide evenly), fully
    determined by `seed`. The project generates them itself, so the end-to-end demo can fine-tune and
    evaluate without any downloaded data.
    """
    if n < 0:
        raise SALRError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]

"""Evaluation of any `transformers` causal LM (dense, or with SALR layers swapped in): perplexity, GSM8K, MMLU.

All three are built on one primitive, `score_tokens`: batched teacher-forced log-probabilities of chosen
tokens at chosen positions. Generation (GSM8K) uses `model.generate` with left padding and greedy decoding,
and stops each row as soon as its answer is complete (EOS, a stop string, or a ``#### <number>`` line).
Everything runs under `torch.inference_mode()` with the model in eval mode (its training flag is restored).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

from salr import data
from salr.errors import SALRError

logger = logging.getLogger(__name__)

# A scoring request: input ids and, per candidate, the (position, token) pairs whose log-probs are summed.
# Position p means "the logits at input position p", i.e. the prediction of the token at p + 1.
Request = tuple[list[int], list[list[tuple[int, int]]]]


# ----------------------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def context_length(model: torch.nn.Module, cap: int | None = None) -> int:
    """The model's maximum sequence length (config.max_position_embeddings), optionally capped."""
    n = getattr(model.config, "max_position_embeddings", None) or 2048
    return min(n, cap) if cap else n


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def score_tokens(
    model: torch.nn.Module,
    requests: Sequence[Request],
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "scoring",
) -> list[list[float]]:
    """Sum of log p(token | prefix) over each candidate's (position, token) pairs, for every request.

    Requests are right-padded into batches of `batch_size` (padding after the real tokens cannot change a
    causal LM's outputs at earlier positions). Only the logits from the earliest needed position on are
    materialised (`logits_to_keep`, when the model supports it) and the log-softmax is taken in fp32 at
    needed positions only, so long windows with large vocabularies stay cheap in memory.
    Returns one list of floats (natural log) per request, one float per candidate.
    """
    if batch_size < 1:
        raise SALRError(f"batch_size must be >= 1, got {batch_size}")
    device = _device(model)
    keep_supported = _accepts_logits_to_keep(model)
    # Batch requests of similar length together, then restore the order.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    scored: dict[int, list[float]] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=None):
        idx = order[start : start + batch_size]
        batch = data.collate([{"input_ids": requests[i][0]} for i in idx], pad_id)
        width = batch["input_ids"].shape[1]
        first = min(p for i in idx for cand in requests[i][1] for p, _ in cand)
        kwargs = {"logits_to_keep": width - first} if keep_supported else {}
        out = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **kwargs
        )
        logits = out.logits  # [B, width - offset, V]
        offset = width - logits.shape[1]
        for row, i in enumerate(idx):
            cands = requests[i][1]
            flat = [pt for cand in cands for pt in cand]
            pos = torch.tensor([p - offset for p, _ in flat], device=logits.device)
            tok = torch.tensor([t for _, t in flat], device=logits.device)
            logp = F.log_softmax(logits[row, pos].float(), dim=-1).gather(1, tok[:, None]).squeeze(1).tolist()
            sums, k = [], 0
            for cand in cands:
                sums.append(math.fsum(logp[k : k + len(cand)]))
                k += len(cand)
            scored[i] = sums
    return [scored[i] for i in range(len(requests))]


# ----------------------------------------------------------------------------- perplexity


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_new) of each window over a sequence of `n_tokens` tokens.

    A window feeds tokens [begin, end) (at most `max_length`) and scores tokens [first_new, end), the ones
    no earlier window scored. Windows advance by `stride` new tokens, so each scored token sees at least
    ``max_length - stride`` tokens of context (HF's "perplexity of fixed-length models"). Two deliberate
    details: the step is capped at ``max_length - 1`` so that every token after the first is scored (with
    stride == max_length HF's loop silently skips each window's first token), and the last window is
    right-aligned to the end of the text so its tokens get full context. Token 0 is never scored.
    """
    if max_length < 2:
        raise SALRError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise SALRError(f"stride must be between 1 and max_length={max_length}, got {stride}")
    if n_tokens < 2:
        raise SALRError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    step = min(stride, max_length - 1)
    end = min(max_length, n_tokens)
    windows = [(0, end, 1)]
    while end < n_tokens:
        new_end = min(end + step, n_tokens)
        windows.append((max(0, new_end - max_length), new_end, end))
        end = new_end
    return windows


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    max_length: int | None = None,
    stride: int | None = None,
    limit: int | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Token-level perplexity of `text` with a sliding window (see `sliding_windows`).

    The text is tokenised once, without special tokens, with BOS (or EOS when there is no BOS) prepended
    as the first context token so the first word is scored too. Defaults: ``max_length =
    min(model.config.max_position_embeddings, 1024)``, ``stride = max_length // 2``. `limit` scores only the
    first `limit` windows. Returns perplexity = exp(nll), nll = mean negative log-likelihood per scored
    token (nats), tokens (scored), windows, max_length, stride, text_tokens.
    """
    max_length = max_length or context_length(model, cap=1024)
    if max_length > context_length(model):
        raise SALRError(f"max_length={max_length} exceeds the model's context of {context_length(model)} tokens")
    stride = stride or max(1, max_length // 2)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    text_tokens = len(ids)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is not None:
        ids = [prefix] + ids
    windows = sliding_windows(len(ids), max_length, stride)
    if limit is not None:
        if limit < 1:
            raise SALRError(f"limit must be >= 1, got {limit}")
        windows = windows[:limit]
    requests = [(ids[b:e], [[(t - 1 - b, ids[t]) for t in range(new, e)]]) for b, e, new in windows]
    with _eval_mode(model):
        scores = score_tokens(model, requests, batch_size, _pad_id(tokenizer), desc="perplexity")
    n_scored = sum(e - new for _, e, new in windows)
    nll = -math.fsum(s[0] for s in scores) / n_scored
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": n_scored,
        "windows": len(windows),
        "max_length": max_length,
        "stride": stride,
        "text_tokens": text_tokens,
        "prefix_token": prefix is not None,
    }


# ----------------------------------------------------------------------------- GSM8K

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """'$1,234.50' -> '1234.5', '72.0' -> '72', '-3' -> '-3'."""
    s = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def extract_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: the number after ``####``, else the last number in the
    text; normalised with `normalize_number`. None when there is no number."""
    marker = text.find("####")
    if marker >= 0:
        match = _NUMBER.search(text[marker + 4 :])
        if match:
            return normalize_number(match.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


# Where a GSM8K answer is over. Base models in the plain format go on with the next "Question:"; a GSM8K-style
# solution ends with its "#### <number>" line. Generation stops there (`AnswerStop`); `_stop_at` then cuts the
# text before the next question (a row that stopped on a string still contains it).
STOP_STRINGS = ("\nQuestion:", "\n\nQuestion")
_FINAL_ANSWER_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")


def _stop_at(text: str) -> str:
    # Keep the first answer only.
    for marker in STOP_STRINGS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text


class AnswerStop(StoppingCriteria):
    """Stopping criterion for a LEFT-padded batch whose generated tokens start at column `prompt_width`.

    A row is done at EOS (`eos_token_ids`), at a stop string (transformers' `StopStringCriteria`, matched on
    the generated tokens only, so a prompt can never trigger it), or once a GSM8K final-answer line
    ``#### <number>`` is followed by a newline (`final_answer`). ``lengths[i]`` is the number of tokens row
    i generated up to and including the one that finished it (None while it runs). `model.generate` stops
    when every row is done and pads the finished rows until then.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_width: int,
        eos_token_ids: Sequence[int] = (),
        strings: Any = None,
        final_answer: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.width = prompt_width
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.strings = strings  # a transformers StopStringCriteria, or None
        self.final_answer = final_answer
        self.lengths: list[int | None] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        batch, n_new = input_ids.shape[0], input_ids.shape[1] - self.width
        if not self.lengths:
            self.lengths = [None] * batch
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        if n_new <= 0:
            return done
        if self.eos.numel():
            done |= torch.isin(input_ids[:, -1], self.eos.to(input_ids.device))
        new = input_ids[:, self.width :]
        if self.strings is not None:
            done |= self.strings(new, scores).to(done.device)
        if self.final_answer:
            rows = [i for i in range(batch) if self.lengths[i] is None and not done[i]]
            texts = self.tokenizer.batch_decode(new[rows].tolist(), skip_special_tokens=True) if rows else []
            for i, text in zip(rows, texts, strict=True):
                if _FINAL_ANSWER_LINE.search(text):
                    done[i] = True
        for i in range(batch):
            if self.lengths[i] is None and done[i]:
                self.lengths[i] = n_new
        return done


def stop_string_criteria(tokenizer: Any, strings: Sequence[str] = STOP_STRINGS) -> Any:
    """transformers' `StopStringCriteria` for `strings` (built once per call of `generate_greedy_ids`: building
    it reads the whole vocabulary, ~0.5 s for a 49k-token tokenizer)."""
    return StopStringCriteria(tokenizer, list(strings))


def generate_greedy_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    stop: bool = True,
) -> list[list[int]]:
    """Greedy continuations (token ids) of tokenised prompts, batched with LEFT padding.

    With `stop` (the default) each row ends at EOS, at a stop string (`STOP_STRINGS`) or after a GSM8K
    ``#### <number>`` line and its newline, see `AnswerStop`; the batch stops as soon as every row has, and
    each returned list holds the row's tokens up to and including the one that ended it. Without `stop`, only
    EOS ends a row. Never more than `max_new_tokens` tokens per prompt.
    """
    pad = _pad_id(tokenizer)
    device = _device(model)
    eos = tokenizer.eos_token_id
    # A fresh config: plain greedy decoding, whatever sampling defaults the checkpoint ships with.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    strings = stop_string_criteria(tokenizer) if stop else None
    outputs: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", leave=False, disable=None):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
        criterion = AnswerStop(tokenizer, width, [] if eos is None else [eos], strings, final_answer=stop)
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([criterion]),
        )
        new = out[:, width:].tolist()
        lengths = criterion.lengths or [None] * len(chunk)
        outputs += [row if n is None else row[:n] for row, n in zip(new, lengths, strict=True)]
    return outputs


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    stop: bool = True,
) -> list[str]:
    """`generate_greedy_ids`, decoded without special tokens."""
    ids = generate_greedy_ids(model, tokenizer, prompts, max_new_tokens, batch_size, stop)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def complete(model: torch.nn.Module, tokenizer: Any, messages: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to user `messages` in the one prompt format (`data.format_prompt`), one at a time (no padding
    effects), special tokens and surrounding space stripped. Only EOS ends an answer early."""
    prompts = [data.encode_prompt(tokenizer, message) for message in messages]
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size=1, stop=False)
    return [answer.strip() for answer in answers]


def continue_text(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of raw `texts` (no prompt format: for base models such as story generators)."""
    prompts = [list(tokenizer.encode(text)) for text in texts]
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size=1, stop=False)
    return [answer.strip() for answer in answers]


def answer_nll(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[dict[str, str]], batch_size: int = 8
) -> dict[str, float]:
    """Mean per-token negative log-likelihood (nats) of the reference responses given their prompts.

    Teacher-forced, prompt tokens excluded: exactly the loss `build_sft_examples` trains on (the response
    includes its closing EOS). Examples longer than the model's context keep the start of their response.
    """
    examples = data.build_sft_examples(records, tokenizer, context_length(model))
    requests = []
    for ex in examples:
        ids, labels = ex["input_ids"], ex["labels"]
        requests.append((ids, [[(t - 1, ids[t]) for t in range(1, len(ids)) if labels[t] != data.IGNORE_INDEX]]))
    with _eval_mode(model):
        scores = score_tokens(model, requests, batch_size, _pad_id(tokenizer), desc="answer nll")
    n_tokens = sum(len(r[1][0]) for r in requests)
    return {"answer_nll": -math.fsum(s[0] for s in scores) / n_tokens, "answer_tokens": n_tokens}


def gsm8k(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, str]],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    limit: int | None = None,
    with_answer_nll: bool = True,
) -> dict[str, Any]:
    """Zero-shot GSM8K: greedy generation from `data.format_prompt`, exact match on the extracted number.

    Generation stops at each answer's end (see `generate_greedy_ids`). Returns accuracy, correct, n,
    answer_nll and answer_tokens (see `answer_nll`; left out when `with_answer_nll` is False),
    generated_tokens (total over the questions), max_new_tokens, prompt_format and `examples`: per question
    {question, generated, extracted, gold, correct}.
    """
    records = list(records)[:limit] if limit is not None else list(records)
    if not records:
        raise SALRError("no GSM8K records to evaluate")
    context = context_length(model)
    if max_new_tokens > context:
        raise SALRError(
            f"max_new_tokens {max_new_tokens} is more than this model's whole context of {context} tokens: pass "
            "--max-new-tokens below it (GSM8K answers need ~100-300)"
        )
    prompts = [data.encode_prompt(tokenizer, r["question"]) for r in records]
    with _eval_mode(model):
        generated_ids = generate_greedy_ids(model, tokenizer, prompts, max_new_tokens, batch_size)
    generated = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)
    examples = []
    for record, text in zip(records, generated, strict=True):
        text = _stop_at(text)
        extracted, gold = extract_answer(text), extract_answer(record["answer"])
        examples.append(
            {
                "question": record["question"],
                "generated": text,
                "extracted": extracted,
                "gold": gold,
                "correct": extracted is not None and extracted == gold,
            }
        )
    correct = sum(e["correct"] for e in examples)
    return {
        "accuracy": correct / len(examples),
        "correct": correct,
        "n": len(examples),
        **(answer_nll(model, tokenizer, records, batch_size) if with_answer_nll else {}),
        "generated_tokens": sum(len(ids) for ids in generated_ids),
        "max_new_tokens": max_new_tokens,
        "prompt_format": "chat_template" if data.has_chat_template(tokenizer) else "plain",
        "examples": examples,
    }


# ----------------------------------------------------------------------------- MMLU


def _mmlu_question(record: dict[str, Any], with_answer: bool) -> str:
    lines = [record["question"].strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(data.MMLU_LETTERS, record["choices"], strict=True)]
    lines.append(f"Answer: {record['answer']}\n\n" if with_answer else "Answer:")
    return "\n".join(lines)


def mmlu_prompt(subject: str, shots: Sequence[dict[str, Any]], record: dict[str, Any]) -> str:
    """The classic MMLU prompt (Hendrycks et al.): header, `shots` answered examples, then the question."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(_mmlu_question(s, True) for s in shots) + _mmlu_question(record, False)


def _letter_request(tokenizer: Any, prompt: str, budget: int) -> tuple[list[Request], bool]:
    """Scoring requests for the four answer letters after `prompt`; True when the prompt was truncated.

    When the letters share a token prefix and end in one distinct token each (the usual case), a single
    request scores all four at the same position; otherwise each letter gets its own request.
    """
    ids = list(tokenizer.encode(prompt, add_special_tokens=True))
    conts = [data.encode_continuation(tokenizer, prompt, " " + letter) for letter in data.MMLU_LETTERS]
    common = conts[0][:-1]
    single = all(len(c) == len(conts[0]) and c[:-1] == common for c in conts)
    longest = len(common) + 1 if single else max(len(c) for c in conts)
    truncated = len(ids) + longest > budget
    if truncated:  # keep the end: the question itself matters more than the oldest example
        ids = ids[len(ids) + longest - budget :]
    if single:
        ctx = ids + common
        return [(ctx, [[(len(ctx) - 1, c[-1])] for c in conts])], truncated
    requests = []
    for c in conts:
        seq = ids + c
        requests.append((seq, [[(len(ids) + j - 1, c[j]) for j in range(len(c))]]))
    return requests, truncated


def mmlu(
    model: torch.nn.Module,
    tokenizer: Any,
    dev_dir_or_files: str | os.PathLike | Sequence[dict[str, Any]] | None,
    eval_files: str | os.PathLike | Sequence[dict[str, Any]],
    k: int = 5,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """k-shot MMLU: the answer is the letter " A".." D" with the highest log-likelihood after "Answer:".

    The k shots are the first k dev questions of the same subject. A prompt that does not fit the model's
    context drops shots one at a time (as the original MMLU code does) and, with none left, keeps its last
    tokens. `dev_dir_or_files` / `eval_files` are a csv file, a directory of them, or loaded records;
    `limit` takes the first N eval questions. Returns accuracy (micro: over questions), macro_accuracy (mean
    over subjects), n, k, subjects {name: {accuracy, correct, n}}, shots_dropped, truncated and per-question
    `examples` {subject, gold, predicted, correct}.
    """
    records = data.load_mmlu(eval_files) if isinstance(eval_files, str | os.PathLike) else list(eval_files)
    records = records[:limit] if limit is not None else records
    if not records:
        raise SALRError("no MMLU questions to evaluate")
    dev: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if k > 0:
        if dev_dir_or_files is None:
            raise SALRError("k-shot MMLU needs the dev split: pass the dev directory (or use k=0)")
        dev_records = (
            data.load_mmlu(dev_dir_or_files)
            if isinstance(dev_dir_or_files, str | os.PathLike)
            else list(dev_dir_or_files)
        )
        for r in dev_records:
            dev[r["subject"]].append(r)
        missing = sorted({r["subject"] for r in records} - set(dev))
        if missing:
            raise SALRError(f"no dev examples for subject(s) {', '.join(missing)}; pass a dev split covering them")
        short = sorted(subject for subject in {r["subject"] for r in records} if len(dev[subject]) < k)
        if short:  # the report would say k-shot while the prompts held fewer
            fewest = min(len(dev[subject]) for subject in short)
            raise SALRError(
                f"{k}-shot MMLU: subject(s) {', '.join(short[:3])}{' ...' if len(short) > 3 else ''} have only "
                f"{fewest} dev questions; pass --shots {fewest} or fewer (MMLU's dev split has 5 per subject)"
            )
    budget = context_length(model)
    requests: list[Request] = []
    spans, shots_dropped, n_truncated = [], 0, 0
    for r in records:
        shots = dev[r["subject"]][:k]
        while True:
            prompt = mmlu_prompt(r["subject"], shots, r)
            if not shots or len(tokenizer.encode(prompt, add_special_tokens=True)) + 4 <= budget:
                break
            shots, shots_dropped = shots[:-1], shots_dropped + 1
        reqs, truncated = _letter_request(tokenizer, prompt, budget)
        n_truncated += truncated
        spans.append((len(requests), len(reqs)))
        requests += reqs
    with _eval_mode(model):
        scores = score_tokens(model, requests, batch_size, _pad_id(tokenizer), desc="mmlu")
    examples, per_subject = [], defaultdict(lambda: [0, 0])
    for r, (start, count) in zip(records, spans, strict=True):
        letter_scores = [s for req in scores[start : start + count] for s in req]
        predicted = data.MMLU_LETTERS[max(range(4), key=letter_scores.__getitem__)]
        correct = predicted == r["answer"]
        per_subject[r["subject"]][0] += correct
        per_subject[r["subject"]][1] += 1
        examples.append({"subject": r["subject"], "gold": r["answer"], "predicted": predicted, "correct": correct})
    subjects = {s: {"accuracy": c / n, "correct": c, "n": n} for s, (c, n) in sorted(per_subject.items())}
    correct = sum(e["correct"] for e in examples)
    return {
        "accuracy": correct / len(examples),
        "macro_accuracy": sum(v["accuracy"] for v in subjects.values()) / len(subjects),
        "correct": correct,
        "n": len(examples),
        "k": k,
        "subjects": subjects,
        "shots_dropped": shots_dropped,
        "truncated": n_truncated,
        "examples": examples,
    }


# ----------------------------------------------------------------------------- one entry point

TASKS = ("wikitext2", "gsm8k", "mmlu", "answer-nll")


def run_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str,
    data_path: str | os.PathLike,
    dev: str | os.PathLike | None = None,
    k: int = 5,
    limit: int | None = None,
    batch_size: int = 4,
    max_length: int | None = None,
    stride: int | None = None,
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    """Load the data for `task` and evaluate: what `salr eval` runs. `limit` counts windows for wikitext2
    (any plain-text file), questions for gsm8k and mmlu, records (GSM8K or Alpaca) for answer-nll."""
    if task == "wikitext2":
        text = data.load_text(data_path)
        return perplexity(model, tokenizer, text, max_length, stride, limit, batch_size)
    if task == "gsm8k":
        records = data.load_gsm8k(data_path, limit)
        return gsm8k(model, tokenizer, records, batch_size, max_new_tokens)
    if task == "mmlu":
        return mmlu(model, tokenizer, dev, data_path, k, limit, batch_size)
    if task == "answer-nll":  # teacher-forced, no generation: the metric salr train --eval-data logs
        records = data.load_sft_records(data_path, limit)
        return {**answer_nll(model, tokenizer, records, batch_size), "n": len(records)}
    raise SALRError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")

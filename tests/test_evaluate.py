"""Perplexity windows, GSM8K generation/extraction/answer NLL, MMLU letter scoring, the `salr eval` command."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from salr import data, evaluate
from salr.errors import SALRError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES = DATA / "models" / "stories260K" / "stories260K.bin"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
GSM8K = DATA / "gsm8k" / "train.jsonl"
MMLU = DATA / "mmlu"

TEXT = (
    "Ava has 12 apples. Ben gives Ava 7 more, and then Ava loses 3. How many apples does Ava have now? "
    "The boxes hold 3 x 9 = 27 shells. In total Hiro has 27 + 4 = 31 shells."
)


@pytest.fixture(scope="module")
def tokenizer(make_tokenizer) -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def stories():
    from salr.loaders import load_model

    return load_model(str(STORIES))


def token_logprobs(model, ids: list[int]) -> list[float]:
    """[log p(ids[t] | ids[:t]) for t >= 1] from one unbatched, unpadded forward pass; index t - 1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return F.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_is_exp_mean_nll_by_hand(model, tokenizer):
    ids = [tokenizer.bos_token_id] + tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) <= 128
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = -F.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    out = evaluate.perplexity(model, tokenizer, TEXT, max_length=128)
    assert out["tokens"] == len(ids) - 1 == out["text_tokens"]
    assert out["windows"] == 1
    assert out["nll"] == pytest.approx(nll, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    # The same number as the HF loss of the whole sequence.
    with torch.no_grad():
        hf_loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert out["nll"] == pytest.approx(hf_loss, rel=1e-5)


@pytest.mark.parametrize(("max_length", "stride", "batch_size"), [(16, 16, 3), (16, 5, 4), (20, 19, 1)])
def test_sliding_window_perplexity_matches_per_token_reference(model, tokenizer, max_length, stride, batch_size):
    ids = [tokenizer.bos_token_id] + tokenizer.encode(TEXT, add_special_tokens=False)
    windows = evaluate.sliding_windows(len(ids), max_length, stride)
    # Reference: one unpadded forward pass per window, reading the new tokens' log-probs.
    total = -sum(sum(token_logprobs(model, ids[b:e])[new - b - 1 :]) for b, e, new in windows)
    out = evaluate.perplexity(model, tokenizer, TEXT, max_length=max_length, stride=stride, batch_size=batch_size)
    assert out["tokens"] == len(ids) - 1
    assert out["windows"] == len(windows)
    assert out["nll"] == pytest.approx(total / out["tokens"], rel=1e-5)


@pytest.mark.parametrize(("n", "max_length", "stride"), [(100, 16, 16), (100, 16, 8), (100, 16, 1), (7, 16, 8)])
def test_sliding_windows_score_every_token_once_with_context(n, max_length, stride):
    windows = evaluate.sliding_windows(n, max_length, stride)
    scored = [t for _, e, new in windows for t in range(new, e)]
    assert scored == list(range(1, n))  # each token after the first exactly once, in order
    for b, e, new in windows:
        assert 0 <= b < new <= e and e - b <= max_length  # b < new: every scored token has context
    # stride < max_length: each scored token sees at least max_length - stride tokens (when the text has them).
    if stride < max_length:
        for b, e, new in windows:
            for t in range(new, e):
                assert t - b >= min(t, max_length - stride)


def test_stride_equal_and_smaller_agree_on_token_count_and_limit(model, tokenizer):
    full = evaluate.perplexity(model, tokenizer, TEXT, max_length=16, stride=16)
    half = evaluate.perplexity(model, tokenizer, TEXT, max_length=16, stride=8)
    assert full["tokens"] == half["tokens"] == full["text_tokens"]
    assert half["windows"] > full["windows"] > 1
    limited = evaluate.perplexity(model, tokenizer, TEXT, max_length=16, stride=8, limit=2)
    assert limited["windows"] == 2
    assert limited["tokens"] == 15 + 8  # first window scores 15 tokens, the next 8 new ones
    default = evaluate.perplexity(model, tokenizer, TEXT)
    assert (default["max_length"], default["stride"]) == (256, 128)  # min(256 positions, 1024), half of it


def test_perplexity_rejects_bad_settings(model, tokenizer):
    with pytest.raises(SALRError, match="exceeds the model's context"):
        evaluate.perplexity(model, tokenizer, TEXT, max_length=512)
    with pytest.raises(SALRError, match="stride"):
        evaluate.perplexity(model, tokenizer, TEXT, max_length=16, stride=17)
    with pytest.raises(SALRError, match="at least 2"):
        evaluate.perplexity(
            model, SimpleNamespace(encode=lambda *a, **k: [], bos_token_id=None, eos_token_id=None), ""
        )


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 48 + 24 = 72.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("The answer is $1,000.", "1000"),
        ("It costs $18.50 in total", "18.5"),
        ("first 3 then 5.0", "5"),
        ("#### -7\nand later 99", "-7"),
        ("no number here", None),
        ("3 apples then 10 pears. Question: 12", "12"),
        ("#### \n answer 4", "4"),
    ],
)
def test_extract_answer(text, expected):
    assert evaluate.extract_answer(text) == expected


def test_left_padded_batched_generation_equals_unbatched(model, tokenizer):
    prompts = [data.encode_prompt(tokenizer, r["question"]) for r in data.synthetic_arithmetic(5, seed=2)]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so padding happens
    with torch.inference_mode():
        batched = evaluate.generate_greedy(model, tokenizer, prompts, max_new_tokens=12, batch_size=5)
        single = [evaluate.generate_greedy(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) > 0 for t in batched)


class ScriptedLlama(LlamaForCausalLM):
    """A tiny Llama whose greedy output is scripted: row i of the batch generates scripts[i][k] at step k.

    Real forward passes (so `generate`'s cache and padding machinery runs as usual) with the logits replaced;
    `calls` counts the forward passes, one per generated token.
    """

    def __init__(self, config: LlamaConfig, scripts: list[list[int]]):
        super().__init__(config)
        self.scripts, self.calls = scripts, 0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        logits = torch.zeros_like(out.logits)
        for row, script in enumerate(self.scripts):
            logits[row, -1, script[self.calls]] = 10.0
        self.calls += 1
        out.logits = logits
        return out


def scripted(tokenizer, rows: list[list[str | int]], max_new_tokens: int) -> tuple[ScriptedLlama, list[int]]:
    """A ScriptedLlama for `rows` (pieces: text encoded on its own, or a token id) and, per row, how many tokens
    generation should keep: every piece up to and including the one marked by a following "|" entry."""
    scripts, stops = [], []
    filler = tokenizer.encode(" and so on", add_special_tokens=False)
    for pieces in rows:
        ids, stop = [], None
        for piece in pieces:
            if piece == "|":
                stop = len(ids)
            else:
                ids += [piece] if isinstance(piece, int) else tokenizer.encode(piece, add_special_tokens=False)
        while len(ids) <= max_new_tokens:
            ids += filler
        scripts.append(ids)
        stops.append(stop)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    return ScriptedLlama(config, scripts).eval(), stops


@pytest.mark.parametrize("kind", ["bpe", "stories"])
def test_generation_stops_early_at_answer_end(kind, request):
    tok = request.getfixturevalue("tokenizer") if kind == "bpe" else request.getfixturevalue("stories")[1]
    max_new = 40
    rows = [
        [" 3 + 4 = 7.", "\n#### 7\n", "|", "Question: What is 2 + 2?\nAnswer: 4"],  # final-answer line
        [" 12 apples", "\nQuestion:", "|", " How many pears?"],  # stop string (plain format)
        [" 5 apples", tok.eos_token_id, "|", " and 99 more"],  # EOS
        [" 8 pears.", "\n\nQuestion", "|", ": next"],  # the other stop string
    ]
    model, stops = scripted(tok, rows, max_new)
    prompts = [tok.encode(q) for q in ("Question: a?\nAnswer:", "Question: b b?\nAnswer:", "Q", "Question: d")]
    ids = evaluate.generate_greedy_ids(model, tok, prompts, max_new_tokens=max_new, batch_size=4)
    assert [len(r) for r in ids] == stops  # each row ends exactly at the token that completes its answer
    assert ids == [script[:n] for script, n in zip(model.scripts, stops, strict=True)]
    assert model.calls == max(stops) < max_new  # the batch stopped when its last row was done
    # The texts: the stop string is still there and `_stop_at` removes it; the answer line is kept.
    model.calls = 0
    texts = evaluate.generate_greedy(model, tok, prompts, max_new_tokens=max_new, batch_size=4)
    assert texts[0].endswith("#### 7\n") and evaluate.extract_answer(texts[0]) == "7"
    assert texts[1].endswith("\nQuestion:") and evaluate._stop_at(texts[1]).strip() == "12 apples"
    assert texts[2].strip() == "5 apples"
    assert texts[3].endswith("\n\nQuestion") and evaluate._stop_at(texts[3]).strip() == "8 pears."
    # Without stop strings only EOS ends a row: the batch runs to max_new_tokens.
    model.calls = 0
    plain = evaluate.generate_greedy_ids(model, tok, prompts, max_new_tokens=max_new, batch_size=4, stop=False)
    assert [len(r) for r in plain] == [max_new, max_new, stops[2], max_new]
    assert model.calls == max_new


def test_generation_stops_per_batch_and_runs_to_the_limit_without_a_stop(tokenizer):
    rows = [[" 6 + 1 = 7\n#### 7\n", "|", "more"], [" 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16"]]
    model, stops = scripted(tokenizer, rows, 20)
    prompts = [tokenizer.encode("Question: x?\nAnswer:")] * 2
    # One batch: the row that never stops keeps the batch going to max_new_tokens; the finished row is cut.
    ids = evaluate.generate_greedy_ids(model, tokenizer, prompts, max_new_tokens=20, batch_size=2)
    assert [len(r) for r in ids] == [stops[0], 20]
    assert model.calls == 20


def test_answer_stop_on_crafted_token_ids(tokenizer, stories):
    for tok in (tokenizer, stories[1]):
        prompt = tok.encode("Question: #### 5\nQuestion: 1 + 1?\nAnswer:", add_special_tokens=False)
        strings = evaluate.stop_string_criteria(tok)

        def first_stop(text: str, tok=tok, prompt=prompt, strings=strings) -> int | None:
            """The number of generated tokens at which AnswerStop first fires on `text`, stepping token by token."""
            new = tok.encode(text, add_special_tokens=False)
            crit = evaluate.AnswerStop(tok, len(prompt), [tok.eos_token_id], strings)
            for n in range(len(new) + 1):
                if crit(torch.tensor([prompt + new[:n]]), None)[0]:
                    assert crit.lengths == [n]
                    return n
            assert crit.lengths == [None]
            return None

        def n_tokens(text: str, tok=tok) -> int:
            return len(tok.encode(text, add_special_tokens=False))

        # The prompt holds "#### 5\n" and "\nQuestion:" but only generated tokens count.
        assert first_stop(" 2 apples") is None
        assert first_stop(" so 2\n#### 2") is None  # no newline after the answer yet
        assert first_stop(" so 2\n####\nthen") is None  # a "####" line without a number
        assert first_stop(" so 2\nQuestion") is None  # no colon: not a stop string
        assert first_stop(" so 2\n#### 2\nmore text") == n_tokens(" so 2\n#### 2\n")
        assert first_stop(" so 2\n#### $1,200.50\nmore") == n_tokens(" so 2\n#### $1,200.50\n")
        assert first_stop(" so 2\nQuestion: 3?") == n_tokens(" so 2\nQuestion:")
        assert first_stop(" so 2\n\nQuestion 3") == n_tokens(" so 2\n\nQuestion")
    # Rows of a batch are judged separately; EOS ends a row.
    eos = tokenizer.eos_token_id
    a = tokenizer.encode(" 1\n#### 1\n", add_special_tokens=False)
    b = tokenizer.encode(" 1 2 3 4", add_special_tokens=False)[: len(a) - 1] + [eos]
    c = tokenizer.encode(" 1 2 3 4 5 6 7 8 9", add_special_tokens=False)[: len(a)]
    crit = evaluate.AnswerStop(tokenizer, 2, [eos], evaluate.stop_string_criteria(tokenizer))
    done = crit(torch.tensor([[9, 9, *a], [9, 9, *b], [9, 9, *c]]), None)
    assert done.tolist() == [True, True, False]
    assert crit.lengths == [len(a), len(a), None]


def test_answer_nll_by_hand(model, tokenizer):
    records = data.synthetic_arithmetic(3, seed=4)
    total, count = 0.0, 0
    for r in records:
        prompt, answer = data.encode_example(tokenizer, r)
        ids = prompt + answer
        total -= sum(token_logprobs(model, ids)[len(prompt) - 1 :])
        count += len(answer)
    out = evaluate.answer_nll(model, tokenizer, records, batch_size=2)
    assert out["answer_tokens"] == count
    assert out["answer_nll"] == pytest.approx(total / count, rel=1e-5)


def test_gsm8k_scores_extracted_numbers(model, tokenizer, monkeypatch):
    records = data.synthetic_arithmetic(3, seed=6)
    golds = [r["answer"].rsplit("#### ", 1)[1] for r in records]
    replies = [f"so it is {golds[0]}.", f"#### {golds[1]}\nQuestion: next one is 99999", "I think 99999"]
    reply_ids = [tokenizer.encode(r, add_special_tokens=False) for r in replies]
    monkeypatch.setattr(evaluate, "generate_greedy_ids", lambda model, tok, prompts, *a: reply_ids[: len(prompts)])
    out = evaluate.gsm8k(model, tokenizer, records, batch_size=2, max_new_tokens=8)
    assert out["generated_tokens"] == sum(len(ids) for ids in reply_ids)
    assert [e["correct"] for e in out["examples"]] == [True, True, False]
    assert out["accuracy"] == pytest.approx(2 / 3) and out["n"] == 3
    assert out["examples"][1]["generated"] == f"#### {golds[1]}"  # cut at the next "Question:"
    assert out["examples"][2]["extracted"] == "99999" and out["examples"][2]["gold"] == golds[2]
    assert out["answer_nll"] == pytest.approx(evaluate.answer_nll(model, tokenizer, records)["answer_nll"])
    assert evaluate.gsm8k(model, tokenizer, records, limit=1)["n"] == 1
    assert "answer_nll" not in evaluate.gsm8k(model, tokenizer, records, with_answer_nll=False)


# ----------------------------------------------------------------------------- MMLU


class LetterModel(torch.nn.Module):
    """A stand-in causal LM whose next-token logits always favour `token`; records the inputs it sees."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.token, self.seen = vocab, token, []

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        self.seen.append(input_ids)
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 5.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def mmlu_rows(subject: str, answers: str) -> list[dict]:
    return [
        {"subject": subject, "question": f"Q{i} of {subject}?", "choices": ["w", "x", "y", "z"], "answer": a}
        for i, a in enumerate(answers)
    ]


def test_mmlu_prompt_format():
    shots = mmlu_rows("college_physics", "B")
    prompt = evaluate.mmlu_prompt("college_physics", shots, mmlu_rows("college_physics", "CD")[1])
    assert prompt == (
        "The following are multiple choice questions (with answers) about college physics.\n\n"
        "Q0 of college_physics?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
        "Q1 of college_physics?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    )


def test_mmlu_picks_the_most_likely_letter_micro_and_macro(tokenizer):
    letter_c = data.encode_continuation(tokenizer, "Answer:", " C")  # [" ", "C"]: shared prefix, distinct last token
    stub = LetterModel(len(tokenizer), letter_c[-1])
    rows = mmlu_rows("algebra", "CCAB") + mmlu_rows("history", "CD")
    dev = mmlu_rows("algebra", "ABCDA") + mmlu_rows("history", "DCBAD")
    out = evaluate.mmlu(stub, tokenizer, dev, rows, k=2, batch_size=4)
    assert [e["predicted"] for e in out["examples"]] == ["C"] * 6
    assert out["correct"] == 3 and out["accuracy"] == pytest.approx(3 / 6)
    assert out["subjects"]["algebra"] == {"accuracy": 0.5, "correct": 2, "n": 4}
    assert out["subjects"]["history"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    assert out["macro_accuracy"] == pytest.approx(0.5)
    # Two shots from the subject's own dev examples appear in the prompt.
    prompts = [tokenizer.decode(row, skip_special_tokens=True) for batch in stub.seen for row in batch]
    assert len(prompts) == 6 and all(p.count("Answer:") == 3 for p in prompts)
    algebra = [p for p in prompts if "about algebra" in p]
    history = [p for p in prompts if "about history" in p]
    assert len(algebra) == 4 and all("Answer: A\n\nQ1 of algebra?" in p and "Answer: B\n\n" in p for p in algebra)
    assert len(history) == 2 and all("Answer: D\n\nQ1 of history?" in p and "Answer: C\n\n" in p for p in history)
    with pytest.raises(SALRError, match="no dev examples for subject"):
        evaluate.mmlu(stub, tokenizer, dev[:5], rows, k=2)
    with pytest.raises(SALRError, match=r"6-shot MMLU: subject\(s\) algebra, history have only 5 dev questions"):
        evaluate.mmlu(stub, tokenizer, dev, rows, k=6)  # it reported "6-shot" for prompts holding 5


def test_mmlu_matches_letter_logprobs_by_hand(model, tokenizer):
    rows = mmlu_rows("algebra", "ABCD")
    dev = mmlu_rows("algebra", "DCBAD")
    out = evaluate.mmlu(model, tokenizer, dev, rows, k=1, batch_size=3)
    for row, ex in zip(rows, out["examples"], strict=True):
        prompt = evaluate.mmlu_prompt("algebra", dev[:1], row)
        ids = tokenizer.encode(prompt)
        scores = []
        for letter in "ABCD":
            cont = data.encode_continuation(tokenizer, prompt, " " + letter)
            seq = ids + cont
            scores.append(sum(token_logprobs(model, seq)[len(ids) - 1 :]))
        assert ex["predicted"] == "ABCD"[max(range(4), key=scores.__getitem__)]
    assert out["accuracy"] == sum(e["correct"] for e in out["examples"]) / 4


# ----------------------------------------------------------------------------- real model: stories260K


def test_stories_mmlu_multi_token_letters_by_hand(stories):
    model, tok = stories
    rows = data.load_mmlu(MMLU / "val" / "astronomy_val.csv", limit=3)
    prompt = evaluate.mmlu_prompt("astronomy", [], rows[0])
    conts = [data.encode_continuation(tok, prompt, " " + letter) for letter in "ABCD"]
    assert max(len(c) for c in conts) > 1  # this tokenizer splits some letters into two tokens
    out = evaluate.mmlu(model, tok, None, rows, k=0)
    for row, ex in zip(rows, out["examples"], strict=True):
        prompt = evaluate.mmlu_prompt("astronomy", [], row)
        ids = tok.encode(prompt)
        scores = []
        for letter in "ABCD":
            seq = ids + data.encode_continuation(tok, prompt, " " + letter)
            scores.append(sum(token_logprobs(model, seq)[len(ids) - 1 :]))
        assert ex["predicted"] == "ABCD"[max(range(4), key=scores.__getitem__)]


def test_stories_batched_generation_and_perplexity(stories):
    model, tok = stories
    story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    prompts = [tok.encode(s) for s in (story, "Once upon a time", "Tom had a red ball. He")]
    batched = evaluate.generate_greedy(model, tok, prompts, max_new_tokens=10, batch_size=3)
    single = [evaluate.generate_greedy(model, tok, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == single
    # A TinyStories model finds a children's story far more predictable than Wikipedia.
    ppl_story = evaluate.perplexity(model, tok, story * 3)["perplexity"]
    ppl_wiki = evaluate.perplexity(model, tok, data.load_text(WIKITEXT)[:2000])["perplexity"]
    assert ppl_story < 10 < ppl_wiki


def run_cli(argv: list[str]) -> int:
    from salr.commands import eval as eval_command

    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers())
    args = parser.parse_args(["eval", *argv])
    args.verbose = False
    return args.func(args)


def test_eval_command_writes_report_and_pruning_hurts(tmp_path, capsys):
    common = ["--model", str(STORIES), "--task", "wikitext2", "--data", str(WIKITEXT), "--limit", "2"]
    assert run_cli([*common, "--json", str(tmp_path / "dense.json")]) == 0
    naive_args = [
        "--preset",
        "paper",
        "--sparsity",
        "0.5",
        "--residual-rank",
        "0",
        "--json",
        str(tmp_path / "naive.json"),
    ]
    assert run_cli([*common, *naive_args]) == 0
    dense = json.loads((tmp_path / "dense.json").read_text())
    naive = json.loads((tmp_path / "naive.json").read_text())
    assert dense["task"] == "wikitext2" and dense["model"] == str(STORIES) and dense["limit"] == 2
    assert dense["data"] == str(WIKITEXT) and dense["pruning"] is None
    m = dense["metrics"]
    assert m["windows"] == 2 and m["max_length"] == 512 and m["stride"] == 256 and m["tokens"] == 511 + 256
    assert m["perplexity"] == pytest.approx(math.exp(m["nll"]))
    assert naive["pruning"]["sparsity"] == 0.5 and naive["pruning"]["residual_rank"] == 0
    assert naive["metrics"]["perplexity"] > 1.2 * m["perplexity"]
    assert "perplexity" in capsys.readouterr().out


def test_eval_command_gsm8k_and_mmlu_reports(tmp_path):
    out = tmp_path / "g.json"
    gsm8k_args = ["--task", "gsm8k", "--data", str(GSM8K), "--limit", "2", "--max-new-tokens", "4"]
    assert run_cli(["--model", str(STORIES), *gsm8k_args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["n"] == 2 and len(report["examples"]) == 2
    assert report["metrics"]["answer_nll"] > 0
    assert set(report["examples"][0]) == {"question", "generated", "extracted", "gold", "correct"}
    out = tmp_path / "m.json"
    mmlu_args = ["--task", "mmlu", "--data", str(MMLU / "val" / "anatomy_val.csv"), "--limit", "3", "--shots", "1"]
    assert run_cli(["--model", str(STORIES), *mmlu_args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dev"] == str(MMLU / "dev")  # found beside the val split
    assert report["metrics"]["n"] == 3 and report["metrics"]["k"] == 1
    assert list(report["metrics"]["subjects"]) == ["anatomy"]


def test_eval_command_user_errors(tmp_path):
    with pytest.raises(SALRError, match="no such file"):
        run_cli(["--model", str(STORIES), "--task", "gsm8k", "--data", str(tmp_path / "missing.jsonl")])
    lonely = tmp_path / "x_val.csv"
    lonely.write_text("Q,a,b,c,d,A\n")
    with pytest.raises(SALRError, match="--dev"):
        run_cli(["--model", str(STORIES), "--task", "mmlu", "--data", str(lonely)])

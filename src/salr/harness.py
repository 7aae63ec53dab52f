"""`salr eval --harness`: lm-evaluation-harness 0.4.x on a salr model, offline, with the task YAMLs in
salr/lm_eval_tasks (local GSM8K / MMLU files, the prompts and scoring of `salr eval`).

The model is handed to lm-eval in process (its `HFLM` wraps any transformers model object), so SALR checkpoints,
exported pairs and plain model directories all run without writing anything. The same tasks run from the lm_eval
command line over exported files (docs/export.md). lm-eval is the optional extra `salr[harness]`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from salr import data
from salr.errors import SALRError
from salr.evaluate import context_length

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
HARNESS_TASKS = {"gsm8k": "salr_gsm8k", "mmlu": "salr_mmlu"}
LM_EVAL_VERSION = "0.4.13"
# The files the task YAMLs point at (dataset_kwargs), relative to the repository root: (data, MMLU dev split).
DEFAULT_DATA = {
    "gsm8k": ("../shared/data/gsm8k/train.jsonl", None),
    "mmlu": ("../shared/data/mmlu/val", "../shared/data/mmlu/dev"),
}


def parse_tasks(spec: str) -> list[str]:
    """'gsm8k,mmlu' -> ['gsm8k', 'mmlu']; SALRError naming the known tasks otherwise."""
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in HARNESS_TASKS]
    if not tasks or unknown:
        raise SALRError(f"--harness takes a comma-separated list of {', '.join(HARNESS_TASKS)}, got {spec!r}")
    return tasks


def _lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - fails early when the hf backend is broken
    except ImportError as err:
        raise SALRError(f"salr eval --harness needs lm-eval: pip install 'salr[harness]' ({err})") from err
    return lm_eval


def task_metadata(task: str, data_path: str | os.PathLike, dev: str | os.PathLike | None, shots: int) -> dict:
    """lm-eval `metadata` the task's custom dataset reads (absolute paths: lm-eval may change directory)."""
    meta: dict[str, Any] = {"data": str(Path(data_path).resolve())}
    if task == "mmlu":
        meta["shots"] = shots
        if shots > 0:
            if dev is None:
                raise SALRError("MMLU few-shot examples need --dev DIR (the dev split), or pass --shots 0")
            meta["dev"] = str(Path(dev).resolve())
    return meta


def run_harness(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str,
    data_path: str | os.PathLike,
    dev: str | os.PathLike | None = None,
    shots: int = 5,
    limit: int | None = None,
    batch_size: int = 1,
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    """Run one task (`gsm8k` or `mmlu`) through lm-eval; returns accuracy, n, seconds, the lm-eval version and
    per-item `examples` (GSM8K: the generated text; MMLU: the predicted letter) for cross-checks with salr eval."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    name = HARNESS_TASKS[task]
    context = context_length(model)
    if task == "gsm8k" and max_new_tokens >= context:
        raise SALRError(
            f"lm-eval generates fewer tokens than the model's context: GSM8K's budget of {max_new_tokens} new tokens "
            f"does not fit this model's {context}; pass --max-new-tokens below {context}"
        )
    device = next(model.parameters()).device
    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
        max_length=context,
    )  # fmt: skip
    # the metadata reaches the task's custom dataset through the TaskManager (simple_evaluate's own `metadata`
    # is only used when it builds the manager itself)
    metadata = task_metadata(task, data_path, dev, shots)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    chat = task == "gsm8k" and data.has_chat_template(tokenizer)  # salr eval's rule for GSM8K prompts
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[name],
        limit=limit,
        task_manager=manager,
        apply_chat_template=chat,
        gen_kwargs={"max_gen_toks": max_new_tokens, "do_sample": False} if task == "gsm8k" else None,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=0,
    )
    seconds = time.perf_counter() - started
    if results is None:
        raise SALRError("lm-eval returned no results")
    metric = "exact_match,none" if task == "gsm8k" else "acc,none"
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    if task == "gsm8k":
        examples = [{"generated": s["resps"][0][0], "correct": bool(s["exact_match"])} for s in samples]
    else:
        examples = [
            {
                "predicted": "ABCD"[max(range(4), key=lambda i, s=s: float(s["resps"][i][0][0]))],
                "correct": bool(s["acc"]),
            }
            for s in samples
        ]
    correct = sum(e["correct"] for e in examples)
    return {
        "harness": f"lm-eval {lm_eval.__version__}",
        "task": name,
        "accuracy": float(results["results"][name][metric]),
        "correct": correct,
        "n": len(examples),
        "apply_chat_template": chat,
        "seconds": seconds,
        "examples": examples,
    }


def cross_check(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str,
    data_path: str | os.PathLike,
    harness: dict[str, Any],
    dev: str | os.PathLike | None = None,
    shots: int = 5,
    limit: int | None = None,
    batch_size: int = 1,
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    """salr eval on the items lm-eval saw (`harness` from run_harness): its accuracy and time, and how many items
    agree (GSM8K: the same extracted answer; MMLU: the same predicted letter)."""
    from salr.evaluate import _stop_at, extract_answer, run_task

    started = time.perf_counter()
    ours = run_task(model, tokenizer, task, data_path, dev=dev, k=shots, limit=limit, batch_size=batch_size,
                    max_new_tokens=max_new_tokens)  # fmt: skip
    seconds = time.perf_counter() - started
    if len(ours["examples"]) != harness["n"]:
        raise SALRError(f"lm-eval scored {harness['n']} items, salr eval {len(ours['examples'])}: not the same items")
    if task == "gsm8k":
        what = "same extracted answer"
        agree = sum(
            extract_answer(e["generated"]) == extract_answer(_stop_at(h["generated"]))
            for e, h in zip(ours["examples"], harness["examples"], strict=True)
        )
    else:
        what = "same predicted letter"
        agree = sum(
            e["predicted"] == h["predicted"] for e, h in zip(ours["examples"], harness["examples"], strict=True)
        )
    return {
        "n": harness["n"],
        "salr_accuracy": ours["accuracy"],
        "harness_accuracy": harness["accuracy"],
        "accuracy_equal": ours["correct"] == harness["correct"],
        "agree": agree,
        "what": what,
        "salr_seconds": seconds,
        "overhead": harness["seconds"] / seconds,
        "disagreements": [
            i for i, (e, h) in enumerate(zip(ours["examples"], harness["examples"], strict=True))
            if e["correct"] != h["correct"]
        ],
    }  # fmt: skip

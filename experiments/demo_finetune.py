"""The demo's fine-tuning stage under several training settings, from one recovered checkpoint.

`salr demo` fine-tunes its recovered salr+ model for 40 steps on synthetic arithmetic; this script replays that
stage (same records, batch, length, steps and seed) under the settings below and scores each model as the demo does:
held-out text perplexity (8×256 tokens the dense model sampled with the demo's held-out seed), teacher-forced answer
NLL on the 40 held-out problems, greedy accuracy on 16 of them, and the three default prompts' completions.
Its table chose the demo's setting (docs/quality.md, "Fine-tuning in the demo"):

    salr demo --train-steps 0 --output REC          # compress + recover, saved without fine-tuning
    python experiments/demo_finetune.py REC --json OUT

Each setting takes ~6 min on 2 cores; nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any

import torch

from salr.calibration import self_generated_ids
from salr.checkpoint import read_salr_config
from salr.commands.demo import DEFAULT_PROMPTS, HELD_OUT_SEED, demo_records, held_out_perplexity, score
from salr.config import SALRConfig
from salr.evaluate import complete
from salr.io import atomic_write_json
from salr.loaders import load_model
from salr.train import TrainConfig, load_examples, train

SETTINGS = {  # name -> TrainConfig fields; the first is the demo's setting before 2026-12-05, the second salr train's
    "lr 1e-4, residual at lr, no prompt distillation": dict(lr=1e-4, residual_lr="lr", prompt_distill=0.0),
    "lr 1e-3, residual at lr*0.1, prompt distillation 1": dict(lr=1e-3, residual_lr="lr*0.1", prompt_distill=1.0),
    "lr 1e-4, residual at lr*0.1, prompt distillation 1": dict(lr=1e-4, residual_lr="lr*0.1", prompt_distill=1.0),
    "lr 3e-4, residual at lr*0.1, prompt distillation 1": dict(lr=3e-4, residual_lr="lr*0.1", prompt_distill=1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a recovered salr+ checkpoint (salr demo --train-steps 0 --output DIR)")
    parser.add_argument("--model", default="default", help="its dense model (the teacher and the text sampler)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    dense, tokenizer = load_model(args.model)
    start, _ = load_model(args.checkpoint)
    config = SALRConfig.from_dict(read_salr_config(args.checkpoint)["salr"])
    held_text = self_generated_ids(dense, 8, 256, seed=HELD_OUT_SEED)
    train_records, held_out, _ = demo_records(None, 256, 40, config.seed)
    examples = load_examples(None, tokenizer, 256, records=train_records)

    def look(model: torch.nn.Module) -> dict[str, Any]:
        return {"held_out_ppl": held_out_perplexity(model, held_text), **score(model, tokenizer, held_out, 16),
                "completions": complete(model, tokenizer, DEFAULT_PROMPTS, 32)}  # fmt: skip

    results: dict[str, Any] = {"before fine-tuning": look(start)}
    for name, fields in SETTINGS.items():
        model = copy.deepcopy(start)
        cfg = TrainConfig(max_steps=args.steps, batch_size=4, max_length=256, seed=config.seed, **fields)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            teacher = dense if fields["prompt_distill"] else None
            train(model, tokenizer, examples, config, cfg, run_dir, args.model, teacher=teacher)
        seconds = time.perf_counter() - started
        results[name] = {**look(model), "train_seconds": seconds}
        print(name, {k: v for k, v in results[name].items() if k != "completions"}, flush=True)
        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()

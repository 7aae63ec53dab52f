"""Self-calibration sampling checked on real windows: salr's nucleus against transformers' `TopPLogitsWarper`.

    python experiments/sampler_check.py [--model default] [--samples 64] [--length 128] [--seed 0]

Samples the windows as `salr compress --calibration self` does (`NucleusSampler`, timed), times transformers' own
top-p sampling of the same shape, then runs the model over the windows and, at every position, compares the tokens
`NucleusFilter` keeps with those the warper keeps, and checks that the sampled next token lies in the nucleus.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.generation.logits_process import TopPLogitsWarper

import salr
from salr import calibration

TOP_P = 0.95


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, _ = salr.load_model(args.model)
    model.eval()

    started = time.perf_counter()
    ids = calibration.self_generated_ids(model, args.samples, args.length, seed=args.seed)
    t_ours = time.perf_counter() - started
    prompt = ids[:, :1]
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_p=TOP_P, top_k=0,
            max_new_tokens=args.length - 1, min_new_tokens=args.length - 1,
            pad_token_id=model.config.eos_token_id,
        )  # fmt: skip
    t_theirs = time.perf_counter() - started

    ours, theirs = calibration.NucleusFilter(TOP_P), TopPLogitsWarper(TOP_P)
    eos = model.config.eos_token_id
    same = inside = positions = 0
    for begin in range(0, ids.shape[0], 8):
        window = ids[begin : begin + 8]
        with torch.no_grad():
            logits = model(window).logits.float()
        for t in range(window.shape[1] - 1):
            scores = logits[:, t].clone()
            if isinstance(eos, int):
                scores[:, eos] = -torch.inf  # min_new_tokens suppresses EOS until the window is full
            kept = ours(None, scores.clone()) > -torch.inf
            same += int((kept == (theirs(None, scores.clone()) > -torch.inf)).all(dim=-1).sum())
            inside += int(kept.gather(1, window[:, t + 1 : t + 2]).sum())
            positions += window.shape[0]
    print(f"kept sets identical at {same} of {positions} positions; sampled token inside the nucleus at {inside}")
    print(f"salr's sampling {t_ours:.1f} s, transformers' top-p sampling {t_theirs:.1f} s, {t_theirs / t_ours:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

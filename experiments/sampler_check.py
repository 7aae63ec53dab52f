"""Self-calibration windows sampled with salr's NucleusFilter vs transformers' TopPLogitsWarper, side by side.

    python experiments/sampler_check.py [--model default] [--samples 64] [--length 128] [--seed 0]

Prints whether the two samplers give identical token windows (same seed, same RNG draws) and the time of each.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

import salr
from salr import calibration


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, _ = salr.load_model(args.model)

    def sample() -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        ids = calibration.self_generated_ids(model, args.samples, args.length, seed=args.seed)
        return ids, time.perf_counter() - started

    ours, t_ours = sample()
    generate = model.generate

    def with_warper(*a, **kw):  # the same call with transformers' own top-p warper instead of NucleusFilter
        kw.pop("logits_processor")
        return generate(*a, **{**kw, "top_p": 0.95})

    with mock.patch.object(model, "generate", with_warper):
        theirs, t_theirs = sample()
    differing = int((ours != theirs).sum())
    print(f"identical windows: {torch.equal(ours, theirs)}; differing tokens {differing} of {ours.numel()}")
    print(f"NucleusFilter {t_ours:.1f} s, TopPLogitsWarper {t_theirs:.1f} s, ratio {t_theirs / t_ours:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

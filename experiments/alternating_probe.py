"""Per-layer output error of the alternating recipe for several round counts and momenta, on real layers.

The default recipe (SparseGPT mask + whitened fit, alternated) converges slowly, and each round costs seconds per
block, so its rounds and momentum were chosen on this proxy before the perplexity and the fine-tuned result were
measured (docs/quality.md, "Extrapolated rounds"). It collects the input Grams of two decoder blocks of the dense
model on calibration windows of a text file (salr.calibration.BlockwiseCalibration, as `salr convert` does),
decomposes their projections (q/k/v and gate/up in groups) with each setting, and prints the mean relative output
error ‖(W0 − Ŵ − B A) X‖ / ‖W0 X‖:

    python experiments/alternating_probe.py --rounds 3 5 8 --momentum 0 0.6 [--quant nf4] [--pattern 2:4]

The Grams come from the dense model (not sequential calibration), so the errors are lower than `salr compress`
reports; only their ranking across settings is the point. One torch thread by default (--threads).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from salr.calibration import BlockwiseCalibration, LayerStats, calibration_ids, decoder_blocks
from salr.config import SALRConfig
from salr.decompose import decompose_group
from salr.loaders import load_model

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data_1k.json"
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))  # fmt: skip


def block_stats(model: torch.nn.Module, ids: torch.Tensor, blocks: list[int]) -> dict[int, dict[str, LayerStats]]:
    """Each of `blocks`' calibration statistics (LayerStats by projection name, shared within a group), collected
    as `salr convert` collects them, except that every block sees the dense blocks' outputs (no compression)."""
    calib = BlockwiseCalibration(model, ids)
    calib.capture_inputs()
    _, layers = decoder_blocks(model)
    names = [name for group in GROUPS for name in group]
    found = {}
    for index, block in enumerate(layers[: max(blocks) + 1]):
        stats, calib.hidden = calib.statistics(block, names)
        if index in blocks:
            found[index] = stats
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--data", default=str(ALPACA), help="calibration text (a file salr compress --calibration takes)")
    p.add_argument("--blocks", type=int, nargs="+", default=[3, 15])
    p.add_argument("--rounds", type=int, nargs="+", default=[5])
    p.add_argument("--momentum", type=float, nargs="+", default=[0.0, SALRConfig().alternating_momentum])
    p.add_argument("--quant", default="none")
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    model, tokenizer = load_model(args.model)
    model.eval()
    ids = calibration_ids(model, tokenizer, args.data, 64, 128, seed=0)
    stats_by_block = block_stats(model, ids, args.blocks)
    _, layers = decoder_blocks(model)
    torch.set_num_threads(args.threads)
    for rounds, momentum in itertools.product(args.rounds, args.momentum):
        config = SALRConfig(alternating_rounds=rounds, alternating_momentum=momentum, quant=args.quant,
                            pattern=args.pattern, calibration=args.data)  # fmt: skip
        errors, start = [], time.perf_counter()
        for b, group in itertools.product(args.blocks, GROUPS):
            weights = [layers[b].get_submodule(name).weight for name in group]
            splits = decompose_group(weights, config, stats_by_block[b][group[0]])
            errors += [split.row["output_error_after_residual"] for split in splits]
        print(f"rounds {rounds:2d}  momentum {momentum:.2f}  mean output error {sum(errors) / len(errors):.5f}  "
              f"({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

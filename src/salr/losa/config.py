"""LoSAConfig and LoSA's schedules: the sparsity of each round, the box around it, the mean rank of each round and how
the optimizer steps and the data are split between rounds.

Everything here is arithmetic on small numbers; docs/losa.md says where each rule comes from (the reference code,
wzhuang-xmu/LoSA `main.py` / `lib/prune.py`) and where we depart from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from salr.errors import SALRError

PRUNE_METHODS = ("wanda", "sparsegpt")


@dataclass
class LoSAConfig:
    """The knobs of `salr train --method losa` (the target sparsity, pattern, calibration source and size, LoRA rank,
    scale and dropout come from the SALR flags: --sparsity, --pattern, --calibration, --calibration-samples,
    --calibration-length, --lora-rank + --residual-rank, --lora-alpha, --lora-dropout)."""

    rounds: int = field(default=5, metadata={"help": "losa: prune/fine-tune rounds; sparsity rises to the target"})
    prune_method: str = field(
        default="wanda",
        metadata={"help": "losa: one-shot pruning of each round ('wanda' as LoSA, or 'sparsegpt')",
                  "choices": PRUNE_METHODS},
    )  # fmt: skip
    rmi_allocation: bool = field(
        default=True,
        metadata={"help": "losa: per-block sparsity from representation mutual information (unstructured only)"},
    )
    rmi_fraction: float = field(
        default=0.5, metadata={"help": "losa: share of the calibration windows the RMI is measured on (LoSA: half)"}
    )
    rank_allocation: bool = field(
        default=True, metadata={"help": "losa: per-block LoRA rank from the reconstruction error (else uniform)"}
    )
    rank_start: float = field(
        default=0.6,
        metadata={"help": "losa: mean rank of round 1 as a fraction of the final mean rank (LoSA: 6 of 10)"},
    )
    max_rank_factor: float = field(
        default=1.6, metadata={"help": "losa: largest rank one block may get, times the final mean (LoSA: 16 of 10)"}
    )
    round_weights: str = field(
        default="1,1,1,1,6",
        metadata={"help": "losa: share of the optimizer steps and data of each round, comma-separated (LoSA's)"},
    )
    masked_training: bool = field(
        default=True,
        metadata={"help": "losa: train the update masked, M ⊙ (B A), as LoSA (off: an ablation that trains B A "
                          "unmasked on the pruned base and masks it only when merging)"},
    )  # fmt: skip
    warmup_ratio: float = field(
        default=0.3, metadata={"help": "losa: warmup of each round's restarted schedule, fraction of its steps"}
    )
    save_merged: bool = field(
        default=True, metadata={"help": "losa: also write the plain sparse transformers model to OUTPUT/merged"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise SALRError(f"rounds must be a positive integer, got {self.rounds!r}")
        if self.prune_method not in PRUNE_METHODS:
            raise SALRError(f"prune_method must be one of {PRUNE_METHODS}, got {self.prune_method!r}")
        if not 0.0 < self.rmi_fraction <= 1.0:
            raise SALRError(f"rmi_fraction must be in (0, 1], got {self.rmi_fraction}")
        if not 0.0 < self.rank_start <= 1.0:
            raise SALRError(f"rank_start must be in (0, 1], got {self.rank_start}")
        if self.max_rank_factor < 1.0:
            raise SALRError(
                f"max_rank_factor must be >= 1 (the final mean must be reachable), got {self.max_rank_factor}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise SALRError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.weights()  # validates round_weights

    def weights(self) -> list[float]:
        """`round_weights` as one positive number per round; a list shorter than `rounds` repeats its last value,
        a longer one is cut, so the default 1,1,1,1,6 works for any number of rounds."""
        try:
            values = [float(v) for v in str(self.round_weights).split(",") if v.strip()]
        except ValueError as err:
            raise SALRError(f"round_weights {self.round_weights!r}: write numbers separated by commas") from err
        if not values or any(not math.isfinite(v) or v <= 0 for v in values):
            raise SALRError(f"round_weights {self.round_weights!r}: need positive numbers, e.g. '1,1,1,1,6'")
        values = values[-self.rounds :] if len(values) > self.rounds else values
        return values + [values[-1]] * (self.rounds - len(values))


def round_sparsity(target: float, t: int, rounds: int) -> float:
    """Sparsity after round t (1-based) of `rounds`: the cubic schedule s_t = S - S (1 - t/T)^3, so s_T = S."""
    if not 1 <= t <= rounds:
        raise SALRError(f"round {t} is outside 1..{rounds}")
    return target - target * (1.0 - t / rounds) ** 3


def sparsity_box(round_sparsity_: float, previous: float = 0.01) -> float:
    """Half-width δ of the per-block sparsity box around the round's sparsity: 0.01 up to 50 %, 0.02 up to 60 %,
    0.03 up to 70 %; above 70 % the reference code keeps the previous round's value (`previous`)."""
    if round_sparsity_ <= 0.5:
        return 0.01
    if round_sparsity_ <= 0.6:
        return 0.02
    if round_sparsity_ <= 0.7:
        return 0.03
    return previous


def mean_rank(final: int, t: int, rounds: int, start: float) -> float:
    """Mean LoRA rank per block in round t: rises linearly from start * final (round 1) to final (round T)."""
    if rounds == 1:
        return float(final)
    return final * (start + (1.0 - start) * (t - 1) / (rounds - 1))


def apportion(total: int, weights: list[float], minimum: int = 0) -> list[int]:
    """Integers proportional to `weights` that sum to `total` exactly (largest remainders), each >= `minimum`."""
    n = len(weights)
    if total < minimum * n:
        raise SALRError(f"cannot split {total} into {n} parts of at least {minimum} each")
    shares = [total * w / sum(weights) for w in weights]
    parts = [max(minimum, math.floor(s)) for s in shares]
    while sum(parts) < total:  # the largest remainder first, then the earliest
        i = max(range(n), key=lambda j: (shares[j] - parts[j], -j))
        parts[i] += 1
    while sum(parts) > total:  # only when minimums were raised: take from the most over-served part
        i = max((j for j in range(n) if parts[j] > minimum), key=lambda j: (parts[j] - shares[j], j))
        parts[i] -= 1
    return parts

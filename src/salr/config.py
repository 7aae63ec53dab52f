"""SALRConfig: every knob of a SALR conversion, validated up front (PEFT-style names where they exist)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from salr.bitmap_format import QUANT_BLOCKSIZE, QUANT_BLOCKSIZES
from salr.errors import SALRError

PATTERN_RE = re.compile(r"^(\d+):(\d+)$")
GRANULARITIES = ("layer", "row", "global")
SVD_METHODS = ("auto", "exact", "randomized")
CRITERIA = ("magnitude", "wanda", "sparsegpt")
RESIDUAL_INITS = ("svd", "whitened", "alternating")
NO_CALIBRATION = "none"
TRAINING_DATA = "data"  # salr train's own training records (salr.train.run_training passes their windows)
DEFAULT_SPARSITY = 0.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTS = ("none", "nf4", "int8")
QUANT_ROUNDINGS = ("nearest", "gptq")
QUANT_SCALES = ("absmax", "search")
# Block tuning's steps per block where it is on by default: quantized bases and N:M patterns, whose per-layer fits
# leave the most for a block-level fit to repair. On the default model over three seeds it lowered WikiText-2 at init
# 3.0 % (NF4) and 5.4 % (2:4) and nothing measurable on an unstructured unquantized base (docs/quality.md).
BLOCK_TUNING_STEPS = 32


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M consecutive weights along the input dim; None for 'unstructured'."""
    match = PATTERN_RE.match(pattern)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _check_modules(name: str, spec: Any) -> None:
    """Module names (a list of strings), 'all-linear' or a regex that compiles; None for exclude_modules."""
    if spec is None or spec == "all-linear":
        return
    if isinstance(spec, list) and all(isinstance(s, str) and s for s in spec):
        return
    if not isinstance(spec, str):
        raise SALRError(f"{name} must be a list of module names, 'all-linear' or a regex, got {spec!r}")
    try:
        re.compile(spec)
    except re.error as err:
        raise SALRError(f"{name} {spec!r} is not a valid regular expression ({err})") from err


def _check_layer_pattern(name: str, pattern: Any, what: str) -> None:
    """A per-layer pattern is None or a non-empty {regex: value} dict with valid regex keys."""
    if pattern is None:
        return
    if not isinstance(pattern, dict) or not pattern:
        raise SALRError(f"{name} must be a non-empty dict {{regex: {what}}}, got {pattern!r}")
    for key in pattern:
        if not isinstance(key, str) or not key:
            raise SALRError(f"{name} keys must be non-empty regex strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise SALRError(f"{name} key {key!r} is not a valid regular expression ({err})") from err


def pattern_key_matches(key: str, name: str) -> bool:
    """PEFT's rank_pattern rule for one key: its regex matches the end of `name` (the whole name, or what follows a
    dot)."""
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", name) is not None


def _first_match(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    """The value of the first key of `pattern` that matches `name` (pattern_key_matches), else `default`."""
    for key, value in (pattern or {}).items():
        if pattern_key_matches(key, name):
            return value
    return default


@dataclass
class SALRConfig:
    sparsity: float | None = field(
        default=None,
        metadata={
            "help": "fraction of each base weight set to zero, in [0, 1): 0.5 when unset; implied (1 - N/M) "
            "by an N:M pattern"
        },
    )
    sparsity_pattern: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": "per-layer sparsity in place of sparsity (unstructured only), the rule of residual_rank_pattern: "
            "{regex: sparsity}, a key matching the end of a target's name (after a dot); the first matching key wins"
        },
    )
    pattern: str = field(default="unstructured", metadata={"help": "'unstructured' or 'N:M' such as '2:4', '4:8'"})
    granularity: str | None = field(
        default=None,
        metadata={
            "help": "unstructured only: compare scores per 'layer', per output 'row', or 'global' across layers "
            "(magnitude only); unset: 'row' for wanda/sparsegpt, 'layer' for magnitude",
            "choices": GRANULARITIES,
        },
    )
    criterion: str = field(
        default="sparsegpt",
        metadata={
            "help": "which weights to keep: 'magnitude' |W| (the paper; no data), 'wanda' |W|·‖x‖, or 'sparsegpt' "
            "(OBS mask + update of the kept weights)",
            "choices": CRITERIA,
        },
    )
    residual_init: str = field(
        default="alternating",
        metadata={
            "help": "residual adapter init: 'svd' of E (the paper), 'whitened' (best rank-r fix of the output error "
            "on calibration data), 'alternating' (re-prune and re-fit a few rounds)",
            "choices": RESIDUAL_INITS,
        },
    )
    alternating_rounds: int = field(
        default=5,
        metadata={"help": "rounds of residual_init 'alternating' (each re-prunes and re-fits: better, slower)"},
    )
    alternating_momentum: float = field(
        default=0.6,
        metadata={
            "help": "residual_init 'alternating': from the second round on, prune W0 - (L + m (L - L_prev)), the "
            "low-rank part L extrapolated along its last step (0 = plain alternation); in [0, 1)"
        },
    )
    calibration: str = field(
        default="self",
        metadata={
            "help": "calibration text: 'self' (sampled from the model itself, no file needed), a GSM8K / Alpaca "
            ".json / .jsonl file or a plain-text file (any other name), 'data' (salr train: its training records; "
            "its default there) or 'none' (magnitude + svd only)"
        },
    )
    calibration_samples: int = field(default=64, metadata={"help": "calibration windows"})
    calibration_length: int = field(default=128, metadata={"help": "tokens per calibration window"})
    sequential: bool = field(
        default=True,
        metadata={
            "help": "calibrate each block on the outputs of the already compressed blocks (else the dense ones)"
        },
    )
    block_tuning_steps: int | None = field(
        default=None,
        metadata={
            "help": "after each block is compressed, Adam steps (one calibration batch each) fitting its residual "
            "factors to the dense block's output (block-wise reconstruction; needs sequential calibration); 0 = off; "
            f"unset: {BLOCK_TUNING_STEPS} for a quantized base or an N:M pattern calibrated block after block, else 0"
        },
    )
    block_tuning_lr: float = field(default=3e-4, metadata={"help": "learning rate of block tuning's residual factors"})
    damping: float = field(default=0.01, metadata={"help": "Gram damping, relative to its mean diagonal"})
    residual_rank: int = field(default=64, metadata={"help": "rank of the SVD residual adapter (0 = naive pruning)"})
    residual_rank_pattern: dict[str, int] | None = field(
        default=None,
        metadata={
            "help": "per-layer residual ranks in place of residual_rank, as PEFT's rank_pattern: {regex: rank}, a "
            "key matching the end of a target's name (after a dot); the first matching key wins"
        },
    )
    r: int = field(default=16, metadata={"help": "LoRA rank (0 = no LoRA block)"})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA scaling numerator, scale = lora_alpha / r; 2 * r when unset"}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input only (never the residual)"})
    target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={"help": "module names (suffix match), a regex (full match), or 'all-linear'"},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "names or regex to skip"})
    svd_method: str = field(
        default="auto",
        metadata={"help": "'exact', 'randomized', or 'auto' (randomized for large layers)", "choices": SVD_METHODS},
    )
    train_residual: bool = field(
        default=True, metadata={"help": "False freezes the residual block (the paper's ablation)"}
    )
    adapter_dtype: str = field(default="float32", metadata={"help": "dtype of A_cat/B_cat", "choices": tuple(DTYPES)})
    seed: int = field(default=0, metadata={"help": "seed for LoRA init, randomized SVD and self-calibration sampling"})
    quant: str = field(
        default="none",
        metadata={
            "help": "QSALR: quantize the kept base values blockwise ('nf4' = QLoRA's 4-bit NormalFloat, 'int8'); "
            "the residual then absorbs pruning and quantization error",
            "choices": QUANTS,
        },
    )
    quant_double: bool = field(
        default=False, metadata={"help": "with quant: double-quantize the block scales (QLoRA), ~0.37 bit/value less"}
    )
    quant_blocksize: int = field(
        default=QUANT_BLOCKSIZE,
        metadata={
            "help": "with quant: kept values per block scale (QLoRA: 64). Smaller blocks fit the scales closer to "
            "the values (less rounding error); an fp32 scale costs 32 / blocksize bit per kept value (1 at 32, 0.5 "
            "at 64), about a quarter of that with quant_double",
            "choices": QUANT_BLOCKSIZES,
        },
    )
    quant_rounding: str | None = field(
        default=None,
        metadata={
            "help": "with quant: 'nearest' rounds each kept value to its nearest code (QLoRA); 'gptq' rounds one "
            "input column at a time and lets the later columns absorb the error (GPTQ, needs calibration); unset: "
            "'gptq' when calibration statistics are collected, else 'nearest'",
            "choices": QUANT_ROUNDINGS,
        },
    )
    quant_scales: str | None = field(
        default=None,
        metadata={
            "help": "with quant: each block's scale is its 'absmax' (QLoRA) or the clipped scale whose rounding "
            "error is least ('search', weighted by the input energy when calibrating); unset: 'search' when "
            "calibration statistics are collected, else 'absmax'",
            "choices": QUANT_SCALES,
        },
    )

    def __post_init__(self) -> None:
        nm = parse_nm(self.pattern)
        if self.pattern != "unstructured" and nm is None:
            raise SALRError(f"pattern {self.pattern!r} is not understood: use 'unstructured' or 'N:M' such as '2:4'")
        if nm is not None:
            n, m = nm
            if not 0 < n <= m:
                raise SALRError(f"pattern {self.pattern!r}: need 0 < N <= M (keep N of every M weights)")
            implied = 1.0 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise SALRError(
                    f"pattern {self.pattern} implies sparsity {implied:g}, but sparsity={self.sparsity:g} was given: "
                    "leave sparsity unset for N:M patterns"
                )
            self.sparsity = implied
            if self.granularity not in (None, "layer"):
                raise SALRError("granularity applies to unstructured pruning only; N:M is always per group")
            self.granularity = "layer"
        if self.sparsity is None:
            self.sparsity = DEFAULT_SPARSITY
        if not isinstance(self.sparsity, int | float) or not 0.0 <= float(self.sparsity) < 1.0:
            raise SALRError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        self.sparsity = float(self.sparsity)
        self._check_rank_pattern()  # before needs_calibration reads it
        self._check_sparsity_pattern()
        self._check_compression_method()
        for name in ("residual_rank", "r"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise SALRError(f"{name} must be a non-negative integer, got {value!r}")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * max(self.r, 1)
        if self.r > 0 and self.lora_alpha <= 0:
            raise SALRError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SALRError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.svd_method not in SVD_METHODS:
            raise SALRError(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")
        if self.quant not in QUANTS:
            raise SALRError(f"quant must be one of {QUANTS}, got {self.quant!r}")
        if self.quant_double and self.quant == "none":
            raise SALRError("quant_double quantizes the scales of a quantized base: pass quant='nf4' or 'int8' too")
        if self.quant_blocksize not in QUANT_BLOCKSIZES:
            raise SALRError(f"quant_blocksize must be one of {QUANT_BLOCKSIZES}, got {self.quant_blocksize!r}")
        if self.quant_blocksize != QUANT_BLOCKSIZE and self.quant == "none":
            raise SALRError("quant_blocksize sizes the scale blocks of a quantized base: pass quant='nf4' or 'int8'")
        self._check_quant_rounding()
        if self.adapter_dtype not in DTYPES:
            raise SALRError(f"adapter_dtype must be float32, bfloat16 or float16, got {self.adapter_dtype!r}")
        for name in ("target_modules", "exclude_modules"):
            _check_modules(name, getattr(self, name))

    def _check_compression_method(self) -> None:
        if self.criterion not in CRITERIA:
            raise SALRError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.residual_init not in RESIDUAL_INITS:
            raise SALRError(f"residual_init must be one of {RESIDUAL_INITS}, got {self.residual_init!r}")
        if self.granularity is None:
            self.granularity = "layer" if self.criterion == "magnitude" else "row"
        if self.granularity not in GRANULARITIES:
            raise SALRError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "global" and self.criterion != "magnitude":
            raise SALRError("granularity 'global' works with criterion 'magnitude' only: use 'row' or 'layer'")
        if self.needs_calibration and self.calibration == NO_CALIBRATION:
            raise SALRError(
                f"criterion {self.criterion!r} with residual_init {self.residual_init!r} needs calibration data: "
                "pass calibration 'self' or a file, or use the paper's method (--preset paper)"
            )
        for name in ("alternating_rounds", "calibration_samples", "calibration_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SALRError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        momentum = self.alternating_momentum
        if isinstance(momentum, bool) or not (isinstance(momentum, int | float) and 0 <= momentum < 1):
            raise SALRError(f"alternating_momentum must be a number in [0, 1), got {momentum!r}")
        self._check_block_tuning()

    def _check_block_tuning(self) -> None:
        steps = self.block_tuning_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise SALRError(f"block_tuning_steps must be a non-negative integer, got {steps!r}")
        lr = self.block_tuning_lr
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
            raise SALRError(f"block_tuning_lr must be a positive number, got {lr!r}")
        if steps and not (self.needs_calibration and self.sequential):
            raise SALRError(
                "block tuning fits each compressed block on calibration data, block after block: it needs an "
                "activation-aware recipe (criterion wanda / sparsegpt or residual_init whitened / alternating) "
                "with sequential calibration"
            )
        if not (isinstance(self.damping, int | float) and 0 < self.damping < 1e3):
            raise SALRError(f"damping must be a positive number, got {self.damping!r}")

    def _check_rank_pattern(self) -> None:
        _check_layer_pattern("residual_rank_pattern", self.residual_rank_pattern, "rank")
        for key, rank in (self.residual_rank_pattern or {}).items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise SALRError(f"residual_rank_pattern[{key!r}] must be a non-negative integer, got {rank!r}")

    def _check_sparsity_pattern(self) -> None:
        pattern = self.sparsity_pattern
        _check_layer_pattern("sparsity_pattern", pattern, "sparsity")
        if pattern is None:
            return
        for key, value in pattern.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise SALRError(f"sparsity_pattern[{key!r}] must be a number in [0, 1), got {value!r}")
        if self.nm is not None:
            raise SALRError(
                f"sparsity_pattern sets per-layer unstructured sparsity, but pattern is {self.pattern!r} (N:M fixes "
                "the sparsity of every layer): drop one of the two"
            )
        if self.granularity == "global":
            raise SALRError("sparsity_pattern sets each layer's own sparsity; granularity 'global' ranks all layers "
                            "together: use granularity 'row' or 'layer'")  # fmt: skip

    def residual_rank_of(self, name: str) -> int:
        """The residual rank of the target `name`: that of the first residual_rank_pattern key whose regex matches
        the end of the name (the whole name, or what follows a dot), else residual_rank."""
        return _first_match(self.residual_rank_pattern, name, self.residual_rank)

    def sparsity_of(self, name: str) -> float:
        """The sparsity of the target `name`: the first sparsity_pattern match (the rule of residual_rank_of), else
        sparsity."""
        return float(_first_match(self.sparsity_pattern, name, self.sparsity))

    def for_target(self, name: str) -> SALRConfig:
        """This config as the target `name` converts with: residual rank and sparsity resolved, no pattern left."""
        if self.residual_rank_pattern is None and self.sparsity_pattern is None:
            return self
        return replace(
            self, residual_rank=self.residual_rank_of(name), residual_rank_pattern=None,
            sparsity=self.sparsity_of(name), sparsity_pattern=None,
        )  # fmt: skip

    def _check_quant_rounding(self) -> None:
        if self.quant == "none":
            for name in ("quant_rounding", "quant_scales"):
                if getattr(self, name) is not None:
                    raise SALRError(f"{name} chooses how a quantized base is rounded: pass quant='nf4' or 'int8'")
            return
        if self.quant_scales is not None and self.quant_scales not in QUANT_SCALES:
            raise SALRError(f"quant_scales must be one of {QUANT_SCALES}, got {self.quant_scales!r}")
        if self.quant_rounding is None:
            return
        if self.quant_rounding not in QUANT_ROUNDINGS:
            raise SALRError(f"quant_rounding must be one of {QUANT_ROUNDINGS}, got {self.quant_rounding!r}")
        if self.quant_rounding == "gptq" and not self.needs_calibration:
            raise SALRError(
                "quant_rounding 'gptq' needs calibration statistics, which this config does not collect (magnitude "
                "mask + plain SVD, or sparsity 0): use quant_rounding 'nearest' or an activation-aware criterion"
            )

    @property
    def rounding(self) -> str | None:
        """How the quantized base is rounded (quant_rounding, or its default: 'gptq' when calibration statistics are
        collected, else 'nearest'); None without quant."""
        if self.quant == "none":
            return None
        return self.quant_rounding or ("gptq" if self.needs_calibration else "nearest")

    @property
    def tuning_steps(self) -> int:
        """Block tuning's steps per block: block_tuning_steps, or its default, BLOCK_TUNING_STEPS where it pays for
        its time (a quantized base or an N:M pattern, calibrated block after block, with residual factors to tune;
        on an unstructured unquantized base it gained nothing measurable), else 0."""
        if self.block_tuning_steps is not None:
            return self.block_tuning_steps
        pays = self.quant != "none" or self.nm is not None
        return BLOCK_TUNING_STEPS if pays and self.has_residual and self.needs_calibration and self.sequential else 0

    @property
    def scale_rule(self) -> str | None:
        """How block scales are chosen (quant_scales, or its default: 'search' when calibration statistics are
        collected, else 'absmax'); None without quant."""
        if self.quant == "none":
            return None
        return self.quant_scales or ("search" if self.needs_calibration else "absmax")

    @property
    def needs_calibration(self) -> bool:
        """True when converting reads activations: an activation-aware mask or residual on a pruned base."""
        if self.sparsity == 0 and not any((self.sparsity_pattern or {}).values()):
            return False
        return self.criterion != "magnitude" or (self.residual_init != "svd" and self.has_residual)

    @property
    def has_residual(self) -> bool:
        """True when some target gets a residual adapter (residual_rank or a residual_rank_pattern rank > 0)."""
        return max([self.residual_rank, *(self.residual_rank_pattern or {}).values()]) > 0

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> SALRConfig:
        """A config from a named preset (PRESETS), fields in `overrides` taking precedence."""
        if preset not in PRESETS:
            raise SALRError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides})

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.r if self.r > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SALRConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("quant", "none") != "none" and "quant_rounding" not in known:
            known["quant_rounding"] = "nearest"  # saved before GPTQ rounding existed
        if known.get("quant", "none") != "none" and "quant_scales" not in known:
            known["quant_scales"] = "absmax"  # saved before the scale search existed
        known.setdefault("alternating_momentum", 0.0)  # saved before extrapolated rounds existed
        known.setdefault("block_tuning_steps", 0)  # saved before block tuning existed
        if known.get("pattern", "unstructured") != "unstructured":
            known["sparsity"] = None  # implied by the pattern; avoids float round-trip mismatch
        return cls(**known)


# Named recipes. "paper" reproduces the SALR paper exactly: magnitude mask, plain SVD of E, no data. "salr+" is the
# best measured combination (docs/quality.md), which is also SALRConfig's default.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"criterion": "magnitude", "residual_init": "svd", "granularity": "layer", "calibration": NO_CALIBRATION},
    "salr+": {"criterion": "sparsegpt", "residual_init": "alternating", "calibration": "self"},
}
